"""``condformer export``: a run as a directory transformers loads with ``AutoModelForCausalLM.from_pretrained``.

Two formats. ``native``: a dense model (every layer the plain Pre-LN block with dense routing and an MLP,
no AltUp, no exits) becomes the transformers architecture that computes exactly the same function
(Llama, Mistral, Qwen2, Qwen3 or GPT-2; an imported model goes back to the family it came from), with
the same logits and nothing of condformer needed to load it. ``condformer``: any model, conditional
computation included, as condformer's own transformers type (:mod:`condformer.hf.wrapper`), whose
``generate()`` runs condformer's cached decoding; loading it needs ``import condformer.hf``. ``auto``
(the default) picks native when the model allows it. The directory is written under a hidden name and
renamed into place, so a failed export leaves nothing half-written at ``out``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from condformer.config import ModelConfig
from condformer.errors import CheckpointError, ConfigError
from condformer.hf.families import native_family
from condformer.hf.tokenizer_files import write_tokenizer

FORMATS = ("auto", "native", "condformer")


def dense_reason(cfg: ModelConfig) -> str | None:
    """Why ``cfg`` is not a plain dense decoder (None when it is): what a native architecture cannot hold."""
    if cfg.kind != "decoder":
        return "it is an encoder"
    if cfg.altup is not None:
        return "it uses AltUp"
    if cfg.exits is not None:
        return "it has early exits"
    for i, spec in enumerate(cfg.layer_specs()):
        if (spec.block, spec.router, spec.ffn) != ("preln", "dense", "mlp") or not spec.options.get("block_norm", True):
            return f"layer {i} is {spec.block}/{spec.router}/{spec.ffn}" + (
                " without block norms" if not spec.options.get("block_norm", True) else "")
    return None


def native_files(model: Any, cfg: ModelConfig, prefer: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json dict, transformers-named tensors) of a dense model in its native architecture."""
    reason = dense_reason(cfg)
    if reason is not None:
        raise ConfigError(f"a native transformers export needs a dense model, and {reason}; use --format condformer "
                          f"(any model, loaded through condformer's own transformers type)")
    family, model_type = native_family(cfg, prefer)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return family.hf_config(cfg, model_type), family.from_condformer(weights, cfg)


def export_model(run: str | Path, out: str | Path, fmt: str = "auto") -> dict[str, Any]:
    """Export the run (or checkpoint) ``run`` into the new directory ``out``; returns what was written."""
    from safetensors.torch import save_file

    from condformer.checkpoint import load_for_inference

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"'{out}' already exists and is not empty; choose another --out")
    ck, model, tok = load_for_inference(run)
    model = model.cpu()
    cfg = ck.model_cfg
    if fmt == "auto":
        fmt = "native" if dense_reason(cfg) is None and _native_ok(cfg) else "condformer"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.exporting-"))
    try:
        if fmt == "native":
            prefer = (ck.state.get("source") or {}).get("model_type")
            config, tensors = native_files(model, cfg, prefer)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            architecture = config["architectures"][0]
        else:
            from condformer.hf.wrapper import save_as_transformers

            save_as_transformers(model, tmp, tokenizer=tok)  # its special ids go into the config too
            architecture = "CondformerForCausalLM"
        if fmt == "native":
            write_tokenizer(tok, tmp)
        with contextlib.suppress(OSError):
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"run": str(ck.path), "out": str(out), "format": fmt, "architecture": architecture}


def _native_ok(cfg: ModelConfig) -> bool:
    try:
        native_family(cfg)
    except ConfigError:
        return False
    return True
