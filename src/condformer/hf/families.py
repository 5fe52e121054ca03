"""How each supported Hugging Face architecture maps onto condformer's backbone, exactly or not at all.

A *family* knows three things about one transformers architecture: its config (``config.json``) as a
:class:`~condformer.config.ModelConfig`, its tensor names and layouts as condformer's, and the way back.
Nothing is approximated: a config field that changes what the model computes and that condformer cannot
compute the same way is a one-line :class:`~condformer.errors.ConfigError` naming it. Training-only
settings (dropout rates) are listed in the import report as not carried over, since condformer trains
without dropout; they do not change a single logit.

Supported: the Llama family (``llama``: Llama 2/3 with llama3 RoPE scaling, SmolLM/SmolLM2; ``mistral``;
``qwen2`` with its q/k/v biases; ``qwen3`` with its per-head q/k norms) and ``gpt2`` (learned absolute
positions, biased LayerNorms and linears, Conv1D weights stored transposed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from condformer.config import LayerSpec, ModelConfig
from condformer.errors import CheckpointError, ConfigError

Tensors = dict[str, torch.Tensor]


@dataclass
class Mapped:
    """A source config as condformer's, with what the import does not carry over (for the report)."""

    config: ModelConfig
    notes: list[str] = field(default_factory=list)


def _get(hf: dict[str, Any], key: str, default: Any = None) -> Any:
    value = hf.get(key, default)
    return default if value is None else value


def _require(hf: dict[str, Any], key: str, where: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"{where}: config.json lacks '{key}'; the checkpoint's config is incomplete")
    return hf[key]


def _refuse(where: str, key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{where}: {key}={value!r} cannot be mapped exactly ({why}); condformer will not approximate it")


def rope_of(hf: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """(rope base, condformer rope_scaling) from either transformers 4's (rope_theta, rope_scaling) or 5's
    rope_parameters."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if isinstance(params, dict) and "rope_theta" in params:
        base = float(params["rope_theta"])
        scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else {}
    else:
        base = float(_get(hf, "rope_theta", 10000.0))
    if not scaling:
        return base, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return base, None
    if kind == "linear":
        return base, {"type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in scaling]
        if missing:
            raise ConfigError(f"{where}: llama3 rope scaling lacks {missing}; the checkpoint's config is incomplete")
        return base, {"type": "llama3", **{k: float(scaling[k]) for k in keys}}
    raise _refuse(where, "rope_scaling.rope_type", kind, "condformer implements linear and llama3 scaling")


class Family:
    """One transformers architecture: config and tensors in, config and tensors out."""

    model_types: tuple[str, ...] = ()
    architecture: str = ""  # the transformers class export writes (e.g. LlamaForCausalLM)

    def to_config(self, hf: dict[str, Any], where: str) -> Mapped:
        raise NotImplementedError

    def to_condformer(self, hf_weights: Tensors, cfg: ModelConfig) -> Tensors:
        raise NotImplementedError

    def from_condformer(self, weights: Tensors, cfg: ModelConfig) -> Tensors:
        raise NotImplementedError

    def hf_config(self, cfg: ModelConfig, model_type: str) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def ignorable(name: str) -> bool:
        """Tensors a checkpoint may hold that are not weights (rotary caches, causal-mask buffers)."""
        return name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias"))


def _take(src: Tensors, name: str) -> torch.Tensor:
    if name not in src:
        raise CheckpointError(f"the checkpoint lacks the tensor '{name}', which its config implies; the weights are "
                          f"incomplete or belong to another model")
    return src.pop(name)


class LlamaFamily(Family):
    """Llama, SmolLM, Mistral, Qwen2 and Qwen3: pre-norm RMSNorm blocks, rotary GQA attention, SwiGLU MLPs."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "qwen3": "Qwen3ForCausalLM"}

    def to_config(self, hf: dict[str, Any], where: str) -> Mapped:
        kind = hf["model_type"]
        notes: list[str] = []
        act = _get(hf, "hidden_act", "silu")
        if act != "silu":
            raise _refuse(where, "hidden_act", act, "condformer's gated MLP is SwiGLU (silu)")
        if _get(hf, "pretraining_tp", 1) != 1:
            raise _refuse(where, "pretraining_tp", hf["pretraining_tp"], "sliced projections are not implemented")
        if _get(hf, "partial_rotary_factor", 1.0) != 1.0:
            raise _refuse(where, "partial_rotary_factor", hf["partial_rotary_factor"], "rotary covers whole heads")
        if _get(hf, "attention_dropout", 0.0):
            notes.append(f"attention_dropout={hf['attention_dropout']} not carried over (condformer trains "
                         f"without dropout; inference is unchanged)")
        d, heads = int(_require(hf, "hidden_size", where)), int(_require(hf, "num_attention_heads", where))
        kv = int(_get(hf, "num_key_value_heads", heads))
        head_dim = int(_get(hf, "head_dim", d // heads))
        max_len = int(_get(hf, "max_position_embeddings", 2048))
        window = hf.get("sliding_window")
        uses_window = kind == "mistral" or bool(hf.get("use_sliding_window", False))
        if uses_window and window is not None and int(window) < max_len:
            if kind != "mistral":
                raise _refuse(where, "use_sliding_window", True, "sliding-window layers are not implemented")
            # within the window, sliding-window attention is full causal attention: exact up to max_seq_len
            notes.append(f"max_seq_len capped at the sliding window ({window} < max_position_embeddings {max_len}): "
                         f"exact up to it")
            max_len = int(window)
        base, scaling = rope_of(hf, where)
        attention_bias = bool(_get(hf, "attention_bias", False))
        cfg = ModelConfig(
            name=str(hf.get("_name_or_path") or kind).rstrip("/").split("/")[-1] or kind,
            vocab_size=int(_require(hf, "vocab_size", where)), max_seq_len=max_len, d_model=d,
            n_layers=int(_require(hf, "num_hidden_layers", where)), n_heads=heads,
            d_ff=int(_require(hf, "intermediate_size", where)), mlp="swiglu", norm="rmsnorm",
            norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)), rope_base=base, rope_scaling=scaling,
            tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),  # these families' default
            n_kv_heads=None if kv == heads else kv, head_dim=None if head_dim * heads == d else head_dim,
            qkv_bias=True if kind == "qwen2" else attention_bias,
            attn_out_bias=False if kind == "qwen2" else attention_bias,
            mlp_bias=bool(_get(hf, "mlp_bias", False)), qk_norm=kind == "qwen3", layers=[LayerSpec()],
        )
        return Mapped(cfg, notes)

    def to_condformer(self, hf_weights: Tensors, cfg: ModelConfig) -> Tensors:
        src = {k.removeprefix("model."): v for k, v in hf_weights.items() if not self.ignorable(k)}
        out: Tensors = {"embed.weight": _take(src, "embed_tokens.weight"),
                        "final_norm.weight": _take(src, "norm.weight")}
        head = src.pop("lm_head.weight", None)
        if not cfg.tie_embeddings:
            if head is None:
                raise CheckpointError("the checkpoint lacks 'lm_head.weight', which an untied model needs; the weights "
                                  "are incomplete")
            out["head.weight"] = head
        for i in range(cfg.n_layers):
            h, c = f"layers.{i}.", f"layers.{i}.block."
            out[c + "pre_attn_norm.weight"] = _take(src, h + "input_layernorm.weight")
            out[c + "pre_ffn_norm.weight"] = _take(src, h + "post_attention_layernorm.weight")
            proj = [h + f"self_attn.{p}_proj" for p in "qkv"]
            out[c + "attn.qkv.weight"] = torch.cat([_take(src, p + ".weight") for p in proj])
            if cfg.qkv_bias:
                out[c + "attn.qkv.bias"] = torch.cat([_take(src, p + ".bias") for p in proj])
            out[c + "attn.out.weight"] = _take(src, h + "self_attn.o_proj.weight")
            if cfg.attn_out_bias:
                out[c + "attn.out.bias"] = _take(src, h + "self_attn.o_proj.bias")
            if cfg.qk_norm:
                out[c + "attn.q_norm.weight"] = _take(src, h + "self_attn.q_norm.weight")
                out[c + "attn.k_norm.weight"] = _take(src, h + "self_attn.k_norm.weight")
            gate_up = [h + "mlp.gate_proj", h + "mlp.up_proj"]
            out[c + "ffn.up.weight"] = torch.cat([_take(src, p + ".weight") for p in gate_up])
            out[c + "ffn.down.weight"] = _take(src, h + "mlp.down_proj.weight")
            if cfg.mlp_bias:
                out[c + "ffn.up.bias"] = torch.cat([_take(src, p + ".bias") for p in gate_up])
                out[c + "ffn.down.bias"] = _take(src, h + "mlp.down_proj.bias")
        _no_leftovers(src)
        return out

    def from_condformer(self, weights: Tensors, cfg: ModelConfig) -> Tensors:
        w = dict(weights)
        q, kv = cfg.attn_dim, cfg.kv_heads * cfg.head_size
        out: Tensors = {"model.embed_tokens.weight": w["embed.weight"], "model.norm.weight": w["final_norm.weight"]}
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = w["head.weight"]
        for i in range(cfg.n_layers):
            h, c = f"model.layers.{i}.", f"layers.{i}.block."
            out[h + "input_layernorm.weight"] = w[c + "pre_attn_norm.weight"]
            out[h + "post_attention_layernorm.weight"] = w[c + "pre_ffn_norm.weight"]
            for p, part in zip("qkv", w[c + "attn.qkv.weight"].split((q, kv, kv)), strict=True):
                out[h + f"self_attn.{p}_proj.weight"] = part
            if cfg.qkv_bias:
                for p, part in zip("qkv", w[c + "attn.qkv.bias"].split((q, kv, kv)), strict=True):
                    out[h + f"self_attn.{p}_proj.bias"] = part
            out[h + "self_attn.o_proj.weight"] = w[c + "attn.out.weight"]
            if cfg.attn_out_bias:
                out[h + "self_attn.o_proj.bias"] = w[c + "attn.out.bias"]
            if cfg.qk_norm:
                out[h + "self_attn.q_norm.weight"] = w[c + "attn.q_norm.weight"]
                out[h + "self_attn.k_norm.weight"] = w[c + "attn.k_norm.weight"]
            gate, up = w[c + "ffn.up.weight"].chunk(2)
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
            out[h + "mlp.down_proj.weight"] = w[c + "ffn.down.weight"]
            if cfg.mlp_bias:
                gate_b, up_b = w[c + "ffn.up.bias"].chunk(2)
                out[h + "mlp.gate_proj.bias"], out[h + "mlp.up_proj.bias"] = gate_b, up_b
                out[h + "mlp.down_proj.bias"] = w[c + "ffn.down.bias"]
        return {k: v.contiguous() for k, v in out.items()}

    @staticmethod
    def native_type(cfg: ModelConfig) -> str | None:
        """The transformers family that computes exactly this dense config, or None."""
        if cfg.positions != "rope" or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu":
            return None
        if cfg.qk_norm:
            return "qwen3" if cfg.qkv_bias == cfg.attn_out_bias and not cfg.mlp_bias else None
        if cfg.qkv_bias and not cfg.attn_out_bias:
            return "qwen2" if not cfg.mlp_bias and cfg.rope_scaling is None else None
        return "llama" if cfg.qkv_bias == cfg.attn_out_bias else None

    def hf_config(self, cfg: ModelConfig, model_type: str) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_base}
        if cfg.rope_scaling is not None:
            rope = {**{k: v for k, v in cfg.rope_scaling.items() if k != "type"},
                    "rope_type": cfg.rope_scaling["type"], "rope_theta": cfg.rope_base}
        out: dict[str, Any] = {
            "architectures": [self.ARCHITECTURES[model_type]], "model_type": model_type,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope,
            # transformers 4's spelling of the same (5 reads rope_parameters and accepts these)
            "rope_theta": cfg.rope_base, "rope_scaling": None if cfg.rope_scaling is None else rope,
            "attention_dropout": 0.0, "dtype": "float32",
        }
        if model_type in ("llama", "qwen3"):
            out["attention_bias"] = cfg.qkv_bias
        if model_type == "llama":
            out["mlp_bias"] = cfg.mlp_bias
        if model_type in ("mistral", "qwen2", "qwen3"):
            out.update(sliding_window=None, use_sliding_window=False)
        return out


class GPT2Family(Family):
    """GPT-2: learned positions, LayerNorms with biases, biased Conv1D projections (stored input-major)."""

    model_types = ("gpt2",)
    ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}

    def to_config(self, hf: dict[str, Any], where: str) -> Mapped:
        notes: list[str] = []
        act = _get(hf, "activation_function", "gelu_new")
        if act not in self.ACTIVATIONS:
            raise _refuse(where, "activation_function", act, "condformer has GELU (exact or tanh) MLPs")
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
            if bool(_get(hf, key, ok)) != ok:
                raise _refuse(where, key, hf[key], "not a plain GPT-2 decoder")
        drops = {k: hf[k] for k in ("embd_pdrop", "resid_pdrop", "attn_pdrop") if hf.get(k)}
        if drops:
            notes.append(f"dropout {drops} not carried over (condformer trains without dropout; inference is "
                         f"unchanged)")
        d = int(_require(hf, "n_embd", where))
        cfg = ModelConfig(
            name=str(hf.get("_name_or_path") or "gpt2").rstrip("/").split("/")[-1] or "gpt2",
            vocab_size=int(_require(hf, "vocab_size", where)), max_seq_len=int(_get(hf, "n_positions", 1024)),
            d_model=d, n_layers=int(_require(hf, "n_layer", where)), n_heads=int(_require(hf, "n_head", where)),
            d_ff=int(_get(hf, "n_inner", 4 * d)), mlp=self.ACTIVATIONS[act], norm="layernorm",
            norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)), tie_embeddings=bool(_get(hf, "tie_word_embeddings",
                                                                                             True)),
            positions="learned", qkv_bias=True, attn_out_bias=True, mlp_bias=True, layers=[LayerSpec()],
        )
        return Mapped(cfg, notes)

    PAIRS = (("ln_1", "pre_attn_norm", False), ("ln_2", "pre_ffn_norm", False), ("attn.c_attn", "attn.qkv", True),
             ("attn.c_proj", "attn.out", True), ("mlp.c_fc", "ffn.up", True), ("mlp.c_proj", "ffn.down", True))

    def to_condformer(self, hf_weights: Tensors, cfg: ModelConfig) -> Tensors:
        src = {k.removeprefix("transformer."): v for k, v in hf_weights.items() if not self.ignorable(k)}
        out: Tensors = {"embed.weight": _take(src, "wte.weight"), "pos_embed.weight": _take(src, "wpe.weight"),
                        "final_norm.weight": _take(src, "ln_f.weight"), "final_norm.bias": _take(src, "ln_f.bias")}
        head = src.pop("lm_head.weight", None)
        if not cfg.tie_embeddings:
            if head is None:
                raise CheckpointError("the checkpoint lacks 'lm_head.weight', which an untied model needs")
            out["head.weight"] = head
        for i in range(cfg.n_layers):
            for theirs, ours, conv in self.PAIRS:
                weight = _take(src, f"h.{i}.{theirs}.weight")
                out[f"layers.{i}.block.{ours}.weight"] = weight.t() if conv else weight  # Conv1D: (in, out)
                out[f"layers.{i}.block.{ours}.bias"] = _take(src, f"h.{i}.{theirs}.bias")
        _no_leftovers(src)
        return out

    def from_condformer(self, weights: Tensors, cfg: ModelConfig) -> Tensors:
        w = weights
        out: Tensors = {"transformer.wte.weight": w["embed.weight"], "transformer.wpe.weight": w["pos_embed.weight"],
                        "transformer.ln_f.weight": w["final_norm.weight"],
                        "transformer.ln_f.bias": w["final_norm.bias"]}
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = w["head.weight"]
        for i in range(cfg.n_layers):
            for theirs, ours, conv in self.PAIRS:
                weight = w[f"layers.{i}.block.{ours}.weight"]
                out[f"transformer.h.{i}.{theirs}.weight"] = weight.t() if conv else weight
                out[f"transformer.h.{i}.{theirs}.bias"] = w[f"layers.{i}.block.{ours}.bias"]
        return {k: v.contiguous() for k, v in out.items()}

    @staticmethod
    def native_type(cfg: ModelConfig) -> str | None:
        exact = (cfg.positions == "learned" and cfg.norm == "layernorm" and cfg.mlp in ("gelu", "gelu_tanh")
                 and cfg.qkv_bias and cfg.attn_out_bias and cfg.mlp_bias and not cfg.qk_norm
                 and cfg.kv_heads == cfg.n_heads and cfg.attn_dim == cfg.d_model)
        return "gpt2" if exact else None

    def hf_config(self, cfg: ModelConfig, model_type: str) -> dict[str, Any]:
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
                "n_inner": cfg.ffn_dim, "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
                "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "dtype": "float32"}


def _no_leftovers(src: Tensors) -> None:
    if src:
        names = sorted(src)
        raise CheckpointError(f"the checkpoint holds {len(names)} tensor(s) condformer's mapping does not use "
                          f"(e.g. '{names[0]}'); it is not the architecture its config names")


FAMILIES: dict[str, Family] = {t: fam for fam in (LlamaFamily(), GPT2Family()) for t in fam.model_types}


def family_of(hf: dict[str, Any], where: str) -> Family:
    """The family of a config.json, or a one-line error naming the architecture and what is supported."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        arch = (hf.get("architectures") or [kind])[0]
        raise ConfigError(f"{where}: architecture '{arch}' (model_type {kind!r}) is not supported; condformer "
                          f"imports {', '.join(sorted(FAMILIES))}")
    return FAMILIES[kind]


def native_family(cfg: ModelConfig, prefer: str | None = None) -> tuple[Family, str]:
    """The transformers family a dense condformer config exports to (``prefer``: the family it came from)."""
    candidates = []
    for fam in (LlamaFamily(), GPT2Family()):
        t = fam.native_type(cfg)
        if t is not None:
            candidates.append((fam, t))
    if not candidates:
        raise ConfigError(f"no transformers architecture computes this model exactly (positions {cfg.positions}, "
                          f"norm {cfg.norm}, mlp {cfg.mlp}); export it with --format condformer")
    fam, t = candidates[0]
    if prefer == "mistral" and t == "llama" and not (cfg.qkv_bias or cfg.mlp_bias):
        t = "mistral"  # an imported Mistral exports as Mistral again (a bias-free Llama computes the same)
    return fam, t
