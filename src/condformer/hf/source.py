"""Reading a Hugging Face model as it lies on disk: a model directory or a GGUF file, never the network.

A directory is what ``save_pretrained`` writes: ``config.json``, the weights as ``model.safetensors`` or
as shards listed in ``model.safetensors.index.json``, and the tokenizer files. Weights are read only from
safetensors (a ``pytorch_model.bin`` is a pickle, which could run code when loaded: refused). A GGUF file
is dequantised by transformers' own GGUF loader (it needs the ``gguf`` package), which also builds its
tokenizer; condformer then maps the resulting float weights like any other checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from condformer.errors import CheckpointError, ConfigError

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"


@dataclass
class Source:
    """A model as read from disk: its transformers config (a dict), float32 weights, its tokenizer."""

    path: Path
    format: str  # "safetensors" or "gguf"
    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    tokenizer: Any  # condformer.data.HFTokenizer, or None when the source has none
    notes: list[str] = field(default_factory=list)


def read_source(src: str | Path, *, need_tokenizer: bool = True) -> Source:
    """A model directory or a ``.gguf`` file as a :class:`Source`, with one-line errors for what is missing."""
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist; give a local Hugging Face model directory or a .gguf file "
                              f"(nothing is downloaded)")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _read_gguf(path, need_tokenizer)
    if path.is_file():
        raise CheckpointError(f"'{path}' is a file but not a .gguf; give a model directory (config.json + "
                              f"*.safetensors) or a GGUF file")
    return _read_directory(path, need_tokenizer)


def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"'{path}' has no {CONFIG_FILE}; a Hugging Face model directory (save_pretrained) "
                              f"holds one")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"'{file}' is not valid JSON ({e}); the model directory is corrupt") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"'{file}' is not a JSON object; the model directory is corrupt")
    return config


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: one file, or the shards its index lists."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"'{index}' is not a valid safetensors index ({e})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"'{path}' lacks the shard '{missing[0]}' that {INDEX_FILE} lists; the download is "
                                  f"incomplete")
        return [path / s for s in shards]
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise CheckpointError(f"'{path}' has only pickled weights (*.bin/*.pt), which condformer never loads (they "
                              f"can run code); convert them to safetensors with transformers' save_pretrained")
    raise CheckpointError(f"'{path}' has no weights: expected {WEIGHTS_FILE} or {INDEX_FILE} with its shards")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of ``files`` as float32 on the CPU (floating ones; integer buffers as they are)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open objects are not iterable)
                    if name in out:
                        raise CheckpointError(f"the tensor '{name}' is stored twice (again in '{file.name}'); the "
                                              f"checkpoint is corrupt")
                    t = f.get_tensor(name)
                    out[name] = t.float() if t.is_floating_point() else t
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read weights from '{file}': {e}") from None
    return out


def _read_directory(path: Path, need_tokenizer: bool) -> Source:
    config = _read_config(path)
    weights = read_safetensors(weight_files(path))
    tokenizer = None
    if need_tokenizer or (path / "tokenizer.json").is_file():
        from condformer.data.hf_tokenizer import HFTokenizer

        tokenizer = HFTokenizer.from_dir(path)
    return Source(path, "safetensors", config, weights, tokenizer)


def _read_gguf(path: Path, need_tokenizer: bool) -> Source:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("reading a GGUF file needs the 'gguf' package (transformers dequantises it with it); "
                          "pip install 'condformer[hf]'")
    transformers = _import_transformers("reading a GGUF file")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file: never reach for the hub
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"transformers cannot read the GGUF file '{path}': {first}") from None
    config = model.config.to_dict()
    weights = {k: v.detach().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    tokenizer = None
    if need_tokenizer:
        from condformer.data.hf_tokenizer import HFTokenizer

        tokenizer = HFTokenizer.from_transformers(
            transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
    return Source(path, "gguf", config, weights, tokenizer, [f"dequantised from GGUF by transformers "
                                                             f"{transformers.__version__}"])


def _import_transformers(purpose: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"{purpose} needs the 'transformers' package; pip install 'condformer[hf]'") from None
    return transformers
