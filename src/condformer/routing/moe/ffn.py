"""Mixture-of-Experts FFN: E experts in place of one MLP, a router choosing which ones each token visits.

Use it in any block with ``LayerSpec(ffn=MoE(experts=8, top_k=2))`` (or ``ffn="moe", options={...}``). One
module composes four choices:

* the router (``moe_router``): ``topk`` | ``switch`` | ``noisy_topk`` | ``expert_choice`` | ``hash`` |
  ``lsh`` | ``soft`` (see :mod:`condformer.routing.moe.routers`), at ``granularity`` ``token`` or
  ``sequence`` (one decision per sample from its mean state);
* balancing: the Switch loss (``balance_coef``, ``balance_convention``), Shazeer's importance and load
  CV^2 losses, the router z-loss, or DeepSeek-V3's aux-loss-free bias (``aux_free_rate``);
* dispatch (:mod:`condformer.routing.moe.dispatch`): ``capacity_factor`` slots per expert in training,
  ``eval_capacity_factor`` at evaluation (None = dropless: a token's output never depends on other
  tokens, which keeps evaluation honest and cached generation exact);
* extras: ``shared_experts`` always on (DeepSeekMoE), fine-grained experts (``expert_dim`` < d_ff), and
  ``null_experts``: no-op experts in the same router. A token sent to one skips that share of the FFN at
  zero FLOPs; this is the *integrated* MoDE of Raposo et al. 2024. (The *staged* MoDE is a MoD router
  around a block whose FFN is this module: ``LayerSpec(router="mod", ffn="moe")``.)

Statistics per layer: each expert's share of assignments (``moe_load_e{i}``), the max share over the
balanced share (``moe_load_max``, 1 = balanced), dropped fraction, router entropy, no-op share.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from condformer.config import LayerSpec, ModelConfig
from condformer.errors import ConfigError
from condformer.options import ComponentOptions, option
from condformer.parallel.global_batch import MICRO_BATCH, SCOPES, BatchScope, batch_scope
from condformer.refusals import refuse
from condformer.registry import FFNS
from condformer.routing.moe import dispatch, losses
from condformer.routing.moe.experts import StackedExperts
from condformer.routing.moe.routers import HashRouter, LinearRouter, LSHRouter, NoisyTopKRouter, Routing, TopKRouter

ROUTER_KINDS = ("topk", "switch", "noisy_topk", "expert_choice", "hash", "lsh", "soft")
TOP1_KINDS = ("switch", "hash", "lsh")  # routers that send each token to exactly one expert
LEARNED_TOKEN_CHOICE = ("topk", "switch", "noisy_topk")
GRANULARITIES = ("token", "sequence")
DISPATCHES = ("auto", "grouped", "sorted", "loop")
DROP_POLICIES = dispatch.DROP_POLICIES
BALANCE_CONVENTIONS = losses.BALANCE_CONVENTIONS


@dataclasses.dataclass
class MoE(ComponentOptions):
    """Options of the Mixture-of-Experts FFN: ``LayerSpec(ffn=MoE(experts=8, top_k=2))``.

    experts / top_k: routed experts and how many each token uses (null: 2, or 1 for the one-expert routers
    switch, hash and lsh). moe_router: topk, switch, noisy_topk, expert_choice, hash, lsh or soft.
    renormalize: the k chosen gates sum to 1 (Mixtral; ignored for k = 1). capacity_factor: slots per expert
    in training (null: dropless); eval_capacity_factor: the same in evaluation and generation (null, the
    honest default: dropless). drop_policy: which tokens lose a full expert's slot. dispatch: the expert
    kernel (auto: grouped where supported, i.e. on CPU the fused kernel, measured fastest of the three there,
    and on CUDA torch's grouped_mm, no host sync; else sorted slices). expert_dim: an expert's width (null:
    the model's d_ff; smaller: fine-grained experts). shared_experts: always-on experts; null_experts:
    experts that compute nothing (integrated MoDE). granularity: route each token, or each sequence by its
    mean state. balance_coef / balance_convention / z_coef / importance_coef / load_coef: the auxiliary
    losses; aux_free_rate > 0: DeepSeek-V3's bias balancing step. balance_scope: what the capacity, the balance
    losses and the load statistics are computed over in multi-process training: ``global``, every data-parallel
    rank's rows of the step (the same as one process at the global batch size), or ``micro_batch``, each rank's
    own rows (the common practice; the aux-free bias update is global in both). allow_noncausal: permit
    expert_choice or sequence routing in a decoder (no KV-cached generation).
    """

    axis: ClassVar[str] = "ffn"
    component: ClassVar[str] = "moe"

    experts: int = option(8, ge=1)
    top_k: int | None = option(None, ge=1, null="2 (1 for switch, hash and lsh)")
    moe_router: str = option("topk", choices=ROUTER_KINDS)
    renormalize: bool = True
    capacity_factor: float | None = option(1.25, gt=0, null="dropless")
    eval_capacity_factor: float | None = option(None, gt=0, null="dropless")
    drop_policy: str = option("position", choices=DROP_POLICIES)
    dispatch: str = option("auto", choices=DISPATCHES)
    expert_dim: int | None = option(None, ge=1, null="the model's d_ff")
    shared_experts: int = option(0, ge=0)
    null_experts: int = option(0, ge=0)
    granularity: str = option("token", choices=GRANULARITIES)
    balance_coef: float = option(0.01, ge=0)
    balance_convention: str = option("unit", choices=BALANCE_CONVENTIONS)
    z_coef: float = option(0.001, ge=0)
    importance_coef: float = option(0.0, ge=0)
    load_coef: float = option(0.0, ge=0)
    aux_free_rate: float = option(0.0, ge=0)
    balance_scope: str = option("global", choices=SCOPES)
    allow_noncausal: bool = False

    @property
    def k(self) -> int:
        """Experts per token with the router's own default resolved."""
        if self.moe_router in TOP1_KINDS:
            return 1
        return 2 if self.top_k is None else self.top_k

    @property
    def causal(self) -> bool:
        """Whether a token's routing depends only on itself (needed for decoders and KV-cached generation)."""
        return self.moe_router != "expert_choice" and self.granularity == "token"

    def check(self, where: str) -> None:
        kind, n_total = self.moe_router, self.experts + self.null_experts
        if kind in TOP1_KINDS and self.top_k not in (None, 1):
            raise ConfigError(f"{where}: moe_router '{kind}' sends each token to one expert; drop top_k or set it to 1")
        if kind not in TOP1_KINDS and self.k > n_total:
            raise ConfigError(f"{where}: top_k ({self.k}) exceeds the number of experts ({n_total})")
        if kind == "noisy_topk" and self.k == 1:
            raise ConfigError(f"{where}: noisy_topk with top_k 1 makes every gate 1 (a softmax over one logit), so "
                              f"the router never learns from the language-model loss; use top_k >= 2, or 'switch'")
        if self.null_experts and kind not in LEARNED_TOKEN_CHOICE:
            raise ConfigError(f"{where}: null_experts (integrated MoDE) need a learned token-choice router "
                              f"({', '.join(LEARNED_TOKEN_CHOICE)}), not '{kind}'")
        if self.aux_free_rate > 0 and kind not in LEARNED_TOKEN_CHOICE:
            raise ConfigError(f"{where}: aux_free_rate applies to learned token-choice routers "
                              f"({', '.join(LEARNED_TOKEN_CHOICE)}), not '{kind}'")
        if self.load_coef > 0 and kind != "noisy_topk":
            raise ConfigError(f"{where}: load_coef needs moe_router 'noisy_topk' (the smooth load estimate uses "
                              f"its noise); use balance_coef or importance_coef for '{kind}'")
        if self.granularity == "sequence" and kind not in (*LEARNED_TOKEN_CHOICE, "lsh"):
            raise ConfigError(f"{where}: granularity 'sequence' needs a router that scores hidden states "
                              f"(topk, switch, noisy_topk, lsh), not '{kind}'")


def top_k_of(spec: LayerSpec) -> int:
    return MoE.of(spec).k


def expert_width(cfg: ModelConfig, spec: LayerSpec) -> int:
    w = MoE.of(spec).expert_dim
    return cfg.ffn_dim if w is None else int(w)


def is_causal_routing(spec: LayerSpec) -> bool:
    """Whether a token's routing depends only on itself (needed for decoders and KV-cached generation)."""
    return MoE.of(spec).causal


@FFNS.register("moe")
class MoEFFN(nn.Module):
    """``sum_{e in chosen(x)} gate_e(x) * expert_e(x)`` (+ shared experts), computed only for chosen pairs."""

    Options = MoE

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, layer_index: int) -> None:
        super().__init__()
        o = MoE.of(spec, f"layers[{layer_index}]")
        self.layer_index = layer_index
        self.kind = o.moe_router
        self.n_experts = int(o.experts)
        self.n_null = int(o.null_experts)
        self.n_total = self.n_experts + self.n_null
        self.k = o.k
        self.capacity_factor = o.capacity_factor
        self.eval_capacity_factor = o.eval_capacity_factor
        self.drop_policy = o.drop_policy
        self.dispatch = o.dispatch
        self.granularity = o.granularity
        self.balance_coef = float(o.balance_coef)
        self.balance_convention = o.balance_convention
        self.z_coef = float(o.z_coef)
        self.importance_coef = float(o.importance_coef)
        self.load_coef = float(o.load_coef)
        self.aux_free_rate = float(o.aux_free_rate)
        self.balance_scope = o.balance_scope
        d, swiglu = cfg.d_model, cfg.mlp == "swiglu"
        width = cfg.ffn_dim if o.expert_dim is None else o.expert_dim
        act = "tanh" if cfg.mlp == "gelu_tanh" else "none"  # GELU's approximation (GPT-2's is tanh)
        self.bank = StackedExperts(self.n_experts, d, width, swiglu, cfg.init_std, cfg.n_layers, act)
        n_shared = int(o.shared_experts)
        self.shared = (StackedExperts(1, d, n_shared * width, swiglu, cfg.init_std, cfg.n_layers, act)
                       if n_shared else None)
        seed = 0x5EED + 7919 * layer_index
        self.router: nn.Module
        if self.kind in ("topk", "switch"):
            self.router = TopKRouter(d, self.n_total, cfg.init_std, self.k, bool(o.renormalize))
        elif self.kind == "noisy_topk":
            self.router = NoisyTopKRouter(d, self.n_total, cfg.init_std, self.k)
        elif self.kind == "hash":
            self.router = HashRouter(cfg.vocab_size, self.n_experts, seed)
        elif self.kind == "lsh":
            self.router = LSHRouter(d, self.n_experts, seed)
        else:  # expert_choice, soft: a plain learned scorer
            self.router = LinearRouter(d, self.n_experts, cfg.init_std)
        # moe_top_k: experts per token at inference, for the learned token-choice routers (the compute dial's knob)
        self.inference_knobs = ("moe_top_k",) if isinstance(self.router, (TopKRouter, NoisyTopKRouter)) else ()
        if self.aux_free_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(self.n_total))
        self._load_acc: torch.Tensor | None = None  # assignments since the last optimiser step (aux-free)
        # set by condformer.parallel.expert_parallel: this rank holds a slice of the experts, tokens travel
        self.expert_parallel: Any = None

    # -- the inference knob ----------------------------------------------------------------------
    def get_inference(self, name: str) -> int:
        return self.k if self.router.serve_k is None else self.router.serve_k

    def set_inference(self, name: str, k: Any) -> None:
        """``moe_top_k``: how many experts each token visits at inference (training keeps the configured k). The
        gates of the served experts are rescaled to the weight the trained choice gave (``served_gates``)."""
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n_total):
            raise ConfigError(f"moe_top_k must be a whole number from 1 to {self.n_total} (MoE layer "
                              f"{self.layer_index}'s experts), got {k!r}")
        self.router.serve_k = None if k is None or k == self.k else int(k)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x_BTD: torch.Tensor, ctx: Any) -> torch.Tensor:
        B, T, D = x_BTD.shape
        if ctx.kv is not None and (self.kind == "expert_choice" or self.granularity == "sequence"
                                   or (ctx.causal and self.eval_capacity_factor is not None)):
            raise refuse("moe_noncausal_cached", where=f"MoE layer {self.layer_index}", what=self._noncausal_what())
        if self.kind == "expert_choice":
            y = self._expert_choice(x_BTD, ctx)
        elif self.kind == "soft":
            y = self._soft(x_BTD, ctx)
        else:
            y = self._token_choice(x_BTD, ctx)
        if self.shared is not None:
            y = y + self.shared.one(0, x_BTD.reshape(B * T, D)).view(B, T, D).to(y.dtype)
        if ctx.valid_BT is not None:  # padding (and MoD fillers) get nothing, whatever the router did
            y = torch.where(ctx.valid_BT[..., None], y, 0)
        return y

    def _noncausal_what(self) -> str:
        if self.kind == "expert_choice":
            return "expert_choice routing"
        return "per-sequence routing" if self.granularity == "sequence" else "evaluation capacity"

    def _route(self, x_ND: torch.Tensor, tokens_N: torch.Tensor | None) -> Routing:
        if self.kind == "hash":
            if tokens_N is None:
                raise ConfigError(f"MoE layer {self.layer_index}: hash routing needs token ids, but the context has "
                                  f"none; call the model with token ids (not hidden states)")
            return self.router(tokens_N)
        if self.kind == "lsh":
            return self.router(x_ND)
        return self.router(x_ND, getattr(self, "expert_bias", None))

    def _token_choice(self, x_BTD: torch.Tensor, ctx: Any) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        valid_N = None if ctx.valid_BT is None else ctx.valid_BT.reshape(-1)
        if self.granularity == "sequence":  # one decision per sample from its mean state
            if ctx.valid_BT is None:
                pooled_BD = x_BTD.mean(dim=1)
            else:
                w_BT1 = ctx.valid_BT[..., None].to(x_BTD.dtype)
                pooled_BD = (x_BTD * w_BT1).sum(dim=1) / w_BT1.sum(dim=1).clamp(min=1)
            r = self._route(pooled_BD, None)
            expert_NK, gate_NK = r.expert_NK.repeat_interleave(T, dim=0), r.gate_NK.repeat_interleave(T, dim=0)
            loss_rows = None  # every sample decides once: no padding among the pooled rows
        else:
            tokens_N = None if ctx.tokens_BT is None else ctx.tokens_BT.reshape(-1)
            r = self._route(x_ND, tokens_N)
            expert_NK, gate_NK = r.expert_NK, r.gate_NK
            loss_rows = valid_N
        if valid_N is not None:  # padding and MoD fillers visit no expert
            expert_NK = torch.where(valid_N[:, None], expert_NK, self.n_total)
        scope = batch_scope(self.balance_scope) if self.training else MICRO_BATCH
        if self.training:
            self._add_losses(r, loss_rows, ctx, scope)
            if self.aux_free_rate > 0 and ctx.accumulate:
                self._accumulate_load(expert_NK)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        kept_NK = None
        run_NK = expert_NK  # the pairs computed: capacity decided over several ranks drops pairs before dispatch
        if factor is not None and (scope.world > 1 or self.expert_parallel is not None):
            C = dispatch.capacity_slots(factor, B * T * scope.world, expert_NK.shape[1], self.n_total)
            gate_all = scope.gather(gate_NK) if self.drop_policy == "score" else None
            kept_NK = scope.own_rows(dispatch.capacity_keep(scope.gather(expert_NK), gate_all, self.n_experts, C,
                                                            self.drop_policy))
            run_NK, factor = torch.where(kept_NK, expert_NK, self.n_total), None
        how = self.dispatch
        if how == "auto":
            how = "grouped" if self.bank.grouped_supported(x_ND) else "sorted"
        if self.expert_parallel is not None:  # experts live on several ranks: all-to-all there and back
            y_ND = self.expert_parallel.dispatch(x_ND, run_NK, gate_NK, self.bank, record=ctx.accumulate)
        elif factor is not None:
            C = dispatch.capacity_slots(factor, B * T, expert_NK.shape[1], self.n_total)
            y_ND, kept_NK = dispatch.with_capacity(x_ND, expert_NK, gate_NK, self.bank, C, self.drop_policy)
        elif how == "loop":
            y_ND = dispatch.expert_loop(x_ND, run_NK, gate_NK, self.bank)
        else:
            # no no-op experts, no padding, no dropped pairs: every pair is real, so the dispatch needs no masks
            all_real = self.n_null == 0 and valid_N is None and kept_NK is None
            y_ND = dispatch.dropless(x_ND, run_NK, gate_NK, self.bank, grouped=how == "grouped", all_real=all_real)
        self._stats(ctx, expert_NK, kept_NK, r.probs_NE, scope)
        if ctx.tally.tracing:  # for `condformer inspect`: which expert each token visited, -1 for none
            visited_NK = expert_NK if kept_NK is None else torch.where(kept_NK, expert_NK, self.n_total)
            visited_NK = torch.where(visited_NK < self.n_experts, visited_NK, -1)
            ctx.tally.trace(ctx.layer, "moe_expert", visited_NK.view(B, T, -1))
            if self.n_null:  # integrated MoDE: did the token get any FFN compute at all?
                ctx.tally.trace(ctx.layer, "moe_routed", (visited_NK >= 0).any(dim=-1).view(B, T))
        return y_ND.view(B, T, D)

    def _expert_choice(self, x_BTD: torch.Tensor, ctx: Any) -> torch.Tensor:
        B, T, D = x_BTD.shape
        logits = self.router.logits(x_BTD.reshape(B * T, D))
        probs = logits.softmax(dim=-1)
        capacity = max(1, min(T, math.ceil(self.k * T / self.n_experts - 1e-9)))
        y, picks_BT = dispatch.expert_choice(x_BTD, probs.view(B, T, -1), capacity, self.bank, ctx.valid_BT)
        if self.training:
            self._add_losses(Routing(probs.new_zeros(0, 1, dtype=torch.long), probs.new_zeros(0, 1), logits, None),
                             None if ctx.valid_BT is None else ctx.valid_BT.reshape(-1), ctx)
        skipped = (picks_BT == 0).float()
        if ctx.valid_BT is not None:
            v = ctx.valid_BT.float()
            ctx.tally.stat(ctx.layer, "moe_dropped_frac", (skipped * v).sum() / v.sum().clamp(min=1))
        else:
            ctx.tally.stat(ctx.layer, "moe_dropped_frac", skipped.mean())
        ctx.tally.stat(ctx.layer, "moe_experts_per_token", picks_BT.float().mean())
        self._entropy_stat(ctx, probs)
        ctx.tally.trace(ctx.layer, "moe_picks", picks_BT)
        return y

    def _soft(self, x_BTD: torch.Tensor, ctx: Any) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        logits = self.router.logits(x_ND)
        probs = logits.softmax(dim=-1)
        if self.training:
            self._add_losses(Routing(probs.new_zeros(0, 1, dtype=torch.long), probs.new_zeros(0, 1), logits, None),
                             None if ctx.valid_BT is None else ctx.valid_BT.reshape(-1), ctx)
        self._entropy_stat(ctx, probs)
        return dispatch.soft(x_ND, probs, self.bank).view(B, T, D)

    def _entropy_stat(self, ctx: Any, probs_NE: torch.Tensor) -> None:
        """Mean router entropy over real tokens (padding excluded)."""
        mask_N = None if ctx.valid_BT is None else ctx.valid_BT.reshape(-1)
        with torch.no_grad():
            ctx.tally.stat(ctx.layer, "moe_entropy", losses.router_entropy(probs_NE, mask_N))

    # -- losses, statistics, aux-free balancing ----------------------------------------------------
    def _add_losses(self, r: Routing, rows_N: torch.Tensor | None, ctx: Any, scope: BatchScope = MICRO_BATCH) -> None:
        """The configured auxiliary losses on the real (non-padding) rows of ``scope``; each also logged per layer."""
        if r.logits_NE is None:
            return  # hash / LSH: nothing to learn
        logits, probs, expert, gate, noisy = r.logits_NE, r.probs_NE, r.expert_NK, r.gate_NK, r.noisy
        if rows_N is not None:  # padding in a training batch (rare): keep real rows (one host sync)
            logits = logits[rows_N]
            if probs is not None:
                probs, expert, gate = probs[rows_N], expert[rows_N], gate[rows_N]
            if noisy is not None:
                noisy = tuple(t[rows_N] for t in noisy)
        terms: list[tuple[str, float, Any]] = [("z", self.z_coef, lambda: losses.z_loss(logits))]
        if probs is not None:
            terms += [
                ("balance", self.balance_coef,
                 lambda: losses.switch_balance_loss(probs, expert, self.balance_convention, scope)),
                ("importance", self.importance_coef,
                 lambda: losses.importance_loss(torch.zeros_like(probs).scatter(1, expert, gate.to(probs.dtype)),
                                                scope)),
            ]
        if noisy is not None:
            terms.append(("load", self.load_coef, lambda: losses.load_loss(*noisy, k=self.k, scope=scope)))
        for name, coef, fn in terms:
            if coef > 0:
                value = fn()
                ctx.tally.loss(f"moe_{name}", coef * value)
                ctx.tally.stat(ctx.layer, f"moe_{name}", value)

    def _choice_counts(self, expert_NK: torch.Tensor) -> torch.Tensor:
        """Choices per expert (no-op experts included), padding (id n_total) left out."""
        return dispatch.count_ids(expert_NK.reshape(-1), self.n_total + 1)[: self.n_total].float()

    def _stats(self, ctx: Any, expert_NK: torch.Tensor, kept_NK: torch.Tensor | None,
               probs_NE: torch.Tensor | None, scope: BatchScope = MICRO_BATCH) -> None:
        with torch.no_grad():
            counts = scope.counts(self._choice_counts(expert_NK))
            share = counts / counts.sum().clamp(min=1)
            for e in range(self.n_experts):
                ctx.tally.stat(ctx.layer, f"moe_load_e{e}", share[e])
            ctx.tally.stat(ctx.layer, "moe_load_max", share.max() * self.n_total)
            if self.n_null:
                ctx.tally.stat(ctx.layer, "moe_null_frac", share[self.n_experts:].sum())
            real = expert_NK < self.n_experts
            if kept_NK is not None:
                n_dropped, n_real = scope.counts(torch.stack([(real & ~kept_NK).sum(), real.sum()]).float())
                dropped = n_dropped / n_real.clamp(min=1)
            else:
                dropped = torch.zeros((), device=expert_NK.device)
            ctx.tally.stat(ctx.layer, "moe_dropped_frac", dropped)
        if probs_NE is not None and probs_NE.shape[0] == expert_NK.shape[0]:  # per-token routing
            self._entropy_stat(ctx, probs_NE)

    def _accumulate_load(self, expert_NK: torch.Tensor) -> None:
        counts = self._choice_counts(expert_NK)
        self._load_acc = counts if self._load_acc is None else self._load_acc + counts

    @torch.no_grad()
    def before_optimizer_step(self, skip: bool = False) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): b_i += rate * sign(mean load - load_i), then centre b.

        Called by the trainer once per optimiser step, outside autograd, with the load summed over the
        step's micro-batches (and over ranks under torch.distributed). ``skip``: the step was dropped.
        """
        load, self._load_acc = self._load_acc, None
        if skip or load is None or self.aux_free_rate <= 0:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        self.expert_bias += self.aux_free_rate * torch.sign(load.mean() - load)
        self.expert_bias -= self.expert_bias.mean()

    # -- config and cost ---------------------------------------------------------------------
    @staticmethod
    def validate_spec(spec: LayerSpec, cfg: ModelConfig, i: int) -> None:
        """What the options alone cannot decide: routing a decoder may not use (the table in refusals.py)."""
        where, o = f"layers[{i}]", MoE.of(spec, f"layers[{i}]")
        if cfg.mlp_bias:
            raise refuse("moe_mlp_bias", where=where)
        if cfg.causal and not o.causal and not o.allow_noncausal:
            what = "expert_choice routing" if o.moe_router == "expert_choice" else "granularity 'sequence'"
            raise refuse("moe_noncausal_in_decoder", where=where, what=what)
        if cfg.causal and o.eval_capacity_factor is not None and not o.allow_noncausal:
            # capacity is shared by the whole batch and filled choice-major: a later token's first choice can
            # take the slot of an earlier token's second, so evaluation would see the future
            raise refuse("moe_eval_capacity_in_decoder", where=where)

    @staticmethod
    def eval_spec(spec: LayerSpec) -> LayerSpec:
        """The spec as evaluation runs it: the eval capacity factor (None: dropless) replaces the training one."""
        options = {**spec.options, "capacity_factor": MoE.of(spec).eval_capacity_factor}
        return dataclasses.replace(spec, options=options)

    @staticmethod
    def flops(cfg: ModelConfig, spec: LayerSpec, n_tokens: int) -> int:
        """Forward FLOPs for ``n_tokens`` tokens: router plus the expert work actually run.

        Capacity dispatch runs every slot (E x C rows, padding included); dropless runs exactly N*K pairs,
        of which a share E / (E + null) reaches real experts when the router is balanced (integrated MoDE's
        no-op experts cost nothing).
        """
        o = MoE.of(spec)
        kind, d = o.moe_router, cfg.d_model
        E, n_null = int(o.experts), int(o.null_experts)
        n_total, k = E + n_null, o.k
        width = expert_width(cfg, spec)
        per_token = 2 * d * width * (3 if cfg.mlp == "swiglu" else 2)
        n_routed = 1 if o.granularity == "sequence" else n_tokens
        router = {"hash": 0, "lsh": 2 * n_routed * d * LSHRouter.n_bits(E),
                  "noisy_topk": 2 * 2 * n_routed * d * n_total}.get(kind, 2 * n_routed * d * n_total)
        if kind == "soft":  # every expert on every token, then the probability-weighted sum (a matmul too)
            experts = n_tokens * E * per_token + 2 * n_tokens * E * d
        elif kind == "expert_choice":
            experts = E * max(1, min(n_tokens, math.ceil(k * n_tokens / E - 1e-9))) * per_token
        elif o.capacity_factor is None:
            experts = round(n_tokens * k * E / n_total) * per_token
        else:
            experts = E * dispatch.capacity_slots(o.capacity_factor, n_tokens, k, n_total) * per_token
        shared = n_tokens * per_token * int(o.shared_experts)
        return router + experts + shared
