"""``condformer import``: a Hugging Face model (directory or GGUF) as an ordinary condformer run directory.

The run holds the mapped config, the weights as a step-0 checkpoint (safetensors) and the model's own
tokenizer, so every command takes it: ``eval``, ``generate``, ``bench``, ``inspect``, ``flops``, and
``train --init-from RUN`` to fine-tune it. Everything is checked before anything is written (the config
maps exactly, every tensor is there with the shape the config implies, the tokenizer fits the
vocabulary), and the run is assembled in a hidden sibling directory and renamed into place, so a failed
import leaves no RUN behind and a finished one is complete.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from condformer.checkpoint import check_new_run_dir, write_new_run
from condformer.config import ModelConfig, TrainConfig
from condformer.errors import CheckpointError
from condformer.hf.families import family_of
from condformer.hf.source import Source, read_source


@dataclass
class ImportReport:
    """What an import did: where from, what model, what was not carried over, how long it took."""

    source: str
    format: str
    model_type: str
    out: str
    params: int
    n_layers: int
    d_model: int
    vocab_size: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_condformer(source: Source) -> tuple[ModelConfig, dict[str, torch.Tensor], list[str], str]:
    """(config, condformer-named weights, notes, model_type) of a source, checked against the config's model."""
    where = str(source.path)
    family = family_of(source.config, where)
    mapped = family.to_config(source.config, where)
    cfg = mapped.config.validate()
    weights = family.to_condformer(dict(source.weights), cfg)
    check_shapes(weights, cfg, where)
    return cfg, weights, [*source.notes, *mapped.notes], source.config["model_type"]


def check_shapes(weights: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> None:
    """Each mapped tensor against the config's model (built on the meta device: no memory): one line per mismatch."""
    from condformer.model import build_model

    with torch.device("meta"):
        expected = build_model(cfg).state_dict()
    if cfg.tie_embeddings:
        expected.pop("head.weight", None)
    for name, t in weights.items():
        if name not in expected:
            raise CheckpointError(f"{where}: the mapped tensor '{name}' has no place in the model; the weights do not "
                                  f"match their config")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{where}: a tensor for '{name}' has shape {list(t.shape)}, the config implies "
                                  f"{list(expected[name].shape)}; the weights do not match their config")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError(f"{where}: no weights for '{missing[0]}'; the checkpoint is incomplete")


def build_imported(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The condformer model holding ``weights`` (float32, eval mode)."""
    from condformer.model import build_model

    model = build_model(cfg)
    model.load_state_dict(weights, strict=not cfg.tie_embeddings)  # a tied head is the embedding itself
    return model.eval()


def import_model(src: str | Path, out: str | Path) -> ImportReport:
    """Import ``src`` (a model directory or a .gguf file) into the new run directory ``out``."""
    started = time.perf_counter()
    out = Path(out)
    check_new_run_dir(out, "an import")
    source = read_source(src)
    cfg, weights, notes, model_type = to_condformer(source)
    tok = source.tokenizer
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{source.path}: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary "
                              f"only {cfg.vocab_size}; they do not belong together")
    model = build_imported(cfg, weights)
    train_cfg = TrainConfig(tokenizer=tok.name, seq_len=min(256, cfg.max_seq_len), max_steps=1)
    state = {"tokenizer": tok.to_dict(), "source": {"path": str(Path(src).resolve()), "format": source.format,
                                                    "model_type": model_type, "notes": notes}}
    write_new_run(out, model, state, cfg, train_cfg, "importing")
    return ImportReport(str(src), source.format, model_type, str(out), model.num_params(non_embedding=False),
                        cfg.n_layers, cfg.d_model, cfg.vocab_size, time.perf_counter() - started, notes)
