"""Any condformer model as a transformers model of its own type, ``model_type="condformer"``.

A native architecture (Llama, GPT-2, ... in :mod:`condformer.hf.exporter`) can only hold a dense model; this
type holds every condformer model, conditional computation included (MoD, MoE, AltUp, exits), so that
transformers' tools work on it unchanged: ``AutoModelForCausalLM.from_pretrained`` (after importing this
module, which registers the type), ``save_pretrained`` (config.json + safetensors), ``Trainer`` and
``generate()``, which runs condformer's own KV-cached decoding (adaptive depth for models with exits).

The condformer model config travels whole inside the transformers config (``CondformerConfig.condformer``),
so nothing about the architecture is re-derived from transformers' field names; those fields
(``hidden_size``, ...) are only mirrored for utilities that read them. Written for transformers 5.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.initialization import no_init_weights
from transformers.modeling_outputs import CausalLMOutputWithPast

from condformer.config import ModelConfig
from condformer.errors import CondformerError
from condformer.generation import SamplingConfig
from condformer.generation import generate as condformer_generate
from condformer.losses import IGNORE_INDEX
from condformer.model import Transformer

__all__ = ["CondformerConfig", "CondformerForCausalLM", "from_condformer", "register", "save_as_transformers"]

MODEL_TYPE = "condformer"


class CondformerConfig(PreTrainedConfig):
    """The transformers config of a condformer model: the whole :class:`ModelConfig` dict in ``condformer``.

    ``condformer`` is the source of truth: the mirrored fields (``vocab_size``, ``hidden_size`` = d_model,
    ``num_hidden_layers``, ``num_attention_heads``, ``max_position_embeddings``, ``tie_word_embeddings``) are
    overwritten from it, so they can never disagree with the model that gets built. ``inference``: the model's
    run-time inference knobs (``Transformer.inference_settings()``, e.g. MoD routing or exit thresholds) at
    export, re-applied when the model is built, since they change its outputs and live outside ModelConfig.
    """

    model_type = MODEL_TYPE

    condformer: dict[str, Any] | None = None
    inference: dict[str, Any] | None = None
    vocab_size: int = 260
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # validated here, so a bad config.json fails at load with condformer's one-line error
        cfg = ModelConfig() if self.condformer is None else ModelConfig.from_dict(copy.deepcopy(self.condformer))
        cfg.validate()
        self.condformer = cfg.to_dict()  # normalised: every field written, so later default changes cannot leak in
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.d_model
        self.num_hidden_layers = cfg.n_layers
        self.num_attention_heads = cfg.n_heads
        self.max_position_embeddings = cfg.max_seq_len
        self.tie_word_embeddings = cfg.tie_embeddings
        super().__post_init__(**kwargs)

    @classmethod
    def from_condformer_config(cls, cfg: ModelConfig, inference: dict[str, Any] | None = None,
                               **kwargs: Any) -> CondformerConfig:
        """The transformers config holding ``cfg`` (and, optionally, inference knob settings)."""
        return cls(condformer=cfg.to_dict(), inference=inference or None, **kwargs)

    def to_model_config(self) -> ModelConfig:
        """A fresh, validated :class:`ModelConfig` (a copy: changing it leaves this config alone)."""
        return ModelConfig.from_dict(copy.deepcopy(self.condformer)).validate()


# generate() options: the value that means "off" for each option condformer's decoder does not implement;
# anything else changes what would be generated, so it is refused rather than silently ignored
_NEUTRAL: dict[str, Any] = {
    "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "diversity_penalty": 0.0,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "top_h": None, "penalty_alpha": None,
    "bad_words_ids": None, "force_words_ids": None, "constraints": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "sequence_bias": None, "guidance_scale": None, "watermarking_config": None, "max_time": None,
    "stop_strings": None, "exponential_decay_length_penalty": None, "dola_layers": None, "token_healing": False,
    "output_scores": False, "output_logits": False, "output_attentions": False, "output_hidden_states": False,
    "return_dict_in_generate": False, "logits_processor": None, "stopping_criteria": None,
    "prefix_allowed_tokens_fn": None, "assistant_model": None, "prompt_lookup_num_tokens": None,
    "negative_prompt_ids": None, "negative_prompt_attention_mask": None, "use_mtp": False,
    "remove_invalid_values": False, "renormalize_logits": False,
}
# options that cannot change the generated tokens here (a cache is always used; beam-only settings; ...)
_IGNORED = frozenset({
    "use_cache", "synced_gpus", "early_stopping", "length_penalty", "cache_implementation", "cache_config",
    "max_cache_len", "compile_config", "disable_compile", "low_memory", "bos_token_id", "decoder_start_token_id",
    "tokenizer", "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "assistant_lookbehind", "target_lookbehind", "assistant_early_exit", "assistant_ensemble_weight",
    "max_matching_ngram_size", "speculation_type", "is_assistant", "prefill_chunk_size",
    "continuous_batching_config", "transformers_version", "_from_model_config",
})
# forward() options that would change what the forward computes
_FORWARD_NEUTRAL: dict[str, Any] = {
    "inputs_embeds": None, "past_key_values": None, "cache_position": None, "output_attentions": False,
    "output_hidden_states": False, "logits_to_keep": 0,
}


def _is_neutral(value: Any, neutral: Any) -> bool:
    """Whether an option is unset or at its "off" value (None always means unset in transformers 5)."""
    if value is None or isinstance(value, torch.Tensor):
        return value is None
    if isinstance(value, (list, tuple)) and not value and neutral is None:  # an empty processor list
        return True
    return value == neutral


def _short(value: Any) -> str:
    """A value shortened to fit a one-line error message."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse_options(options: dict[str, Any], where: str, neutral: dict[str, Any], unknown_ok: bool) -> None:
    """One-line ValueError for the first option set to something the caller would get silently wrong."""
    for name, value in options.items():
        if name in neutral:
            if not _is_neutral(value, neutral[name]):
                raise ValueError(f"{where}: {name}={_short(value)} is not supported by condformer's decoder "
                                 f"(it does greedy and temperature/top-k/top-p sampling only)")
        elif not unknown_ok and name not in _IGNORED:
            raise ValueError(f"{where}: unknown option '{name}'")


def _one_eos(eos: Any) -> int | None:
    """transformers allows several eos ids; condformer's decoder stops at one."""
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    if isinstance(eos, (list, tuple)):
        if len(eos) > 1:
            raise ValueError(f"generate(): eos_token_id={_short(list(eos))}: condformer's decoder stops at one "
                             f"eos token; pass a single id")
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def _non_persistent_buffers(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(qualified name, tensor) of every buffer not in the state dict: what no checkpoint can restore."""
    for prefix, sub in module.named_modules():
        for name in sub._non_persistent_buffers_set:
            buf = getattr(sub, name, None)
            if buf is not None:
                yield (f"{prefix}.{name}" if prefix else name), buf


class CondformerForCausalLM(PreTrainedModel, GenerationMixin):
    """A condformer decoder (any techniques) behind transformers' causal-LM interface.

    ``self.model`` is the condformer :class:`Transformer` itself; the forward maps transformers' conventions
    (``attention_mask``, labels shifted inside) onto condformer's (``valid_BT``, positions, targets).

    Loss: in training mode, condformer's ``train_loss`` (the LM loss, or an exit model's weighted exit
    objective, plus every auxiliary loss: MoE balance/z, MoD predictor, halting), so ``Trainer`` optimises
    exactly what ``condformer train`` does; in eval mode the plain LM loss of the final layer, comparable with
    any other causal LM's evaluation loss. ``Trainer`` is told not to pass ``num_items_in_batch``
    (``accepts_loss_kwargs = False``): the loss is a per-batch mean and gradient accumulation averages batches.
    """

    config_class = CondformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    # transformers 5's form: {target: source}; only used when config.tie_word_embeddings (= cfg.tie_embeddings)
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}
    accepts_loss_kwargs = False
    supports_gradient_checkpointing = False

    def __init__(self, config: CondformerConfig, model: Transformer | None = None) -> None:
        super().__init__(config)
        cfg = model.cfg if model is not None else config.to_model_config()
        if not cfg.causal:
            raise ValueError("CondformerForCausalLM needs a decoder; this condformer model is an encoder (masked LM)")
        self.model = model if model is not None else Transformer(cfg)
        if model is None and config.inference:
            self.model.set_inference(missing="ignore", **config.inference)
        # from_pretrained builds the model on the meta device, then replaces its non-persistent buffers (rotary
        # frequencies, exit depths and weights) with torch.empty_like and expects _init_weights to recompute them
        self._restore_buffers = any(b.is_meta for _, b in _non_persistent_buffers(self.model))
        self._fresh_buffers: dict[str, torch.Tensor] | None = None
        self._module_names: dict[int, str] = {}
        self.post_init()

    # -- weights -----------------------------------------------------------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        """Keep condformer's own initialisation (done by its constructors); only refill non-persistent buffers.

        transformers' generic init would re-draw every weight with its own scheme, which is not condformer's
        (e.g. MoD predictors, AltUp coefficients, zero-initialised shaped-attention matrices). A from_pretrained
        load restores every parameter and persistent buffer from the checkpoint; the non-persistent ones are
        copied from a model built on the CPU without running any initialiser (cheap: untouched memory).
        """
        if not self._restore_buffers:
            return
        own = [name for name in module._non_persistent_buffers_set if getattr(module, name, None) is not None]
        if not own:
            return
        if self._fresh_buffers is None:
            with torch.device("cpu"), no_init_weights():
                shadow = Transformer(self.model.cfg)
            self._fresh_buffers = {f"model.{k}": v for k, v in _non_persistent_buffers(shadow)}
            self._module_names = {id(sub): name for name, sub in self.named_modules()}
        prefix = self._module_names[id(module)]
        with torch.no_grad():
            for name in own:
                getattr(module, name).copy_(self._fresh_buffers[f"{prefix}.{name}" if prefix else name])

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the embedding (same vocabulary size: condformer's config fixes it), re-tying a tied head."""
        if value.weight.shape != self.model.embed.weight.shape:
            raise ValueError(f"the new input embedding has shape {tuple(value.weight.shape)}, but this condformer "
                             f"model's is {tuple(self.model.embed.weight.shape)}; resizing is not supported")
        self.model.embed = value
        if self.model.cfg.tie_embeddings:
            self.model.head.weight = value.weight

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        if value.weight.shape != self.model.head.weight.shape:
            raise ValueError(f"the new output embedding has shape {tuple(value.weight.shape)}, but this condformer "
                             f"model's head is {tuple(self.model.head.weight.shape)}; resizing is not supported")
        self.model.head = value

    # -- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (B, T, V) and, with ``labels``, the loss (see the class docstring for which loss).

        ``labels``: transformers' convention, the input ids themselves: position t is scored on labels[t + 1],
        -100 ignored (padding is ignored only where labels say so, as in every transformers causal LM).
        ``attention_mask`` zeros (left padding) become condformer's ``valid_BT``, and each row's positions
        start at 0 at its first real token, so a padded row gives the logits its prompt gives alone.
        Other keyword arguments are accepted and ignored, except those that would change the computation.
        """
        _refuse_options({k: v for k, v in kwargs.items() if k in _FORWARD_NEUTRAL}, "forward()", _FORWARD_NEUTRAL,
                        unknown_ok=True)
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("forward() needs input_ids of shape (batch, sequence)")
        seq_len = input_ids.shape[1]
        if seq_len > self.model.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds the model's max_seq_len "
                             f"{self.model.cfg.max_seq_len}")
        valid = None
        positions = position_ids
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            valid = attention_mask.bool()
            if positions is None:
                positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        targets = None
        if labels is not None:
            targets = F.pad(labels[:, 1:].long(), (0, 1), value=IGNORE_INDEX)
        out = self.model(input_ids, targets, positions_BT=positions, valid_BT=valid)
        loss = None
        if targets is not None:
            loss = out.train_loss if self.model.training else out.loss
        result = CausalLMOutputWithPast(loss=loss, logits=out.logits)
        use_dict = self.config.return_dict if return_dict is None else return_dict
        return result if use_dict else result.to_tuple()

    # -- generation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> torch.LongTensor:
        """Continue each row with condformer's KV-cached decoding; returns (B, prompt_len + new) like transformers.

        Each row is the prompt (as given, padding included) followed by its new tokens; rows that stopped at
        ``eos_token_id`` early are right-padded with ``pad_token_id`` (or the eos id). Rows of a left-padded
        batch are stripped of their padding (``attention_mask``) first, so each row gets what its prompt gets
        alone. A model with exits (and thresholds or a halting module) decodes with adaptive depth.
        ``generation_config`` fields override the defaults here and explicit arguments override it. Unlike
        transformers' sampling, ``top_k`` is off unless given (transformers defaults to 50). Sampling draws
        from torch's global generator, so ``torch.manual_seed`` makes it reproducible. Options condformer's
        decoder does not implement (beam search, repetition penalties, ...) raise a one-line ValueError.
        """
        streamer = kwargs.pop("streamer", None)
        max_length = kwargs.pop("max_length", None)
        _refuse_options(kwargs, "generate()", _NEUTRAL, unknown_ok=False)
        s = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature, "top_k": top_k,
             "top_p": top_p, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
        defaults = {"max_new_tokens": 20, "do_sample": False, "temperature": 1.0, "top_k": None, "top_p": None,
                    "eos_token_id": None, "pad_token_id": None}
        gen_max_new = None
        if generation_config is not None:
            gc = generation_config.to_dict()
            _refuse_options({k: v for k, v in gc.items() if k in _NEUTRAL}, "generate(generation_config)", _NEUTRAL,
                            unknown_ok=True)
            gen_max_new = gc.get("max_new_tokens")
            max_length = max_length if max_length is not None else gc.get("max_length")
            for key, default in defaults.items():  # an argument left at its default takes the config's value
                if gc.get(key) is not None and s[key] == default:
                    s[key] = gc[key]
        own = self.generation_config  # the model's defaults (eos/pad ids from its config), as in transformers
        for key in ("eos_token_id", "pad_token_id"):
            if s[key] is None and own is not None:
                s[key] = getattr(own, key, None)
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("generate() needs input_ids of shape (batch, prompt length)")
        B, T = input_ids.shape
        if max_length is not None and max_new_tokens == 20 and gen_max_new is None:
            s["max_new_tokens"] = int(max_length) - T  # transformers: max_length counts the prompt
        eos = _one_eos(s["eos_token_id"])
        pad = s["pad_token_id"]
        pad = int(pad) if pad is not None else eos
        if attention_mask is None:
            prompts = input_ids.tolist()
        else:
            mask = attention_mask.bool()
            if mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(input_ids.shape)}")
            if bool((mask[:, 1:] < mask[:, :-1]).any()):
                raise ValueError("generate() needs left padding: attention_mask has zeros after a row's first "
                                 "real token (pad on the left, e.g. tokenizer.padding_side = 'left')")
            prompts = [row[m].tolist() for row, m in zip(input_ids, mask, strict=True)]
        top_k = s["top_k"]
        top_p = s["top_p"]
        sampling = SamplingConfig(
            max_new_tokens=int(s["max_new_tokens"]), greedy=not s["do_sample"], temperature=float(s["temperature"]),
            top_k=None if top_k is None or int(top_k) == 0 else int(top_k),  # transformers: top_k=0 is off
            top_p=None if top_p is None or float(top_p) >= 1 else float(top_p), eos_id=eos)
        on_tokens = None
        if streamer is not None:
            streamer.put(input_ids.cpu())
            on_tokens = lambda tok: streamer.put(tok.cpu())  # noqa: E731
        try:
            new = condformer_generate(self.model, prompts, sampling, pad_id=0 if pad is None else pad,
                                      on_tokens=on_tokens)
        except CondformerError as exc:  # condformer's one-line errors, as the ValueError transformers users expect
            raise ValueError(str(exc)) from exc
        finally:
            if streamer is not None:
                streamer.end()
        width = max(len(row) for row in new)
        out = torch.full((B, T + width), 0 if pad is None else pad, dtype=torch.long, device=input_ids.device)
        out[:, :T] = input_ids
        for i, row in enumerate(new):
            out[i, T:T + len(row)] = torch.tensor(row, dtype=torch.long)
        return out


_REGISTERED = False


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type="condformer"``; safe to call again."""
    global _REGISTERED
    if _REGISTERED:
        return
    AutoConfig.register(MODEL_TYPE, CondformerConfig, exist_ok=True)
    AutoModelForCausalLM.register(CondformerConfig, CondformerForCausalLM, exist_ok=True)
    _REGISTERED = True


def _json_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Inference knob settings as they go into config.json (a knob with a value JSON cannot hold is an error)."""
    out = {}
    for name, value in settings.items():
        try:
            out[name] = json.loads(json.dumps(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"inference setting '{name}'={_short(value)} cannot be stored in config.json") from exc
    return out


def from_condformer(model: Transformer) -> CondformerForCausalLM:
    """Wrap ``model`` (its very modules and weights, nothing copied) as a :class:`CondformerForCausalLM`."""
    config = CondformerConfig.from_condformer_config(model.cfg, _json_settings(model.inference_settings()))
    wrapped = CondformerForCausalLM(config, model=model)
    wrapped.train(model.training)  # the wrapper starts in nn.Module's default (training) mode
    return wrapped


def _special_ids(tokenizer: Any) -> dict[str, int | None]:
    if hasattr(tokenizer, "save_pretrained"):  # a transformers tokenizer
        names = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "pad_token_id"}
    else:  # a condformer tokenizer
        names = {"bos": "bos_id", "eos": "eos_id", "pad": "pad_id"}
    return {key: getattr(tokenizer, attr, None) for key, attr in names.items()}


def save_as_transformers(model: Transformer, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` as a transformers model directory (config.json, model.safetensors, generation_config.json).

    Load it with ``AutoModelForCausalLM.from_pretrained(out_dir)`` after ``import condformer.hf.wrapper``.
    Weights are saved as safetensors only (transformers 5 never writes pickles). ``tokenizer``: a transformers
    tokenizer (saved next to the model) or a condformer one (a pretrained model's own tokenizer is written
    as transformers' files; byte and BPE tokenizers have none); either way its bos/eos/pad ids go into the
    config, so ``generate()`` stops at eos by default as transformers models do.
    """
    out = Path(out_dir)
    wrapped = from_condformer(model)
    if tokenizer is not None:
        for key, value in _special_ids(tokenizer).items():
            if value is not None:
                setattr(wrapped.config, f"{key}_token_id", int(value))
                setattr(wrapped.generation_config, f"{key}_token_id", int(value))
    wrapped.save_pretrained(out)
    if tokenizer is not None:
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(out)
        else:
            from condformer.hf.tokenizer_files import write_tokenizer

            write_tokenizer(tokenizer, out)
    return out


register()
