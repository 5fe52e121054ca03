"""Depth-adaptive Transformer (Elbayad et al. 2020), with CALM's confidences and LayerSkip's training.

Exit classifiers after chosen layers predict the next token from an intermediate state, so a token that
is easy can stop computing early. The last layer's exit is the model's own final norm and head.

**Heads.** ``shared``: every exit uses the LM head, after its own norm (the states of different depths
have different scales). ``separate``: one norm and one head per exit.

**Training.** ``aligned``: every token runs every layer and the loss is the weighted mean of the exits'
cross-entropies, sum_n w_n CE_n / sum_n w_n. ``mixed``: M random exit sequences per batch; a token that
exits at n has its state copied upward (h^m := h^n for m > n), so later tokens attend to the copies as they
will at inference. LayerSkip's layer dropout skips layer l for a whole sample with probability
p_max (2^(l/(L-1)) - 1), computing only the kept rows.

**Depth.** Confidence exits (no extra module): a token exits at the first exit whose confidence (max
probability, top-1 minus top-2 gap, or cosine of the states around the layer) exceeds that exit's
threshold. Or a halting module trained against an oracle: ``sequence`` (DAT's sequence-specific depth from
the mean first-layer state, pooled causally: token t's depth comes from the mean over positions 0..t, so a
decoder's evaluation and generation never see later tokens; trained towards the whole sequence's oracle
depth), ``token`` (a depth per token from its first-layer state) or ``geometric`` (a halting probability
chi_n at every exit, q(n) = chi_n prod_{n'<n}(1 - chi_n'); exit when chi_n > tau).

**The KV policy for exited tokens** is state propagation (DAT, CALM): a token that exits at layer n keeps
its exit state h^n as its state in every higher layer, and those layers' keys and values for it are
computed from that copied state. In a full forward pass this is ``h^m = where(exited, h^{m-1}, layer(h^{m-1}))``;
in cached decoding (:class:`ExitDecoder`) a layer above the exit computes nothing for the token until a
later token reaches it, and then only its key and value (``append_kv``), for all pending tokens at once.
Cached decoding therefore gives the same logits as a full forward pass with the same exit decisions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from condformer.config import ExitConfig, ModelConfig
from condformer.context import Context, Tally
from condformer.errors import CondformerError
from condformer.layers.norms import make_norm

IGNORE_INDEX = -100


def layer_dropout_rate(p_max: float, layer: int, n_layers: int) -> float:
    """LayerSkip's rate for layer ``layer`` (0-based): 0 at the first layer, ``p_max`` at the last."""
    if n_layers < 2:
        return 0.0
    return p_max * (math.exp(layer * math.log(2) / (n_layers - 1)) - 1)


def confidence(kind: str, logits_BTV: torch.Tensor, h_BTD: torch.Tensor, h_prev_BTD: torch.Tensor) -> torch.Tensor:
    """CALM's confidence of an exit, per token (B, T), in float32 or wider."""
    if kind == "cosine":  # needs no logits: the head runs only where a token exits
        wide = torch.promote_types(h_BTD.dtype, torch.float32)
        return F.cosine_similarity(h_BTD.to(wide), h_prev_BTD.to(wide), dim=-1)
    wide = torch.promote_types(logits_BTV.dtype, torch.float32)
    probs = logits_BTV.to(wide).softmax(dim=-1)
    if kind == "softmax":
        return probs.max(dim=-1).values
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def target_log_likelihood(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """log p(y_t) per token (B, T); 0 where the target is ignored."""
    logp = logits_BTV.to(torch.promote_types(logits_BTV.dtype, torch.float32)).log_softmax(dim=-1)
    valid = targets_BT != IGNORE_INDEX
    ll = logp.gather(-1, targets_BT.clamp(min=0)[..., None]).squeeze(-1)
    return ll * valid


def rbf_smooth(x_BTE: torch.Tensor, valid_BT: torch.Tensor, sigma: float) -> torch.Tensor:
    """x convolved over the valid positions with the RBF kernel exp(-(t - t')^2 / sigma) (DAT's smoothing).

    A convolution, as in the paper, not a kernel-weighted average: the smoothed score of a token in the
    middle of a confident stretch grows with the stretch, which is what lets it outweigh the depth penalty.
    (The two pick different exits once the penalty is > 0.)
    """
    T = x_BTE.shape[1]
    t = torch.arange(T, device=x_BTE.device, dtype=x_BTE.dtype)
    kernel_TT = torch.exp(-((t[:, None] - t[None, :]) ** 2) / sigma)
    return torch.einsum("ts,bse->bte", kernel_TT, x_BTE * valid_BT.to(x_BTE.dtype)[..., None])


def prefix_mean(x_BTD: torch.Tensor, valid_BT: torch.Tensor | None) -> torch.Tensor:
    """The mean of x over each position's valid prefix 0..t (B, T, D): sequence pooling a decoder may use.

    Accumulated in at least float32 (a bf16 running sum loses the late tokens); padding is left out, and a
    position with no valid token before it gets 0.
    """
    x = _wide(x_BTD)
    if valid_BT is not None:
        x = x * valid_BT.to(x.dtype)[..., None]
        count_BT = valid_BT.to(x.dtype).cumsum(dim=1)
    else:
        count_BT = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype).expand(x.shape[:2])
    return x.cumsum(dim=1) / count_BT.clamp_min(1)[..., None]


def oracle_exits(ll_BTE: torch.Tensor, correct_BTE: torch.Tensor, depths_E: torch.Tensor, valid_BT: torch.Tensor,
                 kind: str, lam: float, sigma: float, per_sequence: bool) -> torch.Tensor:
    """The oracle's exit index: argmax_n (score_n - lam * depth_n), per token (B, T) or per sequence (B,).

    ``score`` is the target's log-likelihood at each exit (``likelihood``), its RBF-smoothed version
    (``smoothed``), whether the exit's argmax is the target (``correctness``) or that smoothed. Per
    sequence, scores are summed over the sequence's valid tokens. Ties go to the shallower exit.
    """
    score = ll_BTE if kind in ("likelihood", "smoothed") else correct_BTE.to(ll_BTE.dtype)
    if kind.startswith("smoothed"):
        score = rbf_smooth(score, valid_BT, sigma)
    penalty = lam * depths_E.to(score.dtype)
    if per_sequence:
        return ((score * valid_BT[..., None]).sum(dim=1) - penalty).argmax(dim=-1)
    return (score - penalty).argmax(dim=-1)


class Halting(nn.Module):
    """A learned depth estimator over the exits (see the module docstring for the three kinds)."""

    def __init__(self, cfg: ModelConfig, kind: str, n_exits: int) -> None:
        super().__init__()
        self.kind, self.n_exits = kind, n_exits
        d = cfg.d_model
        rows = n_exits - 1 if kind == "geometric" else n_exits
        self.weight = nn.Parameter(torch.randn(rows, d) * cfg.init_std)
        self.bias = nn.Parameter(torch.zeros(rows))

    def log_q_first(self, h1_BTD: torch.Tensor, valid_BT: torch.Tensor | None) -> torch.Tensor:
        """log q_t(n) (B, T, E) from the first-layer states: ``token`` from h1_t, ``sequence`` from their mean
        over the prefix 0..t (causal: a token's depth never depends on later tokens)."""
        if self.kind == "sequence":
            h1_BTD = prefix_mean(h1_BTD, valid_BT)
        return self.log_q(h1_BTD)

    def log_q(self, pooled_xD: torch.Tensor) -> torch.Tensor:
        """log q(n) (..., E) of a (pooled) first-layer state (..., D)."""
        return _wide(F.linear(pooled_xD, self.weight.to(pooled_xD.dtype), self.bias.to(pooled_xD.dtype))).log_softmax(
            dim=-1)

    def halt_logit(self, k: int, h_BTD: torch.Tensor) -> torch.Tensor:
        """``geometric``: the logit of chi at exit k (B, T)."""
        return _wide(h_BTD @ self.weight[k].to(h_BTD.dtype) + self.bias[k].to(h_BTD.dtype))

    def log_q_geometric(self, exit_states: list[torch.Tensor]) -> torch.Tensor:
        """log q_t(n) (B, T, E): chi_n prod_{n'<n} (1 - chi_n'), the last exit taking the remaining mass."""
        z = torch.stack([self.halt_logit(k, h) for k, h in enumerate(exit_states[: self.n_exits - 1])], dim=-1)
        log_stop, log_go = F.logsigmoid(z), F.logsigmoid(-z)
        before = torch.cumsum(log_go, dim=-1) - log_go  # sum over n' < n of log(1 - chi_n')
        return torch.cat([log_stop + before, log_go.sum(dim=-1, keepdim=True)], dim=-1)


class _Exiting:
    """Which tokens have stopped, at which depth, with which logits, during an inference pass."""

    def __init__(self, B: int, T: int, n_layers: int, device: torch.device) -> None:
        self.depth = torch.full((B, T), n_layers, dtype=torch.long, device=device)
        self.exited = torch.zeros(B, T, dtype=torch.bool, device=device)
        self.chosen: torch.Tensor | None = None

    def stop(self, now_BT: torch.Tensor, logits_BTV: torch.Tensor, depth: int) -> None:
        self.chosen = logits_BTV if self.chosen is None else torch.where(now_BT[..., None], logits_BTV, self.chosen)
        self.depth = torch.where(now_BT, depth, self.depth)
        self.exited = self.exited | now_BT

    def logits(self, final: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Each token's logits: its exit's, or the last layer's (``final()``, computed only if a token needs it)."""
        if self.chosen is not None and bool(self.exited.all()):
            return self.chosen
        out = final()
        return out if self.chosen is None else torch.where(self.exited[..., None], self.chosen, out)


@dataclass
class ExitResult:
    logits: torch.Tensor
    loss: torch.Tensor | None
    objective: torch.Tensor | None = None  # what training minimises instead of ``loss`` (the exits' weighted mean)


class EarlyExit(nn.Module):
    """Exit heads, the halting module and the exit-aware layer loop of a :class:`~condformer.model.Transformer`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e: ExitConfig = cfg.exits
        self.spec, self.n_layers = e, cfg.n_layers
        self.exit_layers = e.exit_layers(cfg.n_layers)
        self.exit_of_layer = {layer: k for k, layer in enumerate(self.exit_layers)}
        n_exits = len(self.exit_layers)
        self.register_buffer("depths", torch.tensor([layer + 1 for layer in self.exit_layers]), persistent=False)
        self.norms = nn.ModuleList(make_norm(cfg.norm, cfg.d_model, cfg.norm_eps) for _ in range(n_exits - 1))
        self.heads: nn.ModuleList | None = None
        if e.head == "separate":
            self.heads = nn.ModuleList(nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) for _ in range(n_exits - 1))
            for head in self.heads:
                nn.init.normal_(head.weight, std=cfg.init_std)
        self.halting = Halting(cfg, e.halting, n_exits) if e.halting != "none" else None
        if isinstance(e.weights, str):
            w = [1.0] * n_exits if e.weights == "uniform" else [float(layer + 1) for layer in self.exit_layers]
        else:
            w = [float(x) for x in e.weights]
        # unnormalised: normalised in the loss's own dtype (a float64 model gets a float64 objective)
        self.register_buffer("weights", torch.tensor(w, dtype=torch.float64), persistent=False)
        # the inference policy; ``set_exit_thresholds`` overrides the config's thresholds at run time
        self.thresholds: list[float | None] | None = (
            None if e.thresholds is None else [None if t is None else float(t) for t in e.thresholds])

    @property
    def n_exits(self) -> int:
        return len(self.exit_layers)

    def policy(self) -> str:
        """How inference picks depths: ``halting``, ``confidence`` (thresholds set) or ``full``."""
        if self.halting is not None:
            return "halting"
        return "confidence" if self.thresholds is not None else "full"

    # -- heads ---------------------------------------------------------------------------------
    def exit_logits(self, k: int, h_BTD: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """Logits of exit ``k`` (B, T, V); the last exit is the model's final norm and head."""
        if k == self.n_exits - 1:
            return model.head(model.final_norm(h_BTD))
        head = model.head if self.heads is None else self.heads[k]
        return head(self.norms[k](h_BTD))

    def logits_at_exits(self, h_BTD: torch.Tensor, k_BT: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """Each token's logits at its own exit ``k_BT`` (B, T, V): per-exit norms, then one head matmul (shared)."""
        if self.heads is None:
            normed = model.final_norm(h_BTD)
            for k, norm in enumerate(self.norms):
                normed = torch.where((k_BT == k)[..., None], norm(h_BTD), normed)
            return model.head(normed)
        out = model.head(model.final_norm(h_BTD))
        for k in range(self.n_exits - 1):
            out = torch.where((k_BT == k)[..., None], self.exit_logits(k, h_BTD, model), out)
        return out

    # -- the layer loop ------------------------------------------------------------------------
    def run_layer(self, model: nn.Module, i: int, h_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Layer ``i``, with LayerSkip's per-sample layer dropout in training (only kept rows are computed)."""
        layer = model.layers[i]
        p = layer_dropout_rate(self.spec.layer_dropout, i, self.n_layers) if self.training else 0.0
        if p <= 0:
            return layer(h_BTD, ctx.for_layer(i))
        keep_B = torch.rand(h_BTD.shape[0], device=h_BTD.device) >= p
        idx_B = keep_B.nonzero().squeeze(1)
        ctx.tally.stat(i, "exit_layer_kept", keep_B.float().mean())
        # run even on zero rows: every parameter then gets a (zero) gradient, as DDP expects
        out = layer(h_BTD.index_select(0, idx_B), ctx.rows(idx_B).for_layer(i))
        return h_BTD.index_copy(0, idx_B, out)

    def forward(self, model: nn.Module, h_BTD: torch.Tensor, ctx: Context, targets_BT: torch.Tensor | None,
                depth_BT: torch.Tensor | None = None) -> ExitResult:
        if depth_BT is not None:
            return self._given(model, h_BTD, ctx, targets_BT, depth_BT)
        if self.training:
            if self.spec.training == "mixed" and targets_BT is not None:
                return self._mixed(model, h_BTD, ctx, targets_BT)
            return self._aligned(model, h_BTD, ctx, targets_BT)
        if ctx.cache is not None or self.policy() == "full":
            # prefill of a cached generation runs the prompt at full depth
            for i in range(self.n_layers):
                h_BTD = model.layers[i](h_BTD, ctx.for_layer(i))
            logits = self.exit_logits(self.n_exits - 1, h_BTD, model)
            return ExitResult(logits, _ce(logits, targets_BT))
        return self._decide(model, h_BTD, ctx, targets_BT)

    def _aligned(self, model: nn.Module, h_BTD: torch.Tensor, ctx: Context,
                 targets_BT: torch.Tensor | None) -> ExitResult:
        states, h1 = [], None
        for i in range(self.n_layers):
            h_BTD = self.run_layer(model, i, h_BTD, ctx)
            if i == 0:
                h1 = h_BTD
            if i in self.exit_of_layer:
                states.append(h_BTD)
        logits = [self.exit_logits(k, s, model) for k, s in enumerate(states)]
        if targets_BT is None:
            return ExitResult(logits[-1], None)
        # a list, not a stacked tensor: returning views of one tensor as loss and statistics breaks compile
        losses = [_ce(lg, targets_BT) for lg in logits]
        for k, layer in enumerate(self.exit_layers):
            ctx.tally.stat(layer, "exit_loss", losses[k])
        w = self.weights.to(losses[0].dtype)
        objective = sum(w[k] * loss for k, loss in enumerate(losses)) / w.sum()
        if self.halting is not None:
            self._halting_loss(h1, states, logits, targets_BT, ctx)
        return ExitResult(logits[-1], losses[-1], objective)

    def _halting_loss(self, h1_BTD: torch.Tensor, states: list[torch.Tensor], logits: list[torch.Tensor],
                      targets_BT: torch.Tensor, ctx: Context) -> None:
        e, halting = self.spec, self.halting
        valid_BT = targets_BT != IGNORE_INDEX
        if ctx.valid_BT is not None:
            valid_BT = valid_BT & ctx.valid_BT
        with torch.no_grad():
            ll_BTE = torch.stack([target_log_likelihood(lg, targets_BT) for lg in logits], dim=-1)
            correct_BTE = torch.stack([lg.argmax(dim=-1) == targets_BT for lg in logits], dim=-1)
            per_sequence = halting.kind == "sequence"
            target = oracle_exits(ll_BTE, correct_BTE, self.depths, valid_BT, e.oracle, e.oracle_lambda,
                                  e.oracle_sigma, per_sequence)
        detach = (lambda t: t.detach()) if e.halting_detach else (lambda t: t)
        if halting.kind == "geometric":
            log_q = halting.log_q_geometric([detach(s) for s in states])
        else:
            log_q = halting.log_q_first(detach(h1_BTD), ctx.valid_BT)
        if per_sequence:  # every prefix's pooled state learns the whole sequence's oracle depth
            depth = self.depths[target].float().mean()
            target = target[:, None].expand(valid_BT.shape)
        nll = -log_q.gather(-1, target[..., None]).squeeze(-1)
        w = valid_BT.to(nll.dtype)
        loss = (nll * w).sum() / w.sum().clamp_min(1)
        if not per_sequence:
            depth = (self.depths[target].float() * w).sum() / w.sum().clamp_min(1)
        ctx.tally.loss("exit_halting", e.halting_alpha * loss)
        ctx.tally.stat(None, "exit_halting_loss", loss)
        ctx.tally.stat(None, "exit_oracle_depth", depth)

    def _mixed(self, model: nn.Module, h0_BTD: torch.Tensor, ctx: Context, targets_BT: torch.Tensor) -> ExitResult:
        """DAT's mixed training: M sampled exit sequences, exited states copied upward, mean of the exits' CE.

        ``loss`` is the last layer's, as for aligned training (what evaluation and the log compare across
        runs); it costs one more forward pass, without gradients and with its statistics discarded.
        """
        B, T, _ = h0_BTD.shape
        total, logits = None, None
        for _ in range(self.spec.mixed_samples):
            k_BT = torch.randint(0, self.n_exits, (B, T), device=h0_BTD.device)
            result = self._given(model, h0_BTD, ctx, targets_BT, self.depths[k_BT], k_BT)
            total = result.loss if total is None else total + result.loss
            logits = result.logits
        objective = total / self.spec.mixed_samples
        with torch.no_grad():
            quiet, h_BTD = dataclasses.replace(ctx, tally=Tally(), accumulate=False), h0_BTD
            for i in range(self.n_layers):
                h_BTD = model.layers[i](h_BTD, quiet.for_layer(i))
            last = _ce(self.exit_logits(self.n_exits - 1, h_BTD, model), targets_BT)
        return ExitResult(logits, last, objective)

    def _given(self, model: nn.Module, h_BTD: torch.Tensor, ctx: Context, targets_BT: torch.Tensor | None,
               depth_BT: torch.Tensor, k_BT: torch.Tensor | None = None) -> ExitResult:
        """Each token computes ``depth_BT`` layers (an exit's depth), then its state is copied upward.

        ``k_BT``: the exits of those depths when the caller drew them (mixed training), which skips the check
        (and its host sync) that a caller's depths belong to exits.
        """
        if k_BT is None:
            k_BT = self.exit_index_of_depth(depth_BT)
        for i in range(self.n_layers):
            out = self.run_layer(model, i, h_BTD, ctx)
            h_BTD = torch.where((depth_BT > i)[..., None], out, h_BTD)
        logits = self.logits_at_exits(h_BTD, k_BT, model)
        self._depth_stats(depth_BT, ctx)
        return ExitResult(logits, _ce(logits, targets_BT))

    def exit_index_of_depth(self, depth_BT: torch.Tensor) -> torch.Tensor:
        """The exit index of each depth; a depth that is no exit's is a one-line error."""
        depths = self.depths.to(depth_BT.device)
        match = depth_BT[..., None] == depths
        if not bool(match.any(dim=-1).all()):
            raise CondformerError(f"exit depths must be among the exits' depths {depths.tolist()}, got "
                                  f"{sorted(set(depth_BT.flatten().tolist()) - set(depths.tolist()))}")
        return match.to(torch.long).argmax(dim=-1)

    def _decide(self, model: nn.Module, h_BTD: torch.Tensor, ctx: Context,
                targets_BT: torch.Tensor | None) -> ExitResult:
        """Inference: each token exits where the policy says; exited states are copied upward."""
        B, T, _ = h_BTD.shape
        state = _Exiting(B, T, self.n_layers, h_BTD.device)
        planned = None
        for i in range(self.n_layers):
            out = model.layers[i](h_BTD, ctx.for_layer(i))
            h_prev, h_BTD = h_BTD, torch.where(state.exited[..., None], h_BTD, out)
            if i == 0 and self.halting is not None and self.halting.kind != "geometric":
                planned = self.halting.log_q_first(h_BTD, ctx.valid_BT).argmax(dim=-1)
            self.check_exit(i, h_BTD, h_prev, planned, state, model)
            if bool(state.exited.all()):  # no token needs the layers above: nothing attends to them here
                break
        logits = state.logits(lambda: self.exit_logits(self.n_exits - 1, h_BTD, model))
        self._depth_stats(state.depth, ctx)
        return ExitResult(logits, _ce(logits, targets_BT))

    def check_exit(self, i: int, h_BTD: torch.Tensor, h_prev_BTD: torch.Tensor, planned_BT: torch.Tensor | None,
                   state: _Exiting, model: nn.Module) -> None:
        """After layer ``i``: the tokens that stop at its exit (if it has a checked one) join ``state``."""
        k = self.exit_of_layer.get(i)
        if k is None or k == self.n_exits - 1 or not self.checks(k):
            return
        logits_k = self.exit_logits(k, h_BTD, model)
        state.stop(self.exits_now(k, logits_k, h_BTD, h_prev_BTD, planned_BT) & ~state.exited, logits_k, i + 1)

    def exits_now(self, k: int, logits_BTV: torch.Tensor, h_BTD: torch.Tensor, h_prev_BTD: torch.Tensor,
                  planned_BT: torch.Tensor | None) -> torch.Tensor:
        """Whether each token stops at exit ``k`` (< the last, checked: see :meth:`checks`) under the policy."""
        if self.halting is not None:
            if self.halting.kind == "geometric":
                return torch.sigmoid(self.halting.halt_logit(k, h_BTD)) > self.spec.halting_tau
            return planned_BT == k
        return confidence(self.spec.confidence, logits_BTV, h_BTD, h_prev_BTD) > self.thresholds[k]

    def checks(self, k: int) -> bool:
        """Whether inference evaluates exit ``k`` (< the last) at all: off without thresholds or with a null one."""
        if self.halting is not None:
            return True
        return self.thresholds is not None and self.thresholds[k] is not None

    def _depth_stats(self, depth_BT: torch.Tensor, ctx: Context) -> None:
        valid = ctx.valid_BT
        d = depth_BT.float()
        mean = d.mean() if valid is None else (d * valid).sum() / valid.sum().clamp_min(1)
        ctx.tally.stat(None, "exit_avg_depth", mean)
        for layer in self.exit_layers:
            hit = (depth_BT == layer + 1).float()
            ctx.tally.stat(layer, "exit_frac", hit.mean() if valid is None else (hit * valid).sum()
                           / valid.sum().clamp_min(1))
        if ctx.tally.tracing:  # the depth per token, and per layer which tokens it computed (the heatmap's rows)
            ctx.tally.traces["exit_depth"] = depth_BT.detach()
            for i in range(self.n_layers):
                ctx.tally.trace(i, "exit_computed", depth_BT > i)

    # -- cost ----------------------------------------------------------------------------------
    @staticmethod
    def flops(cfg: ModelConfig, seq_len: int) -> int:
        """Forward FLOPs of the exits before the last (their heads) and of the halting module, per sequence.

        Counted for every exit: aligned training computes all of them, and confidence inference computes
        each exit a token passes. Mixed training's M passes are counted by the caller.
        """
        e = cfg.exits
        if e is None:
            return 0
        n_exits = len(e.exit_layers(cfg.n_layers))
        flops = 2 * seq_len * cfg.d_model * cfg.vocab_size * (n_exits - 1)
        if e.halting == "geometric":
            flops += 2 * seq_len * cfg.d_model * (n_exits - 1)
        elif e.halting in ("token", "sequence"):  # one projection per token (sequence: of its prefix's mean)
            flops += 2 * seq_len * cfg.d_model * n_exits
        return flops


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 logits are too coarse for a softmax), float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _ce(logits_BTV: torch.Tensor, targets_BT: torch.Tensor | None) -> torch.Tensor | None:
    if targets_BT is None:
        return None
    return F.cross_entropy(_wide(logits_BTV).flatten(0, 1), targets_BT.flatten(), ignore_index=IGNORE_INDEX)


def set_exit_thresholds(model: nn.Module, thresholds: float | list[float] | None) -> None:
    """Override a model's confidence thresholds at run time (a scalar applies to every exit; None: full depth)."""
    exits = getattr(model, "exits", None)
    if exits is None:
        raise CondformerError("this model has no early exits; train an exit preset (e.g. tiny-exit) to use "
                              "--exit-threshold")
    if exits.halting is not None and thresholds is not None:
        raise CondformerError("this model's depth comes from its halting module; --exit-threshold is for "
                              "confidence exits")
    if thresholds is None:
        exits.thresholds = None
        return
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        thresholds = [float(thresholds)] * (exits.n_exits - 1)
    if not isinstance(thresholds, (list, tuple)) or any(
            t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))) for t in thresholds):
        raise CondformerError(f"exit thresholds must be a number or a list of numbers (None: that exit off), "
                              f"got {thresholds!r}")
    if len(thresholds) != exits.n_exits - 1:
        raise CondformerError(f"give one threshold or {exits.n_exits - 1} (one per exit before the last), "
                              f"got {len(thresholds)}")
    exits.thresholds = [None if t is None else float(t) for t in thresholds]


@dataclass
class DecodeStats:
    """Depths of the tokens one generation decoded, for the exit-depth histogram."""

    depths: list[int] = field(default_factory=list)

    def histogram(self, n_layers: int) -> list[int]:
        return [self.depths.count(d) for d in range(1, n_layers + 1)]

    @property
    def mean_depth(self) -> float | None:
        return sum(self.depths) / len(self.depths) if self.depths else None


class ExitDecoder:
    """Cached decoding with early exits: one token per row per step, exited states propagated lazily.

    A row that exits at layer n skips the layers above. While another row of the batch still needs a layer,
    the exited row runs it on its copied state (static shapes) and its output is dropped. When every row
    has exited, the step's states wait in a per-layer *pending* list; the next token that reaches that layer
    first computes their keys and values (``append_kv``, no query, no FFN) in one batch, then attends.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model, self.exits = model, model.exits
        for i, layer in enumerate(model.layers):
            if not hasattr(layer, "append_kv"):
                raise CondformerError(f"layer {i}'s router ({type(layer).__name__}) cannot compute keys and values "
                                      f"for exited tokens; early-exit generation needs dense or MoD routers")
        self.pending: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in model.layers]
        # sequence halting: the running sum and count of each row's first-layer states (its prefix's mean)
        self.h1_sum_BD: torch.Tensor | None = None
        self.h1_count_B: torch.Tensor | None = None
        self.stats = DecodeStats()

    def prefill(self, tokens_BT: torch.Tensor, positions_BT: torch.Tensor, valid_BT: torch.Tensor | None,
                cache) -> torch.Tensor:  # noqa: ANN001
        """The prompt at full depth; returns the last position's logits (B, V)."""
        model = self.model
        ctx = model._context(tokens_BT, positions_BT, valid_BT, cache)
        h = model.embed(tokens_BT)
        for i, layer in enumerate(model.layers):
            h = layer(h, ctx.for_layer(i))
            halting = self.exits.halting
            if i == 0 and halting is not None and halting.kind == "sequence":
                wide = _wide(h)
                if valid_BT is not None:
                    wide = wide * valid_BT.to(wide.dtype)[..., None]
                self.h1_sum_BD = wide.sum(dim=1)
                self.h1_count_B = (torch.full(h.shape[:1], h.shape[1], device=h.device, dtype=wide.dtype)
                                   if valid_BT is None else valid_BT.to(wide.dtype).sum(dim=1))
        return self.exits.exit_logits(self.exits.n_exits - 1, h[:, -1:], model)[:, 0]

    def _planned(self, h_B1D: torch.Tensor) -> torch.Tensor | None:
        """Halting's exit for the new tokens (B, 1), from their first-layer states; None without a plan.

        ``sequence`` adds the token to its row's running mean first, as the full forward's prefix mean does.
        """
        halting = self.exits.halting
        if halting is None or halting.kind == "geometric":
            return None
        if halting.kind == "token":
            return halting.log_q_first(h_B1D, None).argmax(dim=-1)
        self.h1_sum_BD = self.h1_sum_BD + _wide(h_B1D[:, 0])
        self.h1_count_B = self.h1_count_B + 1
        return halting.log_q(self.h1_sum_BD / self.h1_count_B.clamp_min(1)[:, None]).argmax(dim=-1)[:, None]

    def step(self, tok_B: torch.Tensor, pos_B1: torch.Tensor, cache) -> torch.Tensor:  # noqa: ANN001
        """Logits (B, V) of one new token per row, each from the exit where its row stopped."""
        model, exits = self.model, self.exits
        B = tok_B.shape[0]
        if B == 1:
            return self._step_one(tok_B, pos_B1, cache)
        tokens = tok_B[:, None]
        ctx = model._context(tokens, pos_B1, None, cache)
        h = model.embed(tokens)
        state = _Exiting(B, 1, exits.n_layers, h.device)
        planned = None
        for i, layer in enumerate(model.layers):
            if i > 0 and bool(state.exited.all()):
                for j in range(i, exits.n_layers):  # their keys and values wait for a deeper token
                    self.pending[j].append((h, pos_B1))
                break
            lctx = ctx.for_layer(i)
            self._flush(i, lctx)
            out = layer(h, lctx)
            h_prev, h = h, torch.where(state.exited[..., None], h, out)
            if i == 0:
                planned = self._planned(h)
            exits.check_exit(i, h, h_prev, planned, state, model)
        logits = state.logits(lambda: exits.exit_logits(exits.n_exits - 1, h, model))
        self.stats.depths.extend(state.depth[:, 0].tolist())
        return logits[:, 0]

    def _step_one(self, tok_B: torch.Tensor, pos_B1: torch.Tensor, cache) -> torch.Tensor:  # noqa: ANN001
        """:meth:`step` for one row: plain control flow, no masks, and a head only where the token stops.

        The same arithmetic as the batched path (tested equal), minus its bookkeeping, which at batch 1
        would cost as much as the layers the exit saves.
        """
        model, exits = self.model, self.exits
        tokens = tok_B[:, None]
        ctx = model._context(tokens, pos_B1, None, cache)
        h = model.embed(tokens)
        planned = None
        last = exits.n_exits - 1
        for i, layer in enumerate(model.layers):
            lctx = ctx.for_layer(i)
            self._flush(i, lctx)
            h_prev, h = h, layer(h, lctx)
            if i == 0:
                plan = self._planned(h)
                planned = None if plan is None else int(plan)
            k = exits.exit_of_layer.get(i)
            if k is None or k == last or not exits.checks(k):
                continue
            logits = self._fires(k, h, h_prev, planned)
            if logits is not None:
                for j in range(i + 1, exits.n_layers):  # their keys and values wait for a deeper token
                    self.pending[j].append((h, pos_B1))
                self.stats.depths.append(i + 1)
                return logits[:, 0]
        self.stats.depths.append(exits.n_layers)
        return exits.exit_logits(last, h, model)[:, 0]

    def _fires(self, k: int, h: torch.Tensor, h_prev: torch.Tensor, planned: int | None) -> torch.Tensor | None:
        """Exit ``k``'s logits if the token stops there, else None (cosine and halting skip the head then)."""
        exits, model = self.exits, self.model
        if exits.halting is not None:
            if exits.halting.kind == "geometric":
                fire = bool(torch.sigmoid(exits.halting.halt_logit(k, h)) > exits.spec.halting_tau)
            else:
                fire = planned == k
            return exits.exit_logits(k, h, model) if fire else None
        kind, threshold = exits.spec.confidence, exits.thresholds[k]
        if kind == "cosine":
            return exits.exit_logits(k, h, model) if bool(confidence(kind, None, h, h_prev) > threshold) else None
        logits = exits.exit_logits(k, h, model)
        return logits if bool(confidence(kind, logits, h, h_prev) > threshold) else None

    def _flush(self, i: int, lctx: Context) -> None:
        """Keys and values of layer ``i`` for the tokens that exited below it since it last ran."""
        if not self.pending[i]:
            return
        h = torch.cat([s for s, _ in self.pending[i]], dim=1)
        pos = torch.cat([p for _, p in self.pending[i]], dim=1)
        self.model.layers[i].append_kv(h, dataclasses.replace(lctx, positions_BT=pos, valid_BT=None,
                                                              contiguous=False, tokens_BT=None))
        self.pending[i].clear()
