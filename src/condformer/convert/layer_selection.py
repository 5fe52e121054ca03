"""Which layers a conversion touches, from a short text: ``all``, ``odd``, ``even``, ``every:N`` or ``1,3,8-11``."""

from __future__ import annotations

from condformer.errors import ConfigError

FORMS = "'all', 'odd', 'even', 'every:N' (layers N-1, 2N-1, ...) or indices and ranges such as '1,3,8-11'"


def select_layers(text: str, n_layers: int, flag: str = "--layers") -> list[int]:
    """Sorted 0-based layer indices named by ``text``; an index out of [0, n_layers) is a one-line error."""
    t = text.strip().lower()
    if t == "all":
        return list(range(n_layers))
    if t in ("odd", "even"):
        return list(range(1 if t == "odd" else 0, n_layers, 2))
    if t.startswith("every:"):
        step = t.split(":", 1)[1]
        if not step.isdigit() or int(step) < 1:
            raise ConfigError(f"{flag} '{text}': every:N needs a positive integer N")
        return list(range(int(step) - 1, n_layers, int(step)))
    chosen: set[int] = set()
    for part in t.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ConfigError(f"{flag} '{text}' is not a layer selection; give {FORMS}")
        a, b = int(lo), int(hi) if sep else int(lo)
        if a > b:
            raise ConfigError(f"{flag} '{text}': the range {a}-{b} is empty; write it low-high")
        chosen.update(range(a, b + 1))
    bad = sorted(i for i in chosen if i >= n_layers)
    if bad:
        raise ConfigError(f"{flag} '{text}': layer {bad[0]} is out of range; this model has layers 0-{n_layers - 1}")
    return sorted(chosen)
