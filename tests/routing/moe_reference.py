"""A naive per-token reference for the Mixture-of-Experts FFN, written independently of condformer's code.

Everything here is a Python loop over tokens (and over pairs, for capacity), in float64, from the raw
weights of a module: the router's weight matrix, the hash table, the LSH planes, and each expert's
``w_up`` / ``w_down`` used as plain matmuls. No dispatch helper, router class or loss of the library is
called. Gates stay 0-dim tensors so that autograd through the reference gives reference gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch


@dataclass
class RefWeights:
    """A float64 copy of what defines an MoE layer's function (optionally as fresh autograd leaves)."""

    kind: str
    k: int
    n_experts: int
    n_null: int
    renormalize: bool
    swiglu: bool
    w_up: torch.Tensor  # (E, D, F or 2F)
    w_down: torch.Tensor  # (E, F, D)
    router: torch.Tensor | None = None  # (E_total, D)
    bias: torch.Tensor | None = None  # aux-free selection bias (E_total,)
    table: torch.Tensor | None = None  # hash: vocab -> expert
    planes: torch.Tensor | None = None  # lsh: (D, bits)
    shared_up: torch.Tensor | None = None
    shared_down: torch.Tensor | None = None

    @property
    def n_total(self) -> int:
        return self.n_experts + self.n_null


def weights_of(ffn, leaves: bool = False) -> RefWeights:
    """Copy a module's weights to float64; ``leaves``: as new tensors requiring grad (reference gradients)."""

    def cp(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.detach().to(torch.float64).clone()
        return t.requires_grad_(True) if leaves and t.is_floating_point() else t

    router = getattr(ffn.router, "weight", None)
    return RefWeights(
        kind=ffn.kind, k=ffn.k, n_experts=ffn.n_experts, n_null=ffn.n_null,
        renormalize=bool(getattr(ffn.router, "renormalize", False)), swiglu=ffn.bank.swiglu,
        w_up=cp(ffn.bank.w_up), w_down=cp(ffn.bank.w_down), router=cp(router),
        bias=None if getattr(ffn, "expert_bias", None) is None else ffn.expert_bias.detach().double().clone(),
        table=getattr(ffn.router, "table", None), planes=None if not hasattr(ffn.router, "planes")
        else ffn.router.planes.detach().double().clone(),
        shared_up=None if ffn.shared is None else cp(ffn.shared.w_up),
        shared_down=None if ffn.shared is None else cp(ffn.shared.w_down),
    )


# -- experts ------------------------------------------------------------------------------------
def mlp(x_D: torch.Tensor, up: torch.Tensor, down: torch.Tensor, swiglu: bool) -> torch.Tensor:
    h = x_D @ up
    if swiglu:
        a, b = h.chunk(2, dim=-1)
        h = a * torch.sigmoid(a) * b
    else:
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GELU
    return h @ down


def expert(W: RefWeights, e: int, x_D: torch.Tensor) -> torch.Tensor:
    return mlp(x_D, W.w_up[e], W.w_down[e], W.swiglu)


def shared(W: RefWeights, x_D: torch.Tensor) -> torch.Tensor:
    return mlp(x_D, W.shared_up[0], W.shared_down[0], W.swiglu)


# -- routing of one token -------------------------------------------------------------------------
def softmax(v: torch.Tensor) -> torch.Tensor:
    z = torch.exp(v - v.max())
    return z / z.sum()


def router_probs(W: RefWeights, x_D: torch.Tensor) -> torch.Tensor:
    return softmax(W.router @ x_D)


def top(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, largest first (plain Python sort)."""
    return sorted(range(len(values)), key=lambda i: -values[i])[:k]


def lsh_expert(W: RefWeights, x_D: torch.Tensor) -> int:
    proj = (x_D @ W.planes).tolist()
    bucket = sum(2 ** b for b, v in enumerate(proj) if v > 0)
    return bucket % W.n_experts


def route(W: RefWeights, x_D: torch.Tensor, token: int | None = None) -> list[tuple[int, torch.Tensor]]:
    """[(expert, gate)] for one token of a token-choice router (ids >= n_experts are no-op experts)."""
    one = torch.ones((), dtype=torch.float64)
    if W.kind == "hash":
        return [(int(W.table[token]), one)]
    if W.kind == "lsh":
        return [(lsh_expert(W, x_D), one)]
    logits = W.router @ x_D
    p = softmax(logits)
    select = p if W.bias is None else p + W.bias
    if W.kind == "noisy_topk" and W.bias is not None:
        select = logits + W.bias
    chosen = top(select.tolist(), W.k)
    if W.kind == "noisy_topk":  # evaluation: softmax over the kept (clean) logits
        kept = softmax(logits[chosen])
        return [(e, kept[j]) for j, e in enumerate(chosen)]
    gates = [p[e] for e in chosen]
    if W.renormalize and W.k > 1:
        total = sum(gates)
        gates = [g / total for g in gates]
    return list(zip(chosen, gates, strict=True))


# -- capacity -----------------------------------------------------------------------------------
def capacity(factor: float, n_tokens: int, k: int, n_total: int) -> int:
    """ceil(factor * N * k / E_total) in exact arithmetic, clipped to [1, N]."""
    return max(1, min(n_tokens, math.ceil(Fraction(str(factor)) * n_tokens * k / n_total)))


def keep_pairs(choices: list[list[tuple[int, torch.Tensor]] | None], n_experts: int, cap: int, policy: str,
               order: str = "choice") -> list[list[bool]]:
    """Which (token, choice) pairs an expert with ``cap`` slots accepts.

    ``choices[n]`` is None for padding. Pairs are visited choice-major (all first choices in token order,
    then all second choices, ...); ``policy == "score"`` visits them by descending gate instead (ties in
    that order). ``order="token"`` visits token-major (a wrong variant, to show the tests can tell).
    """
    N = len(choices)
    K = max(len(c) for c in choices if c is not None)
    if order == "choice":
        pairs = [(n, j) for j in range(K) for n in range(N) if choices[n] is not None]
    else:
        pairs = [(n, j) for n in range(N) for j in range(K) if choices[n] is not None]
    if policy == "score":
        pairs = sorted(pairs, key=lambda nj: -float(choices[nj[0]][nj[1]][1]))  # sorted() is stable
    held = [0] * n_experts
    kept = [[False] * K for _ in range(N)]
    for n, j in pairs:
        e = choices[n][j][0]
        if e < n_experts and held[e] < cap:
            held[e] += 1
            kept[n][j] = True
    return kept


# -- whole layer --------------------------------------------------------------------------------
@dataclass
class RefResult:
    y: torch.Tensor  # (B, T, D)
    choices: list[list[tuple[int, torch.Tensor]] | None]  # per flattened token; None for padding
    kept: list[list[bool]] | None  # per pair, with capacity

    def experts(self) -> list[list[int] | None]:
        return [None if c is None else [e for e, _ in c] for c in self.choices]

    def visited(self, n_experts: int) -> list[list[int]]:
        """Per token and choice: the real expert that computed the pair, -1 for none (no-op, dropped, padding)."""
        K = max(len(c) for c in self.choices if c is not None)
        return [[-1] * K if c is None else
                [e if e < n_experts and (self.kept is None or self.kept[n][j]) else -1 for j, (e, _) in enumerate(c)]
                for n, c in enumerate(self.choices)]

    def dropped_frac(self, n_experts: int) -> float:
        real = [(n, j) for n, c in enumerate(self.choices) if c is not None for j, (e, _) in enumerate(c)
                if e < n_experts]
        if self.kept is None or not real:
            return 0.0
        return sum(not self.kept[n][j] for n, j in real) / len(real)


def moe(W: RefWeights, x_BTD: torch.Tensor, *, tokens_BT: torch.Tensor | None = None,
        valid_BT: torch.Tensor | None = None, capacity_factor: float | None = None, policy: str = "position",
        granularity: str = "token") -> RefResult:
    """The token-choice / soft MoE layer, one token at a time."""
    x_BTD = x_BTD.to(torch.float64)
    B, T, D = x_BTD.shape
    valid = [[True] * T for _ in range(B)] if valid_BT is None else valid_BT.tolist()
    rows: list[torch.Tensor] = []
    choices: list[list[tuple[int, torch.Tensor]] | None] = []
    pooled = {}
    if granularity == "sequence":
        for b in range(B):
            idx = [t for t in range(T) if valid[b][t]]
            pooled[b] = route(W, sum(x_BTD[b, t] for t in idx) / len(idx))
    for b in range(B):
        for t in range(T):
            if not valid[b][t]:
                choices.append(None)
            elif W.kind == "soft":
                p = router_probs(W, x_BTD[b, t])
                choices.append([(e, p[e]) for e in range(W.n_experts)])
            elif granularity == "sequence":
                choices.append(pooled[b])
            else:
                choices.append(route(W, x_BTD[b, t], None if tokens_BT is None else int(tokens_BT[b, t])))
    kept = None
    if capacity_factor is not None:
        kept = keep_pairs(choices, W.n_experts, capacity(capacity_factor, B * T, W.k, W.n_total), policy)
    for n, c in enumerate(choices):
        x = x_BTD[n // T, n % T]
        y = torch.zeros(D, dtype=torch.float64)
        for j, (e, g) in enumerate(c or []):
            if e < W.n_experts and (kept is None or kept[n][j]):
                y = y + g * expert(W, e, x)
        if W.shared_up is not None:
            y = y + shared(W, x)
        rows.append(y)
    return RefResult(torch.stack(rows).view(B, T, D), choices, kept)


def expert_choice(W: RefWeights, x_BTD: torch.Tensor, top_k: int, valid_BT: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, list[list[int]]]:
    """Per sequence, expert e takes the C = ceil(k T / E) valid tokens with the largest softmax prob of e.

    Returns y (B, T, D) and, per sequence, how many experts took each token.
    """
    x_BTD = x_BTD.to(torch.float64)
    B, T, D = x_BTD.shape
    E = W.n_experts
    C = max(1, min(T, math.ceil(Fraction(top_k * T, E))))
    valid = [[True] * T for _ in range(B)] if valid_BT is None else valid_BT.tolist()
    y = torch.zeros(B, T, D, dtype=torch.float64)
    picks = [[0] * T for _ in range(B)]
    for b in range(B):
        probs = [router_probs(W, x_BTD[b, t]) for t in range(T)]
        for e in range(E):
            cand = [t for t in range(T) if valid[b][t]]
            for t in sorted(cand, key=lambda t, e=e: -float(probs[t][e]))[:C]:
                y[b, t] = y[b, t] + probs[t][e] * expert(W, e, x_BTD[b, t])
                picks[b][t] += 1
    return y, picks


# -- losses -------------------------------------------------------------------------------------
def balance(probs_NE: torch.Tensor, experts_NK: list[list[int]], convention: str) -> float:
    """E * sum_i f_i P_i with f_i = hits_i / N (hf: sum f = k) or hits_i / (N k) (unit: sum f = 1)."""
    N, E = probs_NE.shape
    k = len(experts_NK[0])
    hits = [0] * E
    for row in experts_NK:
        for e in row:
            hits[e] += 1
    P = [float(probs_NE[:, i].double().sum()) / N for i in range(E)]
    f = [h / N if convention == "hf" else h / (N * k) for h in hits]
    return E * sum(fi * pi for fi, pi in zip(f, P, strict=True))


def cv2(values: list[float]) -> float:
    m = sum(values) / len(values)
    return sum((v - m) ** 2 for v in values) / len(values) / m ** 2


def phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def smooth_load(clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor, k: int) -> list[float]:
    """sum_n Phi((clean_ni - kth_excluding_i(noisy_n)) / std_ni), kth_excluding_i = k-th largest of the others."""
    N, E = clean.shape
    load = [0.0] * E
    for n in range(N):
        row = noisy[n].tolist()
        for i in range(E):
            others = sorted((v for j, v in enumerate(row) if j != i), reverse=True)
            kth = others[k - 1] if k - 1 < len(others) else -math.inf
            load[i] += phi((float(clean[n, i]) - kth) / float(std[n, i]))
    return load


def route_mean_rows(W: RefWeights, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None) -> list[list[int]]:
    """Sequence granularity: the experts of each sequence's mean (valid) state."""
    B, T, _ = x_BTD.shape
    out = []
    for b in range(B):
        idx = [t for t in range(T) if valid_BT is None or bool(valid_BT[b, t])]
        out.append([e for e, _ in route(W, x_BTD[b, idx].double().mean(dim=0))])
    return out

