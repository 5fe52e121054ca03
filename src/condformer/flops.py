"""Analytic FLOP counts for any config, counting only work that is actually done.

Matrix products count 2*m*n*k; attention counts QK^T and AV over every (query, key) pair it computes;
elementwise work (norms, activations, softmax) is not counted, as in FlopCounterMode and the usual
6*N*D rule. Training = 3 x forward (backward computes two products per forward product). Each router
decides how many tokens its block sees, so conditional computation is counted where it happens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from condformer.config import LayerSpec, ModelConfig
from condformer.registry import BLOCKS, FFNS, ROUTERS


@dataclass
class FlopReport:
    seq_len: int
    forward_flops: int  # per sequence
    train_flops: int  # per sequence, 3 x forward (a pass without gradients counts once)
    params: int  # all trainable parameters (tied head counted once)
    non_embedding_params: int
    per_layer: list[int] = field(default_factory=list)
    head_flops: int = 0

    @property
    def forward_flops_per_token(self) -> float:
        return self.forward_flops / self.seq_len

    @property
    def train_flops_per_token(self) -> float:
        return self.train_flops / self.seq_len

    def to_dict(self) -> dict:
        d = asdict(self)
        d["forward_flops_per_token"] = self.forward_flops_per_token
        d["train_flops_per_token"] = self.train_flops_per_token
        return d


def layer_forward_flops(cfg: ModelConfig, layer_index: int, seq_len: int) -> int:
    spec = cfg.layer_specs()[layer_index]
    block = BLOCKS.get(spec.block)

    def block_flops(n_queries: int, n_keys: int) -> int:
        return block.flops(cfg, spec, n_queries, n_keys)

    from condformer.streams import stream_type

    # the router decides how many tokens its block sees; the residual stream adds its own per-layer work
    return ROUTERS.get(spec.router).flops(cfg, spec, seq_len, block_flops) + stream_type(cfg).layer_flops(cfg, seq_len)


def head_forward_flops(cfg: ModelConfig, seq_len: int) -> int:
    width = cfg.head_in_dim  # K*d for AltUp's concat output
    flops = 2 * seq_len * width * cfg.vocab_size
    if cfg.kind == "encoder":  # the MLM transform's dense layer
        flops += 2 * seq_len * width * width
    return flops


def eval_config(cfg: ModelConfig) -> ModelConfig:
    """The config as it computes in evaluation and generation: each layer component may map its spec to
    its eval-time spec (``eval_spec``), e.g. an MoE layer runs dropless at evaluation unless told otherwise,
    so its evaluation FLOPs are the active experts' and not the training capacity's."""
    import dataclasses


    def view(spec: LayerSpec) -> LayerSpec:
        for part in (BLOCKS.get(spec.block), ROUTERS.get(spec.router), FFNS.get(spec.ffn)):
            if hasattr(part, "eval_spec"):
                spec = part.eval_spec(spec)
        return spec

    return dataclasses.replace(cfg, layers=[view(s) for s in cfg.layers])


def count_flops(cfg: ModelConfig, seq_len: int, *, training: bool = True) -> FlopReport:
    """Forward and training FLOPs of one sequence of ``seq_len`` tokens, and parameter counts.

    ``training=False`` counts the forward pass as evaluation runs it (see :func:`eval_config`).
    """
    from condformer.model import build_model

    cfg.validate()
    if not training:
        cfg = eval_config(cfg)
    per_layer = [layer_forward_flops(cfg, i, seq_len) for i in range(cfg.n_layers)]
    head = head_forward_flops(cfg, seq_len)
    forward = sum(per_layer) + head
    no_grad = 0  # forward work without a backward pass
    if cfg.exits is not None:
        from condformer.exits.heads import EarlyExit

        if training and cfg.exits.training == "mixed":  # M passes: the layers and each token's own exit head
            n_exits = len(cfg.exits.exit_layers(cfg.n_layers))
            heads = head if cfg.exits.head == "shared" else head * n_exits  # separate: every head, then select
            no_grad = forward  # plus one full-depth pass without gradients for the last layer's loss
            forward = cfg.exits.mixed_samples * (sum(per_layer) + heads)
        else:  # every exit's head (an upper bound at inference, where tokens stop at their exit)
            forward += EarlyExit.flops(cfg, seq_len)
    import torch

    with torch.device("meta"):  # parameter counts without allocating memory
        model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    return FlopReport(seq_len=seq_len, forward_flops=forward + no_grad, train_flops=3 * forward + no_grad,
                      params=params,
                      non_embedding_params=params - model.embed.weight.numel(), per_layer=per_layer,
                      head_flops=head)
