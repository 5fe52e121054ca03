"""Typed configuration: the model, each layer, and training.

A model is a list of :class:`LayerSpec` (block type x router x FFN), so techniques compose per layer
instead of through global flags. ``ModelConfig.layers`` may hold one spec per layer or a shorter pattern
that is repeated to fill ``n_layers`` (``[dense, mod]`` on 8 layers = every other layer routed).

Configs round-trip through plain dicts, JSON and YAML, and :meth:`ModelConfig.validate` turns every
invalid value into a one-line :class:`~condformer.errors.ConfigError` that names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from condformer.errors import ConfigError
from condformer.options import ComponentOptions
from condformer.refusals import refuse
from condformer.registry import BLOCKS, FFNS, ROUTERS

NORMS = ("rmsnorm", "layernorm")
MLPS = ("gelu", "gelu_tanh", "swiglu")
KINDS = ("decoder", "encoder")
POSITIONS = ("rope", "learned")
ROPE_SCALINGS = {  # type -> the keys it needs (each a number); see condformer.layers.rotary
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


AXES = ("block", "router", "ffn")


@dataclass
class LayerSpec:
    """What one layer is: a block type, the router that decides which tokens it sees, and its FFN.

    Each part is a registered name (``router="mod"``) or that component's typed options
    (``router=MoD(capacity=0.125)``, ``ffn=MoE(experts=8, top_k=2)``): an options object is stored as its
    name plus its settings in ``options``, the flat mapping files and checkpoints hold, so both spellings
    make the same layer and adding a technique never changes this class's fields.
    """

    block: str = "preln"
    router: str = "dense"
    ffn: str = "mlp"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for axis in AXES:
            part = getattr(self, axis)
            if isinstance(part, str):
                continue
            if isinstance(part, ComponentOptions) and part.axis != axis:
                name = type(part).__name__
                article = "an" if part.axis == "ffn" else "a"
                raise ConfigError(f"LayerSpec.{axis}: {name} holds {article} {part.axis}'s options; pass it as "
                                  f"LayerSpec({part.axis}={name}(...))")
            if not isinstance(part, ComponentOptions):
                raise ConfigError(f"LayerSpec.{axis} must be a registered {axis} name or a {axis}'s options "
                                  f"(e.g. LayerSpec(router=MoD(capacity=0.125))), got {type(part).__name__}")
            given = part.validate(f"LayerSpec.{axis}").to_options()
            clash = sorted(k for k in given if k in self.options and self.options[k] != given[k])
            if clash:
                raise ConfigError(f"LayerSpec: {clash} set both in {axis}={part!r} and in options; set them once")
            self.options = {**self.options, **given}
            setattr(self, axis, part.component)

    def parts(self) -> tuple[Any, Any, Any]:
        """The registered block, router and FFN classes this spec names."""
        return BLOCKS.get(self.block), ROUTERS.get(self.router), FFNS.get(self.ffn)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str) -> LayerSpec:
        if isinstance(d, str):  # shorthand: "dense" -> LayerSpec(router="dense")
            return cls(router=d)
        return _from_dict(cls, d, "layers[]")


@dataclass
class AltUpConfig:
    """Alternating Updates (Baykal et al. 2023): a K-times wider token state at the cost of a d-wide layer.

    The state is K blocks of width d. Each layer predicts every block from all blocks (K x K scalars),
    runs the ordinary d-wide layer on one activated block, and corrects every block by K scalars times
    the layer's innovation. See :mod:`condformer.streams.altup`.

    variant: ``standard`` (the embedding is K*d wide) or ``recycled`` (the d-wide embedding replicated K
        times; only K^2 + K scalars per layer are added).
    output: how the K blocks reach the head. ``concat``: the K*d state is normed and read by a K*d-wide
        head (standard only; tied to the wide embedding). ``mean`` / ``sum``: the blocks are combined to d
        for the unchanged d-wide head. ``auto``: concat for standard, mean for recycled.
    schedule: ``alternating`` (layer l activates block l mod K) or ``same`` (always block 0).
    layer_input: ``block`` (the paper: the old activated block) or ``prediction`` (Gemma 3n: its prediction).
    coefficients: ``scalar`` (the paper: learned p and g per layer) or ``gemma`` (Gemma 3n: coefficients
        computed per token by a tanh router, clipped to +-coef_clip in training).
    """

    k: int = 2
    variant: str = "standard"
    output: str = "auto"
    schedule: str = "alternating"
    layer_input: str = "block"
    coefficients: str = "scalar"
    coef_clip: float | None = 120.0

    @property
    def reduction(self) -> str:
        """The output reduction with ``auto`` resolved."""
        if self.output != "auto":
            return self.output
        return "concat" if self.variant == "standard" else "mean"

    def validate(self, model: ModelConfig) -> None:
        if not (isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 2):
            raise ConfigError(f"altup.k must be an integer >= 2 (the number of d-wide blocks), got {self.k!r}")
        _choice(self.variant, ALTUP_VARIANTS, "altup.variant")
        _choice(self.output, ALTUP_OUTPUTS, "altup.output")
        _choice(self.schedule, ("alternating", "same"), "altup.schedule")
        _choice(self.layer_input, ("block", "prediction"), "altup.layer_input")
        _choice(self.coefficients, ("scalar", "gemma"), "altup.coefficients")
        clip = self.coef_clip
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
            raise ConfigError(f"altup.coef_clip must be > 0 or null (no clipping), got {self.coef_clip}")
        if self.variant == "recycled" and self.output == "concat":
            raise refuse("altup_concat_recycled")
        if self.variant == "standard" and self.reduction != "concat" and model.tie_embeddings:
            raise refuse("altup_tied_narrow_head", output=self.output)


@dataclass
class ExitConfig:
    """Depth-adaptive Transformer (Elbayad et al. 2020) with CALM's confidences and LayerSkip's training.

    Exit classifiers after chosen layers let a token stop early; the last layer's exit is the model's own
    final norm and head. See :mod:`condformer.exits`.

    layers: 0-based indices of the layers followed by an exit (the last layer always is); null: every layer.
    head: ``shared`` (the LM head, with one norm per exit) or ``separate`` (one norm and head per exit).
    training: ``aligned`` (every token through every layer; loss = weighted mean of the exits' losses) or
        ``mixed`` (``mixed_samples`` random exit sequences per batch, exited states copied upward).
    weights: ``uniform``, ``increasing`` (w_n = the exit's depth) or one number per exit.
    layer_dropout: LayerSkip's p_max: in training, a sample skips layer l with p_max (2^(l/(L-1)) - 1).
    curriculum: which early exits aligned training computes at a step (LayerSkip's curricula; the last layer's
        exit always): ``none`` (all), ``rotating`` (exit k at steps with k = step mod ``curriculum_period``:
        a 1/period share of the vocabulary projections) or ``gradual`` (enabled one by one from the deepest
        to the shallowest over ``curriculum_steps`` steps). The step count is saved with the weights.
    halting: ``none`` (confidence exits), ``sequence`` (DAT's sequence depth from the mean first-layer state,
        pooled causally: token t's from the mean over 0..t, so nothing sees later tokens), ``token`` (a depth
        per token from its first-layer state) or ``geometric`` (a halting probability at every exit; stop at
        the first above ``halting_tau``).
    oracle: the halting module's target: ``likelihood``, ``smoothed`` (log-likelihoods convolved over
        neighbouring positions with an RBF kernel of width ``oracle_sigma``, as in DAT), ``correctness`` or
        ``smoothed_correctness``; each penalised by ``oracle_lambda`` x depth.
    halting_alpha: weight of the halting loss. halting_detach: the halting module reads detached states.
    confidence: ``softmax`` (max probability), ``gap`` (top-1 minus top-2 probability) or ``cosine`` (of the
        states before and after the layer). thresholds: one per exit except the last (a token exits at the
        first exit whose confidence exceeds its threshold; a null entry switches that exit off, so inference
        does not even compute its check); null: full depth (set by ``condformer calibrate``).
    """

    layers: list[int] | None = None
    head: str = "shared"
    training: str = "aligned"
    weights: str | list[float] = "uniform"
    mixed_samples: int = 1
    layer_dropout: float = 0.0
    curriculum: str = "none"
    curriculum_period: int = 2
    curriculum_steps: int = 0
    halting: str = "none"
    oracle: str = "likelihood"
    oracle_lambda: float = 0.0
    oracle_sigma: float = 1.0
    halting_alpha: float = 0.1
    halting_detach: bool = True
    halting_tau: float = 0.5
    confidence: str = "softmax"
    thresholds: list[float | None] | None = None

    def exit_layers(self, n_layers: int) -> list[int]:
        """Sorted 0-based layer indices with an exit, the last layer included."""
        chosen = range(n_layers) if self.layers is None else self.layers
        return sorted(set(chosen) | {n_layers - 1})

    def validate(self, model: ModelConfig) -> None:
        n = model.n_layers
        if self.layers is not None:
            bad = [i for i in self.layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
            if bad:
                raise ConfigError(f"exits.layers must hold layer indices in [0, {n - 1}], got {bad}")
        n_exits = len(self.exit_layers(n))
        _choice(self.head, ("shared", "separate"), "exits.head")
        _choice(self.training, ("aligned", "mixed"), "exits.training")
        if isinstance(self.weights, str):
            _choice(self.weights, ("uniform", "increasing"), "exits.weights")
        elif (len(self.weights) != n_exits or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0
                                                  for w in self.weights) or not sum(self.weights) > 0):
            raise ConfigError(f"exits.weights must be 'uniform', 'increasing' or {n_exits} numbers >= 0 (one per "
                              f"exit, the last layer's included) with a positive sum, got {self.weights}")
        if isinstance(self.mixed_samples, bool) or not isinstance(self.mixed_samples, int) or self.mixed_samples < 1:
            raise ConfigError(f"exits.mixed_samples must be an integer >= 1, got {self.mixed_samples!r}")
        if not 0 <= self.layer_dropout < 1:
            raise ConfigError(f"exits.layer_dropout (LayerSkip's p_max) must be in [0, 1), got {self.layer_dropout}")
        _choice(self.curriculum, CURRICULA, "exits.curriculum")
        for name in ("curriculum_period", "curriculum_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "curriculum_period" else 0):
                raise ConfigError(f"exits.{name} must be an integer >= {1 if name == 'curriculum_period' else 0}, "
                                  f"got {v!r}")
        if self.curriculum == "gradual" and self.curriculum_steps < 1:
            raise ConfigError("exits.curriculum 'gradual' needs curriculum_steps >= 1 (the steps over which the "
                              "exits are enabled)")
        if self.curriculum != "none" and self.training != "aligned":
            raise ConfigError(f"exits.curriculum '{self.curriculum}' chooses exits of aligned training; set "
                              f"exits.training to 'aligned' or the curriculum to 'none'")
        _choice(self.halting, ("none", "sequence", "token", "geometric"), "exits.halting")
        _choice(self.oracle, ("likelihood", "smoothed", "correctness", "smoothed_correctness"), "exits.oracle")
        if not (self.oracle_lambda >= 0 and self.oracle_sigma > 0 and self.halting_alpha >= 0):  # NaN fails too
            raise ConfigError("exits.oracle_lambda and exits.halting_alpha must be >= 0 and exits.oracle_sigma > 0")
        if not 0 < self.halting_tau < 1:
            raise ConfigError(f"exits.halting_tau must be in (0, 1), got {self.halting_tau}")
        _choice(self.confidence, ("softmax", "gap", "cosine"), "exits.confidence")
        if self.thresholds is not None:
            t = self.thresholds
            if len(t) != n_exits - 1 or any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))
                                            for v in t):
                raise ConfigError(f"exits.thresholds must be {n_exits - 1} numbers or nulls (one per exit before the "
                                  f"last layer; null: that exit off) or null for full depth, got {t}")
        if self.halting != "none" and self.training == "mixed":
            raise refuse("halting_with_mixed_training")
        if self.halting != "none" and self.thresholds is not None:
            raise refuse("thresholds_with_halting")
        if n_exits < 2:
            raise ConfigError("exits need at least one exit before the last layer; list layers in exits.layers")
        if model.kind != "decoder":
            raise refuse("exits_in_encoder")


CURRICULA = ("none", "rotating", "gradual")
ALTUP_VARIANTS = ("standard", "recycled")
ALTUP_OUTPUTS = ("auto", "concat", "mean", "sum")


def every_other(routed: LayerSpec, dense: LayerSpec | None = None) -> list[LayerSpec]:
    """The pattern ``[dense, routed]`` repeated: a routed layer after every dense one."""
    return [dense or LayerSpec(), routed]


@dataclass
class ModelConfig:
    """Architecture of a condformer model. Sizes follow GPT conventions (d_model, n_heads, ...)."""

    name: str = "custom"
    kind: str = "decoder"  # "decoder" (causal LM) or "encoder" (bidirectional, masked-LM head)
    vocab_size: int = 260  # the byte tokenizer's 256 bytes + 4 special tokens
    max_seq_len: int = 1024
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int | None = None  # None: 4*d for gelu, 8/3*d rounded up to a multiple of 64 for swiglu
    mlp: str = "gelu"  # "gelu" (exact), "gelu_tanh" (GPT-2's tanh approximation) or "swiglu"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    # attention and positions beyond the defaults: what pretrained families need (condformer.hf maps them)
    n_kv_heads: int | None = None  # grouped-query attention: key/value heads (None: n_heads; 1: multi-query)
    head_dim: int | None = None  # width of one head (None: d_model / n_heads); n_heads * head_dim may differ from d
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2, GPT-2)
    attn_out_bias: bool = False  # a bias on the attention's output projection (GPT-2)
    mlp_bias: bool = False  # biases on the MLP's projections (GPT-2)
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys before rotary (Qwen3)
    rope_scaling: dict[str, Any] | None = None  # {"type": "linear"|"llama3", ...} (ROPE_SCALINGS); None: plain
    positions: str = "rope"  # "rope" (rotary at every attention) or "learned" (absolute embeddings, GPT-2)
    init_std: float = 0.02
    layers: list[LayerSpec] = field(default_factory=lambda: [LayerSpec()])
    altup: AltUpConfig | None = None  # None: the ordinary d-wide residual stream
    exits: ExitConfig | None = None  # None: no early exits (every token through every layer)

    def __post_init__(self) -> None:
        self.layers = [s if isinstance(s, LayerSpec) else LayerSpec.from_dict(s) for s in self.layers]
        if self.altup is not None and not isinstance(self.altup, AltUpConfig):
            self.altup = _from_dict(AltUpConfig, self.altup, "model.altup")
        if self.exits is not None and not isinstance(self.exits, ExitConfig):
            self.exits = _from_dict(ExitConfig, self.exits, "model.exits")

    # -- derived -----------------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        """The width of one attention head: ``head_dim`` when set, else d_model / n_heads."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads`` when set, else one per query head."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def attn_dim(self) -> int:
        """Width of the attention's concatenated heads (queries and output projection input)."""
        return self.n_heads * self.head_size

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":  # keeps parameters ~equal to a 4d GELU MLP (Shazeer 2020)
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    @property
    def causal(self) -> bool:
        return self.kind == "decoder"

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding: K*d for standard AltUp, d otherwise."""
        if self.altup is not None and self.altup.variant == "standard":
            return self.altup.k * self.d_model
        return self.d_model

    @property
    def head_in_dim(self) -> int:
        """Width the final norm and the head read: K*d for AltUp's ``concat`` output, d otherwise."""
        if self.altup is not None and self.altup.reduction == "concat":
            return self.altup.k * self.d_model
        return self.d_model

    def layer_specs(self) -> list[LayerSpec]:
        """One spec per layer: ``layers`` repeated to ``n_layers``."""
        reps = self.n_layers // len(self.layers)
        return [dataclasses.replace(s, options=dict(s.options)) for _ in range(reps) for s in self.layers]

    # -- validation --------------------------------------------------------------------------
    def validate(self) -> ModelConfig:
        _positive(self, "vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads")
        _finite(self, "model")
        _choice(self.kind, KINDS, "kind")
        _choice(self.mlp, MLPS, "mlp")
        _choice(self.norm, NORMS, "norm")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                f"try n_heads={_divisor_near(self.d_model, self.n_heads)} or set head_dim"
            )
        if self.head_dim is not None and not (isinstance(self.head_dim, int) and self.head_dim >= 1):
            raise ConfigError(f"head_dim must be a positive integer or null (d_model / n_heads), got {self.head_dim!r}")
        if self.positions == "rope" and self.head_size % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_size}")
        kv = self.n_kv_heads
        if kv is not None and not (isinstance(kv, int) and not isinstance(kv, bool) and kv >= 1
                                   and self.n_heads % kv == 0):
            raise ConfigError(f"n_kv_heads must be a positive integer that divides n_heads ({self.n_heads}) or null "
                              f"(one per head), got {kv!r}")
        _choice(self.positions, POSITIONS, "positions")
        _check_rope_scaling(self.rope_scaling)
        if self.d_ff is not None and self.d_ff < 1:
            raise ConfigError(f"d_ff must be a positive integer or null, got {self.d_ff}")
        if not (self.init_std > 0 and self.norm_eps > 0 and self.rope_base > 1):
            raise ConfigError("init_std and norm_eps must be > 0 and rope_base > 1")
        if not self.layers:
            raise ConfigError("layers must list at least one LayerSpec")
        if self.n_layers % len(self.layers):
            raise ConfigError(
                f"the layer pattern has {len(self.layers)} entries, which does not divide n_layers="
                f"{self.n_layers}; give one spec per layer or a pattern whose length divides n_layers"
            )
        if self.altup is not None:
            self.altup.validate(self)
        if self.exits is not None:
            self.exits.validate(self)
        for i, spec in enumerate(self.layer_specs()):
            _choice(spec.block, BLOCKS.names(), f"layers[{i}].block")
            _choice(spec.router, ROUTERS.names(), f"layers[{i}].router")
            _choice(spec.ffn, FFNS.names(), f"layers[{i}].ffn")
            parts = spec.parts()
            typed = [part.Options for part in parts if getattr(part, "Options", None) is not None]
            # a component without typed options may still list the keys it reads (the release's plugin form)
            known = {k for options in typed for k in options.names()}
            known |= {k for part in parts if getattr(part, "Options", None) is None
                      for k in getattr(part, "options", ())}
            unknown = sorted(set(spec.options) - known)
            if unknown:
                raise ConfigError(f"layers[{i}]: unknown option(s) {unknown} for {spec.block}/{spec.router}/"
                                  f"{spec.ffn}; known: {sorted(known) or 'none'}")
            for options in typed:  # each component's typed options check their own values
                options.from_options(spec.options, f"layers[{i}]")
            for part in parts:  # what needs the whole model (e.g. a decoder's refusals)
                if hasattr(part, "validate_spec"):
                    part.validate_spec(spec, self, i)
        return self

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = [s.to_dict() for s in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, d, "model")


PARALLEL_MODES = ("ddp", "fsdp")
# how a run is executed, not what it computes: a resume may change them (e.g. FSDP on 4 ranks -> 2, or checkpointing
# activations after an out-of-memory) and still continue the same trajectory
EXECUTION_SETTINGS = ("device", "compile", "parallel", "expert_parallel", "activation_checkpointing", "fsdp_offload",
                      "fsdp_reshard_after_forward", "checkpoint_format", "dist_timeout_s")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
CHECKPOINT_FORMATS = ("auto", "full", "sharded")


@dataclass
class TrainConfig:
    """Optimisation, budget, logging and checkpointing for ``condformer train``."""

    data: str = "stdlib"
    tokenizer: str = "byte"
    val_fraction: float = 0.05
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    lr: float | None = None  # peak rate; None: the model's recommended rate (condformer.learning_rates)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    max_steps: int | None = None
    budget_tokens: int | None = None
    budget_flops: float | None = None
    eval_every: int = 200
    eval_batches: int = 20
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    on_nonfinite: str = "stop"  # "stop": raise naming the step; "skip": drop that update
    compile: bool = False
    dtype: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"
    device: str = "auto"
    # multi-process (torchrun): "ddp" replicates the model and averages gradients; "fsdp" (FSDP2) shards
    # parameters, gradients and optimizer state over the ranks (condformer.parallel.fsdp)
    parallel: str = "ddp"
    expert_parallel: int = 1  # ranks each MoE layer's experts are sharded over (all-to-all dispatch); 1: none
    activation_checkpointing: str = "none"  # "full" | "selective": recompute layer activations in the backward
    fsdp_offload: bool = False  # FSDP: parameters and optimizer state in CPU memory (a GPU run's memory saver)
    fsdp_reshard_after_forward: bool = True  # FSDP: free gathered parameters after each layer's forward
    checkpoint_format: str = "auto"  # "full": one safetensors file; "sharded": each rank its shards (DCP); auto:
    # sharded under fsdp or expert parallelism, full otherwise
    dist_timeout_s: float = 600.0  # a collective waiting longer (a rank died or hangs) ends the run with an error
    mlm_probability: float = 0.15  # encoders only
    tensorboard: bool = True
    init_from: str | None = None  # a run whose model, weights and tokenizer this run starts from (fine-tuning)
    trainable: list[str] | None = None  # roles / name patterns of the parameters to train (None: all; trainable.py)
    lr_new: float | None = None  # peak rate of the parameters a conversion added (None: lr); same schedule

    def validate(self) -> TrainConfig:
        _positive(self, "seq_len", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every",
                  "checkpoint_every", "keep_checkpoints")
        if not (0 < self.val_fraction <= 0.5):
            raise ConfigError(f"val_fraction must be in (0, 0.5], got {self.val_fraction}")
        _finite(self, "train")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not self.lr > 0):
            raise ConfigError(f"lr must be a number > 0, or null for the model's recommended rate; got {self.lr!r}")
        if not (0 <= self.min_lr_ratio <= 1):
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("warmup_steps, weight_decay and grad_clip must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        for name in ("max_steps", "budget_tokens", "budget_flops"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be > 0 when set, got {v}")
        if self.max_steps is None and self.budget_tokens is None and self.budget_flops is None:
            raise ConfigError("no training budget: set max_steps, budget_tokens or budget_flops")
        if self.lr_new is not None and (isinstance(self.lr_new, bool) or not isinstance(self.lr_new, (int, float))
                                        or not self.lr_new > 0):
            raise ConfigError(f"lr_new must be a number > 0, or null for lr; got {self.lr_new!r}")
        if self.trainable is not None and (not self.trainable or not all(isinstance(t, str) and t.strip()
                                                                         for t in self.trainable)):
            raise ConfigError(f"trainable must list roles or parameter-name patterns (e.g. ['routers']), or be null "
                              f"to train everything; got {self.trainable!r}")
        _choice(self.on_nonfinite, ("stop", "skip"), "on_nonfinite")
        _choice(self.dtype, ("auto", "fp32", "bf16"), "dtype")
        _choice(self.parallel, PARALLEL_MODES, "parallel")
        _choice(self.activation_checkpointing, ACTIVATION_CHECKPOINTING, "activation_checkpointing")
        _choice(self.checkpoint_format, CHECKPOINT_FORMATS, "checkpoint_format")
        if isinstance(self.expert_parallel, bool) or not isinstance(self.expert_parallel, int) \
                or self.expert_parallel < 1:
            raise ConfigError(f"expert_parallel must be an integer >= 1 (ranks per expert group), got "
                              f"{self.expert_parallel!r}")
        if not self.dist_timeout_s > 0:
            raise ConfigError(f"dist_timeout_s must be > 0 seconds, got {self.dist_timeout_s}")
        if not (0 < self.mlm_probability < 1):
            raise ConfigError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, d, "train")


def _check_rope_scaling(scaling: Any) -> None:
    """RoPE scaling is null or one of ROPE_SCALINGS with exactly its keys, each a positive number."""
    if scaling is None:
        return
    kind = scaling.get("type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALINGS:
        raise ConfigError(f"rope_scaling must be null or a mapping with type {' or '.join(map(repr, ROPE_SCALINGS))}, "
                          f"got {scaling!r}")
    need = ROPE_SCALINGS[kind]
    given = set(scaling) - {"type"}
    if given != set(need):
        raise ConfigError(f"rope_scaling of type '{kind}' takes exactly {list(need)}, got {sorted(given)}")
    for key in need:
        v = scaling[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"rope_scaling.{key} must be a number > 0, got {v!r}")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ConfigError("rope_scaling: llama3's high_freq_factor must exceed its low_freq_factor")


def _finite(obj: Any, section: str) -> None:
    """Every float field of a config section is finite: a NaN or inf from a file would otherwise train."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{section}.{f.name} must be a finite number, got {v}")


# -- files (moved) -------------------------------------------------------------------------------
def __getattr__(name: str) -> Any:
    """``condformer.config.load_config_file`` / ``save_config_file``: now in :mod:`condformer.config_files`.

    File IO merges presets (``{"model": {"preset": "small"}}``), so it sits above them; this module stays a
    leaf. The old import path keeps working (PEP 562), without an import edge at load time.
    """
    if name in ("load_config_file", "save_config_file"):
        import condformer.config_files as files

        return getattr(files, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- helpers -----------------------------------------------------------------------------------
def _from_dict(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {where} field(s) {unknown}; valid fields: {sorted(fields)}")
    kwargs = {}
    for k, v in d.items():
        kwargs[k] = _coerce(fields[k], v, f"{where}.{k}")
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, v: Any, where: str) -> Any:
    """Light type checking so that ``"d_model": "128"`` fails here, not inside torch."""
    t = str(f.type)
    if v is None:
        if "None" in t:
            return None
        raise ConfigError(f"{where} must not be null")
    if t.startswith("int") and not (isinstance(v, int) and not isinstance(v, bool)):
        raise ConfigError(f"{where} must be an integer, got {v!r}")
    if t.startswith("float") and not (isinstance(v, (int, float)) and not isinstance(v, bool)):
        raise ConfigError(f"{where} must be a number, got {v!r}")
    if t == "bool" and not isinstance(v, bool):
        raise ConfigError(f"{where} must be true or false, got {v!r}")
    if t == "str" and not isinstance(v, str):
        raise ConfigError(f"{where} must be a string, got {v!r}")
    if t.startswith("list") and not isinstance(v, list):
        raise ConfigError(f"{where} must be a list, got {v!r}")
    if t.startswith("dict") and not isinstance(v, dict):
        raise ConfigError(f"{where} must be a mapping, got {v!r}")
    if "float" in t and isinstance(v, int):
        return float(v)
    return v


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not (isinstance(v, int) and v >= 1):
            raise ConfigError(f"{n} must be a positive integer, got {v!r}")


def _choice(value: str, options: Any, name: str) -> None:
    if value not in options:
        raise ConfigError(f"unknown {name} '{value}'; choose one of: {', '.join(options)}")


def _divisor_near(n: int, target: int) -> int:
    return min((h for h in range(1, n + 1) if n % h == 0), key=lambda h: abs(h - target))
