"""Config files: JSON or YAML holding ``{"model": {...}, "train": {...}}``, optionally on top of a preset.

Above :mod:`condformer.presets` (a file may say ``{"model": {"preset": "small", "n_layers": 8}}``), so
:mod:`condformer.config` itself imports no preset and stays a leaf.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from condformer.checkpoint import write_text_atomic
from condformer.config import ModelConfig, TrainConfig
from condformer.errors import ConfigError
from condformer.presets import preset


def load_config_file(path: str | Path) -> tuple[ModelConfig, TrainConfig | None]:
    """Read a JSON or YAML file holding ``{"model": {...}, "train": {...}}`` (or just the model)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist; pass an existing .json/.yaml file")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass
        else:
            raw = json.loads(text)
    except Exception as e:  # both parsers raise their own types; report them the same way
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot parse config file '{p}': {first}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping with a 'model' key (and optionally 'train')")
    if "model" not in raw and "train" not in raw:  # just the model
        raw = {"model": raw}
    unknown = sorted(map(str, set(raw) - {"model", "train"}))
    if unknown or "model" not in raw:  # a misspelt section would otherwise be dropped silently
        what = f"unknown top-level key(s) {unknown}" if unknown else "no 'model' section"
        raise ConfigError(f"config file '{p}': {what}; it holds 'model' (and optionally 'train')")
    base = raw["model"].pop("preset", None) if isinstance(raw["model"], dict) else None
    if base is not None:  # {"model": {"preset": "small", "n_layers": 8}} overrides a preset
        merged = preset(base).to_dict()
        merged.update(raw["model"])
        raw["model"] = merged
    model = ModelConfig.from_dict(raw["model"]).validate()
    train = TrainConfig.from_dict(raw["train"]) if raw.get("train") is not None else None
    return model, train


def save_config_file(path: str | Path, model: ModelConfig, train: TrainConfig | None = None) -> None:
    """Write the config as JSON or YAML (by suffix), atomically: a kill leaves the old file or the new one."""
    p = Path(path)
    payload: dict[str, Any] = {"model": model.to_dict()}
    if train is not None:
        payload["train"] = train.to_dict()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        write_text_atomic(p, yaml.safe_dump(payload, sort_keys=False))
    else:
        write_text_atomic(p, json.dumps(payload, indent=2) + "\n")


def _yaml_loader() -> type:
    """PyYAML's safe loader, also reading ``3e-4`` as a float (YAML 1.1 floats need a dot: ``3.0e-4``)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    exponent_float = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent_float, list("-+0123456789."))
    return Loader
