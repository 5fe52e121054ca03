"""Which parameters a run trains: roles (``routers``, ``exits``, ``new``, ...) and parameter-name patterns.

Fine-tuning a converted model is mostly a choice of what to move: router tuning trains only the routers of a
frozen pretrained backbone; LayerSkip-style continual training moves everything. A frozen parameter gets
``requires_grad = False``: no gradient is computed for it, the optimiser never holds it (no state, no weight
decay), so it is bit-for-bit the loaded value at the end of the run.

An entry of ``TrainConfig.trainable`` is a role from :data:`ROLES` or a glob over parameter names as
``model.named_parameters()`` spells them (``layers.1[0-9].*``, ``*.attn.*``); a parameter is trained when any
entry selects it. An entry that selects nothing is an error (a typo would otherwise freeze the whole model).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

from torch import nn

from condformer.errors import ConfigError

_MOD_ROUTER = re.compile(r"^layers\.\d+\.(router|predictor)\.")
_MOE_ROUTER = re.compile(r"\.ffn\.router\.")

ROLES: dict[str, tuple[str, Callable[[str, frozenset[str]], bool]]] = {
    "all": ("every parameter", lambda n, new: True),
    "new": ("the parameters a conversion added (condformer convert records them)", lambda n, new: n in new),
    "routers": ("MoD routers and causal predictors, MoE routers",
                lambda n, new: bool(_MOD_ROUTER.match(n) or _MOE_ROUTER.search(n))),
    "exits": ("the exits' norms, heads and halting module", lambda n, new: n.startswith("exits.")),
    "experts": ("MoE experts (routed and shared)", lambda n, new: ".ffn.bank." in n or ".ffn.shared." in n),
    "attention": ("attention projections (and q/k norms)", lambda n, new: ".attn." in n),
    "ffn": ("FFNs: MLPs, and MoE experts and routers", lambda n, new: ".ffn." in n),
    "norms": ("every normalisation gain", lambda n, new: any("norm" in part for part in n.split(".")[:-1])),
    "embeddings": ("token (and position) embeddings; a tied head is the token embedding",
                   lambda n, new: n.startswith(("embed.", "pos_embed."))),
    "head": ("the final norm and the LM head (untied)", lambda n, new: n.startswith(("final_norm.", "head."))),
}


def _is_pattern(entry: str) -> bool:
    return any(c in entry for c in "*?[.")


def check_entries(entries: Iterable[str]) -> None:
    """Each entry is a known role or a pattern: a one-line error names a misspelt role and lists the roles."""
    for entry in entries:
        if not _is_pattern(entry) and entry not in ROLES:
            raise ConfigError(f"unknown trainable role '{entry}'; choose roles from {', '.join(ROLES)} or give a "
                              f"parameter-name pattern such as 'layers.*.router.*'")


def selector(entries: list[str] | None, new: Iterable[str] = ()) -> Callable[[str], bool]:
    """A predicate on parameter names: whether any entry (a role or a glob) selects it; None: everything."""
    if entries is None:
        return lambda name: True
    check_entries(entries)
    added = frozenset(new)

    def selected(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, e) if _is_pattern(e) else ROLES[e][1](name, added) for e in entries)

    return selected


def apply_trainable(model: nn.Module, entries: list[str] | None, new: Iterable[str] = ()) -> tuple[int, int]:
    """Freeze every parameter no entry selects; return (trainable, total) parameter counts.

    Every entry must select at least one parameter, and something must stay trainable.
    """
    if entries is None:
        return _count(model, True), _count(model, None)
    added = frozenset(new)
    names = [n for n, _ in model.named_parameters()]
    check_entries(entries)
    for entry in entries:
        one = selector([entry], added)
        if not any(one(n) for n in names):
            hint = " (this run has no converted parameters: is --init-from a converted run?)" if entry == "new" else ""
            raise ConfigError(f"trainable entry '{entry}' selects no parameter of this model{hint}; parameter names "
                              f"look like '{names[len(names) // 2]}'")
    chosen = selector(entries, added)
    for name, p in model.named_parameters():
        p.requires_grad_(chosen(name))
    trained = _count(model, True)
    if trained == 0:
        raise ConfigError(f"trainable {entries} leaves nothing to train")
    return trained, _count(model, None)


def _count(model: nn.Module, requires_grad: bool | None) -> int:
    return sum(p.numel() for p in model.parameters() if requires_grad is None or p.requires_grad == requires_grad)
