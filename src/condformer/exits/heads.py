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

**Layout.** This module holds the exits' parameters and decisions (:class:`EarlyExit`) and the view through
which they read the model's own final norm and head (:class:`ExitHeads`); the per-layer behaviour of each
mode is a depth policy (:mod:`condformer.exits.policies`) of the model's one layer loop
(:meth:`condformer.model.Transformer.run`); cached decoding is :mod:`condformer.generation.exit_decoder`. Exits read
the residual stream's readout, so they compose with AltUp as with the dense stream.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from condformer.config import ExitConfig, ModelConfig
from condformer.context import Context
from condformer.errors import CondformerError
from condformer.exits.halting import Halting, confidence, oracle_exits
from condformer.layers.norms import make_norm
from condformer.losses import IGNORE_INDEX, target_log_likelihood
from condformer.step_counter import StepCounter


class EarlyExit(nn.Module):
    """The exits of a model: their norms and heads, the halting module, the weights and the inference policy.

    It never holds the model: the last exit is the model's final norm and head, which :class:`ExitHeads`
    lends it for one call.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e: ExitConfig = cfg.exits
        self.spec, self.n_layers = e, cfg.n_layers
        self.exit_layers = e.exit_layers(cfg.n_layers)
        self.exit_of_layer = {layer: k for k, layer in enumerate(self.exit_layers)}
        n_exits = len(self.exit_layers)
        width = cfg.head_in_dim  # every exit reads the residual stream's readout, as the final head does
        self.register_buffer("depths", self._depths(), persistent=False)
        self.norms = nn.ModuleList(make_norm(cfg.norm, width, cfg.norm_eps) for _ in range(n_exits - 1))
        self.heads: nn.ModuleList | None = None
        if e.head == "separate":
            self.heads = nn.ModuleList(nn.Linear(width, cfg.vocab_size, bias=False) for _ in range(n_exits - 1))
            for head in self.heads:
                nn.init.normal_(head.weight, std=cfg.init_std)
        self.halting = Halting(cfg, e.halting, n_exits) if e.halting != "none" else None
        # unnormalised: normalised in the loss's own dtype (a float64 model gets a float64 objective)
        self.register_buffer("weights", self._weights(), persistent=False)
        # the inference policy; ``set_thresholds`` overrides the config's thresholds at run time
        self.thresholds: list[float | None] | None = (
            None if e.thresholds is None else [None if t is None else float(t) for t in e.thresholds])
        # the curriculum's clock: registered only with a curriculum, so older checkpoints keep their key set
        self.clock = StepCounter() if e.curriculum != "none" else None

    def _depths(self) -> torch.Tensor:
        """Each exit's depth in layers (its layer index + 1)."""
        return torch.tensor([layer + 1 for layer in self.exit_layers])

    def _weights(self) -> torch.Tensor:
        """Each exit's loss weight, unnormalised, in float64."""
        w = self.spec.weights
        if isinstance(w, str):
            w = [1.0] * len(self.exit_layers) if w == "uniform" else [float(layer + 1) for layer in self.exit_layers]
        return torch.tensor([float(x) for x in w], dtype=torch.float64)

    def reset_buffers(self) -> None:
        """Recompute the depths and weights in place (after a build on the meta device allocated them empty:
        :mod:`condformer.parallel.meta_init`)."""
        with torch.no_grad():
            self.depths.copy_(self._depths())
            self.weights.copy_(self._weights())

    def training_exits(self) -> list[int]:
        """The exits aligned training computes at this step (LayerSkip's curricula): always the last one.

        ``rotating``: exit k when k = step mod period. ``gradual``: the deepest ceil(n s / S) early exits at step
        s of S (one more every S / n steps), all of them from step S on.
        """
        early = list(range(self.last))
        if self.clock is None:
            return [*early, self.last]
        step, e = int(self.clock), self.spec
        if e.curriculum == "rotating":
            chosen = [k for k in early if k % e.curriculum_period == step % e.curriculum_period]
        else:
            n_on = -(-len(early) * min(step + 1, e.curriculum_steps) // e.curriculum_steps)
            chosen = early[len(early) - n_on:]
        return [*chosen, self.last]

    @property
    def n_exits(self) -> int:
        return len(self.exit_layers)

    @property
    def last(self) -> int:
        return len(self.exit_layers) - 1

    def policy(self) -> str:
        """How inference picks depths: ``halting``, ``confidence`` (thresholds set) or ``full``."""
        if self.halting is not None:
            return "halting"
        return "confidence" if self.thresholds is not None else "full"

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

    def exit_index_of_depth(self, depth_BT: torch.Tensor) -> torch.Tensor:
        """The exit index of each depth; a depth that is no exit's is a one-line error."""
        depths = self.depths.to(depth_BT.device)
        match = depth_BT[..., None] == depths
        if not bool(match.any(dim=-1).all()):
            raise CondformerError(f"exit depths must be among the exits' depths {depths.tolist()}, got "
                                  f"{sorted(set(depth_BT.flatten().tolist()) - set(depths.tolist()))}")
        return match.to(torch.long).argmax(dim=-1)

    def depth_stats(self, depth_BT: torch.Tensor, ctx: Context) -> None:
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

    def halting_loss(self, r1_BTD: torch.Tensor, states: list[torch.Tensor], logits: list[torch.Tensor],
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
            log_q = halting.log_q_first(detach(r1_BTD), ctx.valid_BT)
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

    # -- cost and settings ----------------------------------------------------------------------------------
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
        width = cfg.head_in_dim  # exits read the stream's readout
        flops = 2 * seq_len * width * cfg.vocab_size * (n_exits - 1)
        if e.halting == "geometric":
            flops += 2 * seq_len * width * (n_exits - 1)
        elif e.halting in ("token", "sequence"):  # one projection per token (sequence: of its prefix's mean)
            flops += 2 * seq_len * width * n_exits
        return flops



    inference_knobs = ("exit_thresholds",)

    def get_inference(self, name: str) -> Any:
        return None if self.thresholds is None else list(self.thresholds)

    def set_inference(self, name: str, value: Any) -> None:
        self.set_thresholds(value)

    def set_thresholds(self, thresholds: float | list[float] | None) -> None:
        """Override the confidence thresholds (a scalar applies to every exit; None: full depth)."""
        if self.halting is not None and thresholds is not None:
            raise CondformerError("this model's depth comes from its halting module; --exit-threshold is for "
                                  "confidence exits")
        if thresholds is None:
            self.thresholds = None
            return
        if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
            thresholds = [float(thresholds)] * (self.n_exits - 1)
        if not isinstance(thresholds, (list, tuple)) or any(
                t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))) for t in thresholds):
            raise CondformerError(f"exit thresholds must be a number or a list of numbers (None: that exit off), "
                                  f"got {thresholds!r}")
        if len(thresholds) != self.n_exits - 1:
            raise CondformerError(f"give one threshold or {self.n_exits - 1} (one per exit before the last), "
                                  f"got {len(thresholds)}")
        self.thresholds = [None if t is None else float(t) for t in thresholds]


class ExitHeads:
    """The exits' heads for one call: the exits' own norms (and heads) plus the model's final norm and head.

    A short-lived view built by the model, so that exits read the model's head without holding the model.
    """

    def __init__(self, exits: EarlyExit, final: nn.Module, head: nn.Module) -> None:
        self.exits, self.final, self.head = exits, final, head

    def logits(self, k: int, r_BTW: torch.Tensor) -> torch.Tensor:
        """Logits of exit ``k`` from a readout (B, T, V); the last exit is the model's final norm and head."""
        exits = self.exits
        if k == exits.last:
            return self.head(self.final(r_BTW))
        head = self.head if exits.heads is None else exits.heads[k]
        return head(exits.norms[k](r_BTW))

    def at_exits(self, r_BTW: torch.Tensor, k_BT: torch.Tensor) -> torch.Tensor:
        """Each token's logits at its own exit ``k_BT`` (B, T, V): per-exit norms, then one head matmul (shared)."""
        exits = self.exits
        if exits.heads is None:
            normed = self.final(r_BTW)
            for k, norm in enumerate(exits.norms):
                normed = torch.where((k_BT == k)[..., None], norm(r_BTW), normed)
            return self.head(normed)
        out = self.logits(exits.last, r_BTW)
        for k in range(exits.last):
            out = torch.where((k_BT == k)[..., None], self.logits(k, r_BTW), out)
        return out


def set_exit_thresholds(model: nn.Module, thresholds: float | list[float] | None) -> None:
    """Override a model's confidence thresholds at run time (a scalar applies to every exit; None: full depth)."""
    exits = getattr(model, "exits", None)
    if exits is None:
        raise CondformerError("this model has no early exits; train an exit preset (e.g. tiny-exit) to use "
                              "--exit-threshold")
    model.set_inference(exit_thresholds=thresholds)
