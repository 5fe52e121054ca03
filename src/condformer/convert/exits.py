"""``--to exits``: LayerSkip's recipe on a pretrained decoder (Elhoushi et al. 2024).

An exit after each chosen layer, reading the residual stream through its own norm, *copied from the
model's final norm*, into the model's own LM head (``head: shared``) or into a head of its own copied
from it (``separate``). Nothing on the full-depth path changes, so the full-depth logits equal the source
model's exactly; the exits start as the logit lens of the pretrained model and continual training with
LayerSkip's layer dropout and early-exit loss (its ``rotating`` / ``gradual`` curricula spare most of the
vocabulary projections) makes them good drafters for self-speculative decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from condformer.config import ExitConfig, ModelConfig
from condformer.errors import ConfigError

DEFAULT_LAYERS = "all"
OPTIONS: dict[str, Any] = {"head": "shared", "layer_dropout": 0.1, "curriculum": "rotating", "curriculum_period": 4,
                           "curriculum_steps": 0, "exit_weights": "increasing"}


def configure(cfg: ModelConfig, layers: list[int], o: dict[str, Any]) -> tuple[ModelConfig, list[str]]:
    if cfg.exits is not None:
        raise ConfigError("this model already has exits; convert a model without them (or train this one)")
    early = [i for i in layers if i != cfg.n_layers - 1]
    if not early:
        raise ConfigError(f"--layers selects only the last layer, whose exit is the model's own head; choose earlier "
                          f"layers (0-{cfg.n_layers - 2})")
    weights = o["exit_weights"]
    exits = ExitConfig(layers=early, head=o["head"], weights=weights, layer_dropout=o["layer_dropout"],
                       curriculum=o["curriculum"], curriculum_period=o["curriculum_period"],
                       curriculum_steps=o["curriculum_steps"])
    notes = []
    if o["layer_dropout"] > 0:
        notes.append(f"layer dropout p_max {o['layer_dropout']} in training (evaluation and generation run every "
                     f"layer)")
    return dataclasses.replace(cfg, exits=exits), notes


@torch.no_grad()
def initialise(model: torch.nn.Module, source: dict[str, torch.Tensor], cfg: ModelConfig, layers: list[int],
               o: dict[str, Any]) -> None:
    """Each exit's norm is the final norm; a separate head is the LM head: every exit starts as the logit lens."""
    for norm in model.exits.norms:
        norm.load_state_dict(model.final_norm.state_dict())
    if model.exits.heads is not None:
        for head in model.exits.heads:
            head.weight.copy_(model.head.weight)
