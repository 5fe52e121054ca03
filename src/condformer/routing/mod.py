"""Mixture-of-Depths (Raposo et al. 2024, arXiv 2404.02258): a learned router picks which tokens get a block.

Shapes: B batch, T tokens, K tokens that get the block, D d_model.

Training (and ``eval_routing="topk"``)::

    r_BT   = w . x_BT                      one Linear(D, 1) per routed layer, float32
    idx_BK = top-k(r_BT) per sequence      k = max(1, floor(c * T)): static shape, exact load
             sorted by position            (causal order kept; rotary at original positions)
    d_BKD  = block(x[idx_BK])              attention only among the K chosen tokens
    x'     = x + scatter(g(r) * d_BKD)     g = sigmoid, 2 sigmoid or identity; unchosen tokens pass unchanged

The block returns its residual-free update, so the residual is neither scaled by the router weight nor
counted twice. With ``routed: ffn`` the router decides only over the FFN: attention runs for every token (so
every token stays a key of the layer and is cached), the router reads x + attention, and the chosen tokens'
FFN update is gathered, weighted and scattered the same way. Top-k over a sequence is not causal (whether
token t is chosen depends on later tokens), so for evaluation and sampling a per-token **causal decision**
replaces it: a token gets the block iff its causal logit is > 0. Ways to learn that logit, trained jointly
with the language model (section 3.5 of the paper) or not at all:

* ``causal_router="aux"``: binary cross-entropy on the router's own logits r against top-k membership;
* ``causal_router="predictor"``: a small MLP on the stop-gradient router input, trained with the same
  BCE; it cannot disturb the language model.
* ``causal_router="threshold"``: the router's own logit against a running threshold, the moving average
  (``threshold_momentum``) of each training batch's top-k boundary (midway between the last chosen and the
  first unchosen logit of a row). Nothing is learned: the decision follows the router from the first step,
  which is what router tuning of a pretrained model needs (a predictor trained from a "route everything"
  start takes thousands of steps to come down to the capacity). Until a batch has had unchosen tokens (at
  capacity 1) the threshold is -inf: every token is routed.

In causal mode the number of routed tokens is data-dependent; we read its per-row maximum (one host
sync per routed layer), gather that many tokens per row (routed ones first) and mark the fillers
invalid, so attention ignores them, they add nothing to the residual, and in a KV cache they are stored
as invalid entries. A decode step whose token skips the layer runs nothing and caches nothing.

**Router tuning of a pretrained model** (``condformer convert --to mod``) needs two more things. The
``2sigmoid`` weighting, g = 2 sigmoid(r), is exactly 1 where the router is zero (the sigmoid weighting halves
every routed update at init, which damages a model that was trained without it), and ``anneal_steps`` lowers
the capacity linearly from 1 (every token, the pretrained model) to ``capacity`` over that many optimiser
steps, so the router learns its choice while the model still computes every token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from condformer.config import LayerSpec, ModelConfig
from condformer.context import Context
from condformer.errors import ConfigError
from condformer.options import ComponentOptions, option
from condformer.parallel.global_batch import MICRO_BATCH, batch_scope
from condformer.refusals import refuse
from condformer.registry import FFNS, ROUTERS
from condformer.step_counter import StepCounter, linear_ramp

WEIGHTINGS = ("sigmoid", "2sigmoid", "raw")
CAUSAL_ROUTERS = ("predictor", "aux", "threshold", "none")
EVAL_ROUTINGS = ("causal", "topk")
ROUTER_INPUTS = ("raw", "normed")
ROUTED = ("block", "ffn")


@dataclass
class MoD(ComponentOptions):
    """Options of the Mixture-of-Depths router: ``LayerSpec(router=MoD(capacity=0.125))``.

    capacity: the fraction c of each sequence's tokens that get the block (the paper's best: 12.5% on every
        other block). weighting: the router weight g(r) on the block's output, ``sigmoid`` or ``raw``.
    causal_router: how the causal decision is learned (``predictor``: a small MLP on the stop-gradient
        router input; ``aux``: BCE on the router's own logits; ``none``: top-k only, no generation).
    eval_routing: ``causal`` (the per-token decision, for evaluation and generation) or ``topk``.
    threshold_momentum: how far each training batch moves the ``threshold`` causal router's boundary.
    aux_coef / predictor_coef: weights of the two BCE losses. predictor_hidden: the predictor's width.
    anneal_steps: training capacity goes linearly from 1 to ``capacity`` over this many optimiser steps (0: off);
        the step count is saved with the weights, so a resumed run continues the ramp exactly.
    router_input: what the router and the predictor read: ``raw`` (the residual stream) or ``normed`` (divided by
        its RMS, no gain). A pretrained model's residual stream has a scale of its own (large, and growing with
        depth), and a router's logit moves by about lr x |x|_1 per Adam step, so on raw states a router rate is
        tied to that scale (a rate of 1e-3 swung SmolLM2's gates across their range in one step); ``normed``
        makes it the same at every layer of every model.
    routed: what a token the router passes over skips: ``block`` (the paper: attention and FFN, and the token is
        not in the layer's attention context) or ``ffn`` (attention runs for every token, so every token stays a
        key and value of the layer; only the FFN, most of a layer's FLOPs, is computed for the chosen ones, and the
        router reads the state after attention). Measured on SmolLM2-135M (benchmarks/RESULTS.md): skipping half
        the tokens' whole block in one middle layer cost 0.05-0.37 nats/token even with an oracle's choice,
        skipping their FFN 0.005-0.075, so ``ffn`` is what router tuning of a pretrained model can afford.
    """

    axis: ClassVar[str] = "router"
    component: ClassVar[str] = "mod"

    capacity: float = option(0.125, gt=0, le=1)
    weighting: str = option("sigmoid", choices=WEIGHTINGS)
    causal_router: str = option("predictor", choices=CAUSAL_ROUTERS)
    eval_routing: str = option("causal", choices=EVAL_ROUTINGS)
    aux_coef: float = option(0.1, ge=0)
    predictor_coef: float = option(1.0, ge=0)
    predictor_hidden: int | None = option(None, ge=1, null="d_model // 4")
    anneal_steps: int = option(0, ge=0)
    router_input: str = option("raw", choices=ROUTER_INPUTS)
    threshold_momentum: float = option(0.2, gt=0, le=1)
    routed: str = option("block", choices=ROUTED)

    def check(self, where: str) -> None:
        if self.causal_router == "none" and self.eval_routing == "causal":
            raise refuse("mod_causal_without_router", where=where)


def capacity_tokens(capacity: float, seq_len: int) -> int:
    """k = max(1, floor(c * T)): tokens per sequence that get the block (never 0, even for short input).

    A tiny epsilon absorbs float error in c * T (0.29 * 100 is 28.999999999999996 in binary floating point).
    """
    return max(1, min(seq_len, math.floor(capacity * seq_len + 1e-9)))


def predictor_width(cfg: ModelConfig, spec: LayerSpec) -> int:
    h = MoD.of(spec).predictor_hidden
    return max(8, cfg.d_model // 4) if h is None else h


@ROUTERS.register("mod")
class MoDRouter(nn.Module):
    """Mixture-of-Depths around any block: top-k tokens in training, a causal decision at inference::

        x ─┬─ router r ─ top-k / causal ─ gather ─ block ─ x g(r) ─ scatter-add ─(+)─> x'
           └──────────────────────────── (tokens not chosen pass unchanged) ──────┘
    """

    Options = MoD
    # routing: "causal" or "topk" at evaluation; mod_threshold: the logit a token's causal decision must exceed
    # to take the block (0, the trained decision; higher routes fewer tokens, lower more: the compute dial's knob)
    inference_knobs = ("routing", "mod_threshold")

    def get_inference(self, name: str) -> Any:
        return self.eval_routing if name == "routing" else self.decision_threshold

    def set_inference(self, name: str, mode: Any) -> None:
        if name == "mod_threshold":
            if isinstance(mode, bool) or not isinstance(mode, (int, float)) or not math.isfinite(mode):
                raise ConfigError(f"mod_threshold must be a finite number (a logit; 0 is the trained decision), "
                                  f"got {mode!r}")
            self.decision_threshold = float(mode)
            return
        if mode not in EVAL_ROUTINGS:
            raise ConfigError(f"unknown eval_routing {mode!r}; choose one of: {', '.join(EVAL_ROUTINGS)}")
        if mode == "causal" and self.causal_router == "none":
            raise ConfigError(f"MoD layer {self.layer_index} has no causal router; it can only route by top-k")
        self.eval_routing = mode

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, layer_index: int, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.layer_index = layer_index
        o = MoD.of(spec, f"layers[{layer_index}]")
        self.capacity = float(o.capacity)
        self.weighting = o.weighting
        self.causal_router = o.causal_router
        self.eval_routing = o.eval_routing
        self.decision_threshold = 0.0  # the causal decision's logit threshold at inference (a run-time knob)
        self.aux_coef = float(o.aux_coef)
        self.predictor_coef = float(o.predictor_coef)
        self.anneal_steps = int(o.anneal_steps)
        self.router_input = o.router_input
        self.routed = o.routed
        self.norm_eps = cfg.norm_eps
        # registered only when annealing, so checkpoints of models without it keep their exact key set
        self.anneal = StepCounter() if self.anneal_steps > 0 else None
        self.router = nn.Linear(cfg.d_model, 1, bias=False)
        nn.init.normal_(self.router.weight, std=cfg.init_std)
        self.threshold_momentum = float(o.threshold_momentum)
        if self.causal_router == "threshold":  # registered only here: other routers' checkpoints keep their keys
            self.register_buffer("threshold", torch.tensor(float("-inf")))
        self.predictor: nn.Module | None = None
        if self.causal_router == "predictor":
            h = predictor_width(cfg, spec)
            self.predictor = nn.Sequential(nn.Linear(cfg.d_model, h), nn.SiLU(), nn.Linear(h, 1))

    # -- routing scores ----------------------------------------------------------------------
    def _read(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """What the router and the predictor read: x, or x / rms(x) (``router_input: normed``)."""
        if self.router_input == "raw":
            return x_BTD
        return x_BTD * torch.rsqrt(x_BTD.pow(2).mean(dim=-1, keepdim=True) + self.norm_eps)

    def router_logits(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """r = w . x in float32 or wider (outside autocast: top-k and the BCE are sensitive to bf16 rounding)."""
        dtype = torch.promote_types(x_BTD.dtype, torch.float32)
        with torch.autocast(x_BTD.device.type, enabled=False):
            return F.linear(self._read(x_BTD.to(dtype)), self.router.weight.to(dtype)).squeeze(-1)

    def causal_logits(self, x_BTD: torch.Tensor, r_BT: torch.Tensor) -> torch.Tensor:
        """The per-token logit whose sign is the causal decision (depends on x_t only)."""
        if self.predictor is not None:
            logit_BT = self.predictor(self._read(x_BTD.detach())).squeeze(-1)
            return logit_BT.to(torch.promote_types(logit_BT.dtype, torch.float32))
        if self.causal_router == "threshold":
            return r_BT - self.threshold.to(r_BT.dtype)
        return r_BT

    def gate(self, r: torch.Tensor) -> torch.Tensor:
        if self.weighting == "sigmoid":
            return torch.sigmoid(r)
        return 2 * torch.sigmoid(r) if self.weighting == "2sigmoid" else r

    def training_capacity(self) -> float:
        """The capacity top-k routing uses now: ``capacity``, or the annealing ramp's value at this step."""
        if self.anneal is None:
            return self.capacity
        return linear_ramp(1.0, self.capacity, int(self.anneal), self.anneal_steps)

    def use_topk(self) -> bool:
        return self.training or self.eval_routing == "topk"

    # -- forward -----------------------------------------------------------------------------
    @staticmethod
    def validate_spec(spec: LayerSpec, cfg: ModelConfig, layer_index: int) -> None:
        from condformer.registry import BLOCKS

        if MoD.of(spec).routed == "ffn" and not hasattr(BLOCKS.get(spec.block), "ffn_update"):
            raise refuse("mod_ffn_block", where=f"layers[{layer_index}]", block=spec.block)

    def forward(self, x_BTD: torch.Tensor, ctx: Context) -> torch.Tensor:
        if self.use_topk() and ctx.kv is not None:
            raise refuse("mod_topk_cached", where=f"MoD layer {self.layer_index}")
        if self.routed == "block":
            state_BTD, part = x_BTD, _BlockPart(self.block, x_BTD)
        else:  # attention for every token (and its keys in the cache); the router reads what the FFN would
            a_BTD = self.block.attention_update(x_BTD, ctx)
            state_BTD, part = x_BTD + a_BTD, _FFNPart(self.block, x_BTD, a_BTD)
        r_BT = self.router_logits(state_BTD)
        if self.use_topk():
            return self._forward_topk(state_BTD, r_BT, ctx, part)
        return self._forward_causal(state_BTD, r_BT, ctx, part)

    def _update_chosen(self, x_BTD: torch.Tensor, r_BT: torch.Tensor, idx_BK: torch.Tensor, sub: Context,
                       keep_BK: torch.Tensor | None, part: _BlockPart | _FFNPart) -> torch.Tensor:
        """x + scatter(g(r) * part(x[idx])): the update lands only on the gathered tokens."""
        D = x_BTD.shape[-1]
        idx_BKD = idx_BK[..., None].expand(-1, -1, D)
        delta_BKD = part(idx_BKD, sub)
        w_BK = self.gate(r_BT.gather(1, idx_BK))
        if keep_BK is not None:
            w_BK = w_BK * keep_BK
        return x_BTD.scatter_add(1, idx_BKD, (w_BK[..., None] * delta_BKD).to(x_BTD.dtype))

    def _forward_topk(self, x_BTD: torch.Tensor, r_BT: torch.Tensor, ctx: Context,
                      part: _BlockPart | _FFNPart) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        c = self.training_capacity()
        k = capacity_tokens(c, T)
        score_BT = r_BT if ctx.valid_BT is None else r_BT.masked_fill(~ctx.valid_BT, float("-inf"))
        idx_BK = score_BT.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        # a row with fewer real tokens than k fills its slots with padding: those are never routed (weight 0,
        # invalid in the block's context) and never counted
        keep_BK = None if ctx.valid_BT is None else ctx.valid_BT.gather(1, idx_BK)
        routed_BT = torch.zeros_like(r_BT, dtype=torch.bool).scatter(1, idx_BK, True if keep_BK is None else keep_BK)
        if self.training:
            self._learn_causal_decision(x_BTD, r_BT, routed_BT, ctx)
        ctx.tally.trace(ctx.layer, "mod_routed", routed_BT)
        if self.anneal is not None:
            ctx.tally.stat(ctx.layer, "mod_capacity", c)
        if keep_BK is None:
            ctx.tally.stat(ctx.layer, "mod_routed_frac", k / T)
        else:
            ctx.tally.stat(ctx.layer, "mod_routed_frac", keep_BK.sum() / ctx.valid_BT.sum().clamp(min=1))
        sub = ctx.subset(idx_BK, keep_BK=keep_BK, ascending=True)
        return self._update_chosen(x_BTD, r_BT, idx_BK, sub, keep_BK, part)

    def _causal_selection(self, x_BTD: torch.Tensor, r_BT: torch.Tensor, ctx: Context,
                          record: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, Context] | None:
        """The tokens the causal decisions send through, as (idx_BK, keep_BK, their context); None if none."""
        B, T, _ = x_BTD.shape
        route_BT = self.causal_logits(x_BTD, r_BT) > self.decision_threshold
        if ctx.valid_BT is not None:
            route_BT = route_BT & ctx.valid_BT
        counts_B = route_BT.sum(dim=1)
        if record:
            n_valid = T * B if ctx.valid_BT is None else ctx.valid_BT.sum()
            ctx.tally.stat(ctx.layer, "mod_routed_frac", counts_B.sum() / n_valid)
            ctx.tally.trace(ctx.layer, "mod_routed", route_BT)
        n = int(counts_B.max())  # the one host sync: how many tokens the fullest row sends through
        if n == 0:
            return None  # nobody gets the block: no compute, nothing cached
        # routed tokens first (earliest first), then fillers; a row of B == 1 has no fillers
        order_BT = route_BT.to(torch.long) * (2 * T) - torch.arange(T, device=x_BTD.device)
        idx_BK = order_BT.topk(n, dim=1).indices.sort(dim=1).values
        keep_BK = None if B == 1 else route_BT.gather(1, idx_BK)
        return idx_BK, keep_BK, ctx.subset(idx_BK, keep_BK=keep_BK, ascending=True)

    def _forward_causal(self, x_BTD: torch.Tensor, r_BT: torch.Tensor, ctx: Context,
                        part: _BlockPart | _FFNPart) -> torch.Tensor:
        chosen = self._causal_selection(x_BTD, r_BT, ctx)
        if chosen is None:
            return x_BTD
        idx_BK, keep_BK, sub = chosen
        return self._update_chosen(x_BTD, r_BT, idx_BK, sub, keep_BK, part)

    def append_kv(self, x_BTD: torch.Tensor, ctx: Context) -> None:
        """Keys and values of the tokens the causal decisions route, computed from ``x`` (exited tokens).

        With ``routed: ffn`` every token is in the layer's attention, so every token's keys are stored."""
        if self.use_topk():
            raise refuse("mod_topk_cached", where=f"MoD layer {self.layer_index}")
        if self.routed == "ffn":
            self.block.append_kv(x_BTD, ctx)
            return
        chosen = self._causal_selection(x_BTD, self.router_logits(x_BTD), ctx, record=False)
        if chosen is not None:
            idx_BK, _, sub = chosen
            self.block.append_kv(x_BTD.gather(1, idx_BK[..., None].expand(-1, -1, x_BTD.shape[-1])), sub)

    # -- causal routing for sampling ---------------------------------------------------------
    def _learn_causal_decision(self, x_BTD: torch.Tensor, r_BT: torch.Tensor, routed_BT: torch.Tensor,
                               ctx: Context) -> None:
        """BCE of the causal logit against top-k membership (built per row), plus its accuracy stats.

        Padding has no membership to learn: the loss and every statistic are over real tokens only.
        """
        if self.causal_router == "none":
            return
        if self.causal_router == "threshold":
            self._track_threshold(x_BTD, r_BT, routed_BT, ctx)
            return
        target_BT = routed_BT.to(r_BT.dtype)
        logit_BT = self.causal_logits(x_BTD, r_BT)
        if ctx.valid_BT is None:
            bce = F.binary_cross_entropy_with_logits(logit_BT, target_BT)
        else:
            valid_BT = ctx.valid_BT.float()
            bce = (F.binary_cross_entropy_with_logits(logit_BT, target_BT, reduction="none") * valid_BT).sum() \
                / valid_BT.sum().clamp(min=1)
        coef = self.aux_coef if self.causal_router == "aux" else self.predictor_coef
        ctx.tally.loss(f"mod_{self.causal_router}_bce", coef * bce)
        ctx.tally.stat(ctx.layer, "mod_bce", bce.detach())
        self._decision_stats(logit_BT.detach() > 0, routed_BT, ctx)

    @torch.no_grad()
    def _decision_stats(self, pred_BT: torch.Tensor, true_BT: torch.Tensor, ctx: Context) -> None:
        """How well the causal decisions match this batch's top-k (over real tokens)."""
        real_BT = torch.ones_like(true_BT) if ctx.valid_BT is None else ctx.valid_BT
        pred_BT = pred_BT & real_BT
        n_real = real_BT.sum().clamp(min=1)
        tp = (pred_BT & true_BT).sum().float()
        ctx.tally.stat(ctx.layer, "mod_causal_acc", ((pred_BT == true_BT) & real_BT).sum() / n_real)
        ctx.tally.stat(ctx.layer, "mod_causal_precision", tp / pred_BT.sum().clamp(min=1))
        ctx.tally.stat(ctx.layer, "mod_causal_recall", tp / true_BT.sum().clamp(min=1))
        ctx.tally.stat(ctx.layer, "mod_causal_frac", pred_BT.sum() / n_real)

    @torch.no_grad()
    def _track_threshold(self, x_BTD: torch.Tensor, r_BT: torch.Tensor, routed_BT: torch.Tensor,
                         ctx: Context) -> None:
        """Score the running threshold on this batch, then move it towards the batch's top-k boundary.

        A row's boundary is midway between its lowest chosen and its highest unchosen real token; rows with no
        unchosen token (capacity 1) or no chosen one say nothing; in multi-process training the boundary is the mean
        over every rank's rows (:mod:`condformer.parallel.global_batch`). Skipped in a recomputed forward
        (``ctx.accumulate`` False), so activation checkpointing would not move it twice.
        """
        self._decision_stats(self.causal_logits(x_BTD, r_BT) > 0, routed_BT, ctx)
        if not ctx.accumulate:
            return
        real_BT = torch.ones_like(routed_BT) if ctx.valid_BT is None else ctx.valid_BT
        r = r_BT.detach().float()
        inf = torch.tensor(float("inf"), device=r.device)
        lowest_chosen_B = torch.where(routed_BT, r, inf).amin(dim=1)
        highest_unchosen_B = torch.where(real_BT & ~routed_BT, r, -inf).amax(dim=1)
        rows_B = torch.isfinite(lowest_chosen_B) & torch.isfinite(highest_unchosen_B)
        # all on the device, no host sync: a batch without a boundary leaves the threshold as it is
        mid_B = torch.where(rows_B, (lowest_chosen_B + highest_unchosen_B) / 2, 0.0)
        # over every data-parallel rank's rows: the buffer stays the same on all ranks (FSDP does not broadcast
        # buffers) and equals one process's at the global batch size
        scope = batch_scope("global") if self.training else MICRO_BATCH
        mid_sum, n_rows = scope.counts(torch.stack([mid_B.sum(), rows_B.sum().to(mid_B.dtype)]))
        boundary = mid_sum / n_rows.clamp(min=1)
        old = self.threshold.float()
        moved = torch.where(torch.isfinite(old), old + self.threshold_momentum * (boundary - old), boundary)
        self.threshold.copy_(torch.where(n_rows > 0, moved, old).to(self.threshold.dtype))

    # -- config and cost ---------------------------------------------------------------------
    @staticmethod
    def flops(cfg: ModelConfig, spec: LayerSpec, seq_len: int, block_flops) -> int:
        """Forward FLOPs at the target capacity: the block on k tokens (attention k x k), router and predictor on all
        T. An annealing ramp's steps cost more than this (their capacity is above the target)."""
        o = MoD.of(spec)
        k = capacity_tokens(float(o.capacity), seq_len)
        d = cfg.d_model
        if o.routed == "ffn":  # the whole block on every token, less the FFN on the tokens passed over
            ffn = FFNS.get(spec.ffn)
            flops = block_flops(seq_len, seq_len) - ffn.flops(cfg, spec, seq_len) + ffn.flops(cfg, spec, k)
        else:
            flops = block_flops(k, k)
        flops += 2 * seq_len * d
        if o.causal_router == "predictor":
            h = predictor_width(cfg, spec)
            flops += 2 * seq_len * d * h + 2 * seq_len * h
        return flops


class _BlockPart:
    """``routed: block``: the chosen tokens' whole block, on their own (attention only among them)."""

    def __init__(self, block: nn.Module, x_BTD: torch.Tensor) -> None:
        self.block, self.x_BTD = block, x_BTD

    def __call__(self, idx_BKD: torch.Tensor, sub: Context) -> torch.Tensor:
        return self.block(self.x_BTD.gather(1, idx_BKD), sub)


class _FFNPart:
    """``routed: ffn``: the chosen tokens' FFN update, attention having run for every token."""

    def __init__(self, block: nn.Module, x_BTD: torch.Tensor, a_BTD: torch.Tensor) -> None:
        self.block, self.x_BTD, self.a_BTD = block, x_BTD, a_BTD

    def __call__(self, idx_BKD: torch.Tensor, sub: Context) -> torch.Tensor:
        return self.block.ffn_update(self.x_BTD.gather(1, idx_BKD), self.a_BTD.gather(1, idx_BKD), sub)


def set_eval_routing(model: nn.Module, mode: str) -> None:
    """Switch every MoD layer of ``model`` to ``"causal"`` or ``"topk"`` routing in eval mode (none: no-op)."""
    if mode not in EVAL_ROUTINGS:
        raise ConfigError(f"unknown eval_routing {mode!r}; choose one of: {', '.join(EVAL_ROUTINGS)}")
    model.set_inference(routing=mode, missing="ignore")
