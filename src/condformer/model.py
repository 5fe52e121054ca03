"""The backbone: embed -> residual stream through the layers -> final norm -> head.

Each layer is a router (from the registry) wrapped around a block (from the registry) whose FFN comes
from the registry too; which ones is decided by the config's per-layer :class:`LayerSpec`.

The layers are walked in exactly one place, :meth:`Transformer.run`. Two small protocols plug into it: the
*residual stream* (:mod:`condformer.streams`: dense, or AltUp's K blocks) says what each layer reads and how
its output merges back, and a *depth policy* (:mod:`condformer.exits.policies`) says which rows run a layer
and which tokens keep its output. Everything that needs layers (the forward pass, exit training and
decoding, self-speculative drafting and verification, calibration) calls ``run`` with a slice of layers
and a policy, so every stream composes with every policy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import condformer.components  # noqa: F401  (registers the built-in blocks, routers and FFNs)
from condformer.cache import KVCache
from condformer.config import ModelConfig
from condformer.context import Context, Tally
from condformer.exits.forward import exit_forward
from condformer.exits.heads import EarlyExit, ExitHeads
from condformer.exits.policies import FULL_DEPTH, DepthPolicy
from condformer.generation.exit_decoder import ExitDecoder
from condformer.layers.norms import make_norm
from condformer.losses import IGNORE_INDEX, lm_loss
from condformer.parallel.activation_checkpoint import layer_step, mode_now
from condformer.registry import BLOCKS, ROUTERS
from condformer.streams.altup import AltUp
from condformer.streams.base import DenseStream, ResidualStream

__all__ = ["IGNORE_INDEX", "Output", "Transformer", "build_model"]
_DENSE = DenseStream()


@dataclass
class Output:
    """What a forward pass returns.

    logits: (B, T, V). loss: mean cross-entropy over targets != IGNORE_INDEX, or None without targets.
    aux_loss: sum of the auxiliary losses layers added (a zero scalar when none).
    aux_losses: each auxiliary loss by name. stats: routing statistics by ``layer{L}/{name}`` (tensors).
    traces: per-token tensors by ``layer{L}/{name}`` (e.g. routing decisions), only with ``trace=True``.
    objective: what training minimises instead of ``loss`` when they differ (early exits: the weighted mean of
        every exit's loss, while ``loss`` stays the last layer's); None when it is ``loss``.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor | float] = field(default_factory=dict)
    traces: dict[str, torch.Tensor] = field(default_factory=dict)
    objective: torch.Tensor | None = None

    @property
    def train_loss(self) -> torch.Tensor:
        """The scalar a trainer backpropagates: the objective (or loss) plus the auxiliary losses."""
        return (self.loss if self.objective is None else self.objective) + self.aux_loss


def build_layer(cfg: ModelConfig, layer_index: int) -> nn.Module:
    spec = cfg.layer_specs()[layer_index]
    block = BLOCKS.get(spec.block)(cfg, spec, layer_index)
    return ROUTERS.get(spec.router)(cfg, spec, layer_index, block)


class MLMHead(nn.Module):
    """BERT's masked-LM transform before the vocabulary projection: dense -> GELU -> norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        width = cfg.head_in_dim
        self.dense = nn.Linear(width, width)
        self.norm = make_norm(cfg.norm, width, cfg.norm_eps)
        nn.init.normal_(self.dense.weight, std=cfg.init_std)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x)))


class Transformer(nn.Module):
    """A decoder (causal LM) or encoder (bidirectional, masked LM) built from a :class:`ModelConfig`."""

    # how training recomputes layers in the backward pass instead of keeping their activations: "none", "full" or
    # "selective"; set with condformer.parallel.activation_checkpoint.apply_activation_checkpointing
    activation_checkpointing = "none"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        # absolute positions (GPT-2) are added to the embedding; rotary ones live in each attention
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.embed_dim) if cfg.positions == "learned" else None
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, std=cfg.init_std)
        self.layers = nn.ModuleList(build_layer(cfg, i) for i in range(cfg.n_layers))
        # the residual stream: AltUp's K d-wide blocks around the same layers, or the dense stream (no weights)
        self.altup = AltUp(cfg) if cfg.altup is not None else None
        # depth-adaptive: exit heads after chosen layers, consulted through depth policies of the layer loop
        self.exits = EarlyExit(cfg) if cfg.exits is not None else None
        self.final_norm = make_norm(cfg.norm, cfg.head_in_dim, cfg.norm_eps)
        self.mlm_head = MLMHead(cfg) if cfg.kind == "encoder" else None
        self.head = nn.Linear(cfg.head_in_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=cfg.init_std)

    # -- the model surface every tool uses ----------------------------------------------------------
    @property
    def stream(self) -> ResidualStream:
        """The residual stream the layers run in (AltUp's, or the dense one)."""
        return _DENSE if self.altup is None else self.altup

    def context(self, tokens_BT: torch.Tensor, positions_BT: torch.Tensor | None = None,
                valid_BT: torch.Tensor | None = None, cache: KVCache | None = None, *,
                trace: bool = False) -> Context:
        """The per-forward context of ``tokens_BT``: positions (default 0..T-1), padding, cache, a fresh tally."""
        B, T = tokens_BT.shape
        if cache is not None and not self.cfg.causal:
            raise ValueError("a KV cache needs a causal decoder; encoders attend to later tokens")
        contiguous = positions_BT is None
        if positions_BT is None:
            if self.cfg.max_seq_len < T:
                raise ValueError(f"sequence length {T} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
            positions_BT = torch.arange(T, device=tokens_BT.device).expand(B, T)
        return Context(positions_BT=positions_BT, causal=self.cfg.causal, tally=Tally(tracing=trace),
                       valid_BT=valid_BT, cache=cache, contiguous=contiguous, tokens_BT=tokens_BT)

    _context = context  # the name tools used before the context builder was public

    def enter(self, tokens_BT: torch.Tensor, positions_BT: torch.Tensor | None = None) -> Any:
        """The embedded tokens (plus learned position embeddings, if any) as the residual stream's initial state.

        ``positions_BT``: each token's position (the context's; default 0..T-1), read only by learned positions.
        """
        x = self.embed(tokens_BT)
        if self.pos_embed is not None:
            if positions_BT is None:
                positions_BT = torch.arange(tokens_BT.shape[1], device=tokens_BT.device).expand_as(tokens_BT)
            x = x + self.pos_embed(positions_BT.clamp(min=0))
        return self.stream.enter(x)

    def run(self, state: Any, ctx: Context, layers: Iterable[int] | None = None,
            policy: DepthPolicy = FULL_DEPTH) -> Any:
        """Walk ``layers`` (default: all, in order) on the stream ``state``; the one layer loop of the library.

        Before each layer the policy may pick the rows that run it (the others keep their state); after it,
        the policy picks the state to continue with (per token) and may stop the walk (``policy.done``).
        In training with gradients each layer's step may be checkpointed (``activation_checkpointing``).
        """
        stream, checkpointing = self.stream, mode_now(self)
        for i in range(len(self.layers)) if layers is None else layers:
            lctx = ctx.for_layer(i)
            policy.before_layer(i, state, lctx)
            idx_B = policy.rows(i, state, lctx)
            if idx_B is None:
                new = layer_step(checkpointing, stream, i, state, self.layers[i], lctx)
            else:  # only the kept rows are computed; the others keep their state
                rows = stream.take_rows(state, idx_B)
                part = layer_step(checkpointing, stream, i, rows, self.layers[i], lctx.rows(idx_B))
                new = stream.put_rows(state, idx_B, part)
            state = policy.after_layer(i, state, new, lctx)
            if policy.done:
                break
        return state

    def readout(self, state: Any) -> torch.Tensor:
        """What the final norm and the head (and every exit) read from a stream state: (B, T, head width)."""
        return self.stream.readout(state)

    def logits(self, readout_BTW: torch.Tensor) -> torch.Tensor:
        """The model's own head on a readout: final norm, (encoders) the MLM transform, vocabulary projection."""
        h = self.final_norm(readout_BTW)
        if self.mlm_head is not None:
            h = self.mlm_head(h)
        return self.head(h)

    def exit_heads(self) -> ExitHeads:
        """The exits' heads with the model's final norm and head as the last exit (a model with exits)."""
        if self.exits is None:
            raise ValueError("this model has no exits (ModelConfig.exits)")
        return ExitHeads(self.exits, self.final_norm, self.head)

    # -- inference knobs, asked of the components that declare them -------------------------------------
    def inference_settings(self) -> dict[str, Any]:
        """Every run-time inference knob this model's components declare, with its current value.

        A component declares knobs with an ``inference_knobs`` tuple of names and implements
        ``get_inference(name)`` / ``set_inference(name, value)``; e.g. MoD layers ``routing`` ("causal" or
        "topk"), exits ``exit_thresholds``. Tools (bench, compare, the CLI) go through this, never a technique.
        """
        found: dict[str, Any] = {}
        for m in self.modules():
            for name in getattr(m, "inference_knobs", ()):
                found.setdefault(name, m.get_inference(name))
        return found

    def set_inference(self, *, missing: str = "error", **settings: Any) -> None:
        """Set inference knobs by name on every component that declares them (see :meth:`inference_settings`).

        ``missing="error"``: a knob no component of this model has is a one-line error naming the knobs it has;
        ``"ignore"``: skipped (a tool applying one setting to many models).
        """
        owners: dict[str, list[nn.Module]] = {}
        for m in self.modules():
            for name in getattr(m, "inference_knobs", ()):
                owners.setdefault(name, []).append(m)
        for name, value in settings.items():
            if name not in owners:
                if missing == "ignore":
                    continue
                from condformer.errors import CondformerError

                have = ", ".join(sorted(owners)) or "none"
                raise CondformerError(f"this model has no component with the inference setting '{name}' "
                                      f"(its settings: {have})")
            for m in owners[name]:
                m.set_inference(name, value)

    def adaptive_decoder(self) -> Any:
        """A cached decoder that stops each token at its exit, or None when this model decodes at full depth."""
        if self.exits is None or self.exits.policy() == "full":
            return None
        return ExitDecoder(self)

    def forward(
        self,
        tokens_BT: torch.Tensor,
        targets_BT: torch.Tensor | None = None,
        *,
        positions_BT: torch.Tensor | None = None,
        valid_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
        trace: bool = False,
        exit_depth_BT: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> Output:
        """Run the model. ``positions_BT`` defaults to 0..T-1; ``valid_BT`` marks padding as False.

        ``trace=True`` also returns per-token traces (routing decisions, ...) in ``Output.traces``.
        ``exit_depth_BT`` (models with exits): the number of layers each token computes, fixed by the caller.
        ``last_only``: logits of the last position only, (B, 1, V) (a prompt's prefill: the vocabulary projection
        of every other position is work nobody reads; 49k-token heads make it a real share of a prefill).
        """
        if last_only and targets_BT is not None:
            raise ValueError("last_only computes no loss: its logits cover the last position only")
        ctx = self.context(tokens_BT, positions_BT, valid_BT, cache, trace=trace)
        state = self.enter(tokens_BT, ctx.positions_BT)
        tally = ctx.tally
        if self.exits is not None:
            r = exit_forward(self, state, ctx, targets_BT, exit_depth_BT)
            if last_only:
                r.logits = r.logits[:, -1:]
            return Output(r.logits, r.loss, tally.total(r.logits), dict(tally.losses), dict(tally.stats),
                          dict(tally.traces), r.objective)
        if exit_depth_BT is not None:
            raise ValueError("exit_depth_BT needs a model with exits (ModelConfig.exits)")
        readout = self.readout(self.run(state, ctx))
        logits = self.logits(readout[:, -1:] if last_only else readout)
        return Output(logits, lm_loss(logits, targets_BT), tally.total(logits), dict(tally.losses),
                      dict(tally.stats), dict(tally.traces))

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n


def build_model(cfg: ModelConfig) -> Transformer:
    """Build a model from a config (validated first, so a bad config fails with a one-line error)."""
    return Transformer(cfg)
