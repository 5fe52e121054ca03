"""The conversion every technique shares: read a run, rebuild it with the technique, carry the weights, write.

A technique (``exits``, ``mod``, ``moe``) supplies two functions: ``configure`` (the new config, checked) and
``initialise`` (the new parameters, from the source weights, so the function is kept where the technique
allows). Everything else is here: every tensor whose name and shape the new model shares is copied; what is
left is *new* and recorded in the run (``state.json``'s ``new_parameters``: the ``new`` role of
``train --train`` and ``--lr-new``); a probe batch measures how far the converted model's logits are from the
source's (reported, and 0 where the technique promises it); and the run is assembled in a hidden sibling
directory and renamed into place, so a failed conversion leaves nothing behind and never touches the source.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from condformer.checkpoint import check_new_run_dir, check_weights_fit, load_weights, read_checkpoint, write_new_run
from condformer.config import ModelConfig
from condformer.convert import exits, mod, moe
from condformer.convert.layer_selection import select_layers
from condformer.errors import ConfigError

TECHNIQUES: dict[str, ModuleType] = {"exits": exits, "mod": mod, "moe": moe}
PROBE_TOKENS = 32


@dataclass
class ConvertReport:
    """What a conversion did, and how far the converted model's logits are from the source's at conversion."""

    source: str
    out: str
    technique: str
    layers: list[int]
    options: dict[str, Any]
    params_before: int
    params_after: int
    new_params: int
    max_logit_diff_train: float  # training-mode forward (top-k routing, exits at full depth), probe batch
    max_logit_diff_eval: float  # evaluation-mode forward (causal routing, dropless)
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def technique_options(technique: str, given: dict[str, Any]) -> dict[str, Any]:
    """The technique's defaults overridden by ``given``; an option of another technique is a one-line error."""
    if technique not in TECHNIQUES:
        raise ConfigError(f"unknown technique '{technique}' for --to; choose one of: {', '.join(TECHNIQUES)}")
    defaults = TECHNIQUES[technique].OPTIONS
    foreign = sorted(k for k, v in given.items() if v is not None and k not in defaults)
    if foreign:
        owners = {k: t for t, m in TECHNIQUES.items() for k in m.OPTIONS}
        flag = "--" + foreign[0].replace("_", "-")
        raise ConfigError(f"{flag} is an option of --to {owners.get(foreign[0], '?')}, not of --to {technique}; "
                          f"drop it")
    return {**defaults, **{k: v for k, v in given.items() if v is not None}}


def plan(model_cfg: ModelConfig, technique: str, layers: str | None, given: dict[str, Any]
         ) -> tuple[ModelConfig, list[int], dict[str, Any], list[str]]:
    """(new config, chosen layers, resolved options, notes): every check, before any weight is read."""
    options = technique_options(technique, given)
    t = TECHNIQUES[technique]
    chosen = select_layers(layers or t.DEFAULT_LAYERS, model_cfg.n_layers)
    if not chosen:
        raise ConfigError(f"--layers '{layers}' selects no layer of this {model_cfg.n_layers}-layer model")
    cfg, notes = t.configure(model_cfg, chosen, options)
    return cfg.validate(), chosen, options, notes


def convert_run(run: str | Path, technique: str, out: str | Path, *, layers: str | None = None,
                seed: int = 0, **given: Any) -> ConvertReport:
    """Convert the run ``run`` with ``technique`` into the new run directory ``out`` (see the module docstring)."""
    from condformer.model import build_model

    started = time.perf_counter()
    out = Path(out)
    check_new_run_dir(out, "a conversion")
    ck = read_checkpoint(run)
    cfg, chosen, options, notes = plan(ck.model_cfg, technique, layers, given)
    check_weights_fit(ck)
    source = build_model(ck.model_cfg)
    load_weights(ck, source)
    source.eval()
    source_state = source.state_dict()

    torch.manual_seed(seed)  # the new parameters' random part (an MoE router) is reproducible
    model = build_model(cfg)
    target = model.state_dict()
    carried = {n: t for n, t in source_state.items() if n in target and target[n].shape == t.shape}
    model.load_state_dict(carried, strict=False)
    TECHNIQUES[technique].initialise(model, source_state, cfg, chosen, options)
    model.eval()
    source_params = {n for n, _ in source.named_parameters()}
    new = sorted(n for n, _ in model.named_parameters() if n not in source_params)
    diff_train, diff_eval = _logit_diffs(source, model, cfg)

    state = {k: v for k, v in ck.state.items() if k in ("tokenizer", "data")}
    state["source"] = {**ck.state.get("source", {}), "converted_from": str(Path(run).resolve())}
    state["conversion"] = {"technique": technique, "layers": chosen, "options": options}
    state["new_parameters"] = new
    write_new_run(out, model, state, cfg, ck.train_cfg, "converting")
    added = set(new)
    return ConvertReport(str(run), str(out), technique, chosen, options, source.num_params(non_embedding=False),
                         model.num_params(non_embedding=False),
                         sum(p.numel() for n, p in model.named_parameters() if n in added),
                         diff_train, diff_eval, time.perf_counter() - started, notes)


@torch.no_grad()
def _logit_diffs(source: torch.nn.Module, model: torch.nn.Module, cfg: ModelConfig) -> tuple[float, float]:
    """max |logits - source logits| on one random probe sequence, in training mode and in evaluation mode.

    Training mode draws no random numbers here that matter: layer dropout is switched off for the probe.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (1, min(PROBE_TOKENS, cfg.max_seq_len)), generator=g)
    want = source(x).logits
    diffs = []
    for training in (True, False):
        model.train(training)
        with _no_layer_dropout(model):
            diffs.append(float((model(x).logits - want).abs().max()))
    model.eval()
    return diffs[0], diffs[1]


@contextlib.contextmanager
def _no_layer_dropout(model: torch.nn.Module):  # noqa: ANN202
    exits_module = getattr(model, "exits", None)
    if exits_module is None or exits_module.spec.layer_dropout == 0:
        yield
        return
    spec = exits_module.spec
    saved, spec.layer_dropout = spec.layer_dropout, 0.0
    try:
        yield
    finally:
        spec.layer_dropout = saved
