"""A naive reference for early exits (Elbayad et al. 2020; CALM; LayerSkip), written independently.

Token selection, state copying, confidences, halting distributions, oracles and cross-entropies are explicit
Python loops over batch rows, positions and exits. Only the model's own embedding, layers, norms and heads
(``model.embed``, ``model.layers[i]``, ``model.final_norm``, ``model.head``, ``model.exits.norms[k]``,
``model.exits.heads[k]``) and its halting parameters are reused: what is checked is the loop around them.
Nothing from ``condformer.routing.early_exit`` is called.
"""

from __future__ import annotations

import math

import torch

IGNORE = -100


# -- the pieces ----------------------------------------------------------------------------------
def exit_layers(n_layers: int, layers: list[int] | None) -> list[int]:
    """Sorted layer indices followed by an exit, the last layer always included."""
    chosen = set(range(n_layers)) if layers is None else set(layers)
    chosen.add(n_layers - 1)
    return sorted(chosen)


def context(model, x_BT: torch.Tensor, valid_BT: torch.Tensor | None = None):  # noqa: ANN001, ANN201
    return model._context(x_BT, None, valid_BT, None)


def exit_logits(model, k: int, h: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Logits of exit ``k`` (any leading shape): the last exit is the model's final norm and head."""
    n_exits = len(model.exits.norms) + 1
    if k == n_exits - 1:
        return model.head(model.final_norm(h))
    normed = model.exits.norms[k](h)
    if model.exits.heads is None:
        return model.head(normed)
    return model.exits.heads[k](normed)


def full_states(model, x_BT: torch.Tensor, valid_BT: torch.Tensor | None = None) -> list[torch.Tensor]:  # noqa: ANN001
    """[h^0 (embedding), h^1, ..., h^L]: every layer on every token."""
    ctx = context(model, x_BT, valid_BT)
    hs = [model.embed(x_BT)]
    for i, layer in enumerate(model.layers):
        hs.append(layer(hs[-1], ctx.for_layer(i)))
    return hs


def logsumexp(v: torch.Tensor) -> torch.Tensor:
    m = v.max()
    return m + torch.log(torch.exp(v - m).sum())


def cross_entropy(logits_BTV: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
    """Mean of -log p(y_t) over the targets that are not IGNORE, one token at a time."""
    B, T, _ = logits_BTV.shape
    total, n = logits_BTV.new_zeros(()), 0
    for b in range(B):
        for t in range(T):
            y = int(y_BT[b, t])
            if y == IGNORE:
                continue
            total = total + logsumexp(logits_BTV[b, t]) - logits_BTV[b, t, y]
            n += 1
    return total / n


def log_likelihoods(logits_BTV: torch.Tensor, y_BT: torch.Tensor) -> list[list[float]]:
    B, T, _ = logits_BTV.shape
    return [[0.0 if int(y_BT[b, t]) == IGNORE else
             float(logits_BTV[b, t, int(y_BT[b, t])] - logsumexp(logits_BTV[b, t])) for t in range(T)]
            for b in range(B)]


def correctness(logits_BTV: torch.Tensor, y_BT: torch.Tensor) -> list[list[float]]:
    B, T, _ = logits_BTV.shape
    out = []
    for b in range(B):
        row = []
        for t in range(T):
            v = logits_BTV[b, t].tolist()
            best = max(range(len(v)), key=lambda j: (v[j], -j))  # the first maximum
            row.append(1.0 if best == int(y_BT[b, t]) else 0.0)
        out.append(row)
    return out


# -- training ------------------------------------------------------------------------------------
def aligned(model, x_BT: torch.Tensor, y_BT: torch.Tensor, layers: list[int] | None, weights: list[float]  # noqa: ANN001
            ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(objective, per-exit CE, last exit's logits): every token through every layer."""
    ex = exit_layers(len(model.layers), layers)
    hs = full_states(model, x_BT)
    ces = [cross_entropy(exit_logits(model, k, hs[layer + 1]), y_BT) for k, layer in enumerate(ex)]
    obj = sum(w * c for w, c in zip(weights, ces, strict=True)) / sum(weights)
    return obj, ces, exit_logits(model, len(ex) - 1, hs[-1])


def dropout_rate(p_max: float, layer: int, n_layers: int) -> float:
    """LayerSkip: p_l = p_max (exp(l ln 2 / (L - 1)) - 1)."""
    return p_max * (math.exp(layer * math.log(2) / (n_layers - 1)) - 1) if n_layers > 1 else 0.0


def draw_keeps(B: int, n_layers: int, p_max: float) -> list[list[bool] | None]:
    """The keep decisions of one pass, drawn like the model: one uniform per sample per layer with p > 0."""
    keeps = []
    for i in range(n_layers):
        p = dropout_rate(p_max, i, n_layers)
        if p <= 0:
            keeps.append(None)
        else:
            u = torch.rand(B)
            keeps.append([not bool(u[b] < p) for b in range(B)])
    return keeps


def layer_per_sample(model, i: int, h_BTD: torch.Tensor, x_BT: torch.Tensor,  # noqa: ANN001
                     keep_B: list[bool] | None) -> torch.Tensor:
    """Layer ``i`` on each sample alone; a dropped sample's state passes through unchanged."""
    if keep_B is None:
        return model.layers[i](h_BTD, context(model, x_BT).for_layer(i))
    rows = []
    for b in range(h_BTD.shape[0]):
        if keep_B[b]:
            rows.append(model.layers[i](h_BTD[b:b + 1], context(model, x_BT[b:b + 1]).for_layer(i))[0])
        else:
            rows.append(h_BTD[b])
    return torch.stack(rows)


def aligned_with_dropout(model, x_BT: torch.Tensor, y_BT: torch.Tensor, layers: list[int] | None,  # noqa: ANN001
                         weights: list[float], keeps: list[list[bool] | None]
                         ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    ex = exit_layers(len(model.layers), layers)
    h = model.embed(x_BT)
    states = []
    for i in range(len(model.layers)):
        h = layer_per_sample(model, i, h, x_BT, keeps[i])
        states.append(h)
    ces = [cross_entropy(exit_logits(model, k, states[layer]), y_BT) for k, layer in enumerate(ex)]
    obj = sum(w * c for w, c in zip(weights, ces, strict=True)) / sum(weights)
    return obj, ces, exit_logits(model, len(ex) - 1, states[-1])


def given_depth(model, x_BT: torch.Tensor, depth_BT: torch.Tensor, layers: list[int] | None,  # noqa: ANN001
                keeps: list[list[bool] | None] | None = None, copy_up: bool = True) -> torch.Tensor:
    """Logits when token t computes ``depth_t`` layers: layer i updates t only if depth_t > i, otherwise t's
    state is copied upward (later tokens attend to the copy); each token is read at its own exit.
    ``copy_up=False`` is the wrong policy (every state computed at full depth), a control."""
    ex = exit_layers(len(model.layers), layers)
    B, T = x_BT.shape
    h = model.embed(x_BT)
    at_exit: dict[tuple[int, int], torch.Tensor] = {}
    for i in range(len(model.layers)):
        out = layer_per_sample(model, i, h, x_BT, None if keeps is None else keeps[i])
        new = []
        for b in range(B):
            row = []
            for t in range(T):
                d = int(depth_BT[b, t])
                row.append(out[b, t] if (d > i or not copy_up) else h[b, t])
                if d == i + 1:
                    at_exit[b, t] = out[b, t]
            new.append(torch.stack(row))
        h = torch.stack(new)
    logits = []
    for b in range(B):
        row = []
        for t in range(T):
            d = int(depth_BT[b, t])
            k = ex.index(d - 1)
            state = h[b, t] if copy_up else at_exit[b, t]
            row.append(exit_logits(model, k, state))
        logits.append(torch.stack(row))
    return torch.stack(logits)


# -- inference: confidence exits -------------------------------------------------------------------
def confidence(kind: str, logits_V: torch.Tensor, h_D: torch.Tensor, h_prev_D: torch.Tensor) -> float:
    if kind == "cosine":
        a, b = h_D.tolist(), h_prev_D.tolist()
        na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
        return sum(u * v for u, v in zip(a, b, strict=True)) / (na * nb)
    p = torch.exp(logits_V - logsumexp(logits_V))
    s = sorted(p.tolist(), reverse=True)
    return s[0] if kind == "softmax" else s[0] - s[1]


def decide(model, x_BT: torch.Tensor, layers: list[int] | None, stop,  # noqa: ANN001
           valid_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Token by token, layer by layer: a token exits at the first exit k (before the last) where
    ``stop(k, logits, h, h_prev)`` says so; exited states are copied upward. Returns (logits, depth, info) with
    info["scores"][k] the list of (score) values ``stop`` returned for the tokens still running at exit k."""
    n_layers = len(model.layers)
    ex = exit_layers(n_layers, layers)
    B, T = x_BT.shape
    ctx = context(model, x_BT, valid_BT)
    h = model.embed(x_BT)
    exited = [[False] * T for _ in range(B)]
    depth = [[n_layers] * T for _ in range(B)]
    chosen: dict[tuple[int, int], torch.Tensor] = {}
    scores: dict[int, list[float]] = {}
    for i in range(n_layers):
        out = model.layers[i](h, ctx.for_layer(i))
        h_prev = h
        h = torch.stack([torch.stack([h_prev[b, t] if exited[b][t] else out[b, t] for t in range(T)])
                         for b in range(B)])
        if i not in ex or i == n_layers - 1:
            continue
        k = ex.index(i)
        for b in range(B):
            for t in range(T):
                if exited[b][t]:
                    continue
                lg = exit_logits(model, k, h[b, t])
                go, score = stop(k, lg, h[b, t], h_prev[b, t], b, t)
                scores.setdefault(k, []).append(score)
                if go:
                    exited[b][t], depth[b][t], chosen[b, t] = True, i + 1, lg
    logits = torch.stack([torch.stack([chosen[b, t] if exited[b][t] else exit_logits(model, len(ex) - 1, h[b, t])
                                       for t in range(T)]) for b in range(B)])
    return logits, torch.tensor(depth), {"scores": scores}


def confidence_policy(kind: str, thresholds: list[float]):  # noqa: ANN201
    def stop(k, lg, h, h_prev, b, t):  # noqa: ANN001, ANN202
        c = confidence(kind, lg, h, h_prev)
        return c > thresholds[k], c
    return stop


# -- halting ---------------------------------------------------------------------------------------
def dot(w: torch.Tensor, h: torch.Tensor) -> float:
    return sum(a * b for a, b in zip(w.tolist(), h.tolist(), strict=True))


def log_softmax_list(z: list[float]) -> list[float]:
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def log_q_sequence(W: torch.Tensor, bias: torch.Tensor, h1_BTD: torch.Tensor,
                   valid_BT: torch.Tensor | None) -> list[list[list[float]]]:
    """log softmax(W mean_{s<=t}(h1_s) + b) [b][t]: the mean over the valid tokens of each prefix 0..t (causal
    sequence pooling); a prefix with no valid token pools to 0."""
    B, T, D = h1_BTD.shape
    out = []
    for b in range(B):
        row = []
        for t in range(T):
            ts = [s for s in range(t + 1) if valid_BT is None or bool(valid_BT[b, s])]
            rows = [h1_BTD[b, s].tolist() for s in ts]
            pooled = [sum(r[d] for r in rows) / max(len(ts), 1) for d in range(D)]
            z = [sum(w * v for w, v in zip(W[n].tolist(), pooled, strict=True)) + float(bias[n])
                 for n in range(W.shape[0])]
            row.append(log_softmax_list(z))
        out.append(row)
    return out


def log_q_token(W: torch.Tensor, bias: torch.Tensor, h1_BTD: torch.Tensor) -> list[list[list[float]]]:
    B, T, _ = h1_BTD.shape
    return [[log_softmax_list([dot(W[n], h1_BTD[b, t]) + float(bias[n]) for n in range(W.shape[0])])
             for t in range(T)] for b in range(B)]


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def q_geometric(W: torch.Tensor, bias: torch.Tensor, states: list[torch.Tensor]) -> list[list[list[float]]]:
    """q_t(n) = chi_n prod_{n'<n} (1 - chi_n'), the last exit the remaining mass; chi_n = sigmoid(w_n.h^n + b_n).
    ``states``: the exit states, one (B, T, D) per exit (the last one is not read)."""
    B, T, _ = states[0].shape
    n_rows = W.shape[0]
    out = []
    for b in range(B):
        row = []
        for t in range(T):
            chi = [sigmoid(dot(W[n], states[n][b, t]) + float(bias[n])) for n in range(n_rows)]
            q, go = [], 1.0
            for n in range(n_rows):
                q.append(chi[n] * go)
                go *= 1 - chi[n]
            q.append(go)
            row.append(q)
        out.append(row)
    return out


def oracle(ll: list[list[list[float]]], correct: list[list[list[float]]], depths: list[int],
           valid: list[list[bool]], kind: str, lam: float, sigma: float, per_sequence: bool) -> list:
    """argmax_n (score_n - lam * depth_n), ties to the shallower exit; per token [b][t] or per sequence [b].
    ll / correct: [b][t][n]."""
    B, T, E = len(ll), len(ll[0]), len(depths)
    score = ll if kind in ("likelihood", "smoothed") else correct
    if kind.startswith("smoothed"):
        smoothed = []
        for b in range(B):
            row = []
            for t in range(T):  # DAT: the scores convolved with the kernel (a sum, not an average)
                num = [0.0] * E
                for s in range(T):
                    if not valid[b][s]:
                        continue
                    w = math.exp(-((t - s) ** 2) / sigma)
                    for n in range(E):
                        num[n] += w * score[b][s][n]
                row.append(num)
            smoothed.append(row)
        score = smoothed

    def best(values: list[float]) -> int:
        k = 0
        for n in range(1, E):
            if values[n] - lam * depths[n] > values[k] - lam * depths[k]:
                k = n
        return k

    if per_sequence:
        return [best([sum(score[b][t][n] for t in range(T) if valid[b][t]) for n in range(E)]) for b in range(B)]
    return [[best(score[b][t]) for t in range(T)] for b in range(B)]
