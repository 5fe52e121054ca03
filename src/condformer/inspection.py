"""Which tokens did each layer compute? Routing decisions of one text, as data and as a heatmap.

Conditional computation is only worth its complexity if the router learns something, and the quickest
way to see whether it has is to look at one sequence: which tokens each routed layer sent through its
block and which it let skip (Figure 5 of the Mixture-of-Depths paper, Raposo et al. 2024). This module
runs the model once with ``trace=True`` and turns ``Output.traces`` into

* :func:`inspect_routing`: a JSON-able dict (what ``condformer inspect --json`` prints), and
* :func:`plot_routing`: a PNG heatmap, tokens along x and layers along y (deeper layers higher up).

It reads whatever boolean per-token traces layers record (``layer{L}/{name}``), so a new routing
technique shows up here by recording a trace, without this module knowing about it. The model runs in
eval mode, i.e. with the routing used for evaluation and sampling (for MoD by default the causal
per-token decision, not the training-time top-k), because that is the routing a user of the checkpoint gets.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from condformer.data import ByteTokenizer, Tokenizer
from condformer.errors import CondformerError

__all__ = ["inspect_routing", "plot_routing", "plot_exit_curve", "token_label", "MAX_LABELLED_TOKENS"]

MAX_LABELLED_TOKENS = 80
"""Above this many tokens the x tick labels would overlap; the axis then shows positions instead."""

_ROUTED_SUFFIX = "_routed"
_COLOURS = {"skipped": "#f4a259", "routed": "#5b2a86", "untraced": "#c8c8c8"}  # the paper's orange / purple
_SKIPPED, _ROUTED, _UNTRACED = 0, 1, 2  # cell values of the heatmap


def short_name(trace_name: str) -> str:
    """``"mod_routed"`` -> ``"mod"``: the technique's name, for labels and the human-readable report."""
    return trace_name[: -len(_ROUTED_SUFFIX)] if trace_name.endswith(_ROUTED_SUFFIX) else trace_name


def _token_strings(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each token's own text. A byte that is only part of a UTF-8 character decodes to U+FFFD on its
    own, which would hide which byte it is, so the byte tokenizer shows such bytes as ``\\xNN``."""
    out = []
    for i in ids:
        s = tokenizer.decode([i])
        if isinstance(tokenizer, ByteTokenizer) and 128 <= i < 256:
            s = f"\\x{i:02x}"
        out.append(s)
    return out


def _layer_routers(model: nn.Module, n_layers: int) -> list[str]:
    """The router name of each layer, from the model's config when it has one (a Transformer does)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "layer_specs"):
        return [spec.router for spec in cfg.layer_specs()]
    return ["unknown"] * n_layers


def inspect_routing(model: nn.Module, tokenizer: Tokenizer, text: str) -> dict[str, Any]:
    """Run ``model`` once on ``text`` (batch of one, eval mode, ``trace=True``) and report its routing.

    Returns a JSON-able dict:

    * ``tokens`` / ``token_ids``: each token's text and id (the x axis);
    * ``layers``: one entry per boolean trace, sorted by layer, ``{"layer": L, "name": "mod_routed",
      "routed": [0/1 per token], "routed_frac": mean of routed}``;
    * ``n_layers``, ``routers`` (router name per layer), ``model`` (config name), ``n_tokens``;
    * ``routed_frac``: mean over the traced layers (None when no layer is routed);
    * ``assignments``: one entry per integer (token x choice) trace, e.g. an MoE layer's experts:
      ``{"layer": L, "name": "moe_expert", "ids": [[id or -1 per choice] per token], "counts": [per id],
      "shares": counts over all choices, "none_frac": share of choices that visited nothing}``;
    * ``altup``: for an AltUp model, each layer's prediction matrix and correction gains (see
      the stream's ``report``, :meth:`condformer.streams.altup.AltUp.report`); empty otherwise;
    * ``notes``: remarks such as truncation to the model's ``max_seq_len``.

    The model's train/eval mode is restored afterwards, so inspecting mid-training changes nothing.
    """
    ids = tokenizer.encode(text)
    if not ids:
        raise CondformerError("the text is empty; pass --text TEXT or --text-file FILE with at least one character")
    cfg = getattr(model, "cfg", None)
    notes: list[str] = []
    max_len = getattr(cfg, "max_seq_len", None)
    if max_len is not None and len(ids) > max_len:
        notes.append(f"the text is {len(ids)} tokens; kept the first {max_len} (the model's max_seq_len)")
        ids = ids[:max_len]
    device = next(model.parameters()).device
    tokens_BT = torch.tensor([ids], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(tokens_BT, trace=True)
    finally:
        model.train(was_training)

    n_layers = len(getattr(model, "layers", ())) or (cfg.n_layers if cfg is not None else 0)
    layers: list[dict[str, Any]] = []
    for key, value_BT in out.traces.items():
        if value_BT.dtype != torch.bool or value_BT.dim() != 2:
            continue  # only per-token yes/no decisions are routing traces
        prefix, _, name = key.partition("/")
        if not prefix.startswith("layer") or not prefix[len("layer"):].isdigit():
            continue
        routed_T = value_BT[0].to("cpu", torch.int64).tolist()
        layers.append({"layer": int(prefix[len("layer"):]), "name": name, "routed": routed_T,
                       "routed_frac": sum(routed_T) / len(routed_T)})
    layers.sort(key=lambda e: (e["layer"], e["name"]))
    fracs = [e["routed_frac"] for e in layers]
    assignments: list[dict[str, Any]] = []
    for key, value_BTK in out.traces.items():
        # integer (B, T, K) traces: the ids of the components (experts) each token visited, -1 for none
        if value_BTK.dtype != torch.long or value_BTK.dim() != 3:
            continue
        prefix, _, name = key.partition("/")
        if not prefix.startswith("layer") or not prefix[len("layer"):].isdigit():
            continue
        ids_TK = value_BTK[0].to("cpu")
        # how many ids exist: per-id load statistics ("moe_load_e7" -> 8) when the layer reports them,
        # so an id nobody visited still shows as 0%
        stem = f"{prefix}/{name.rsplit('_', 1)[0]}_load_e"
        n_ids = max([int(ids_TK.max()) + 1 if (ids_TK >= 0).any() else 0,
                     *(int(k[len(stem):]) + 1 for k in out.stats if k.startswith(stem) and k[len(stem):].isdigit())])
        counts = torch.bincount(ids_TK[ids_TK >= 0], minlength=n_ids).tolist()
        total = ids_TK.numel()
        assignments.append({"layer": int(prefix[len("layer"):]), "name": name, "ids": ids_TK.tolist(),
                            "counts": counts, "shares": [c / total for c in counts],
                            "none_frac": int((ids_TK < 0).sum()) / total})
    assignments.sort(key=lambda e: (e["layer"], e["name"]))
    exits = None
    if "exit_depth" in out.traces:
        depths = out.traces["exit_depth"][0].tolist()
        exits = {"depths": depths, "mean_depth": sum(depths) / len(depths),
                 "histogram": [depths.count(d) for d in range(1, n_layers + 1)]}
    return {
        "exits": exits,
        "altup": model.stream.report(out.stats),
        "model": getattr(cfg, "name", type(model).__name__),
        "n_layers": n_layers,
        "routers": _layer_routers(model, n_layers),
        "n_tokens": len(ids),
        "tokens": _token_strings(tokenizer, ids),
        "token_ids": ids,
        "layers": layers,
        "routed_frac": sum(fracs) / len(fracs) if fracs else None,
        "assignments": assignments,
        "notes": notes,
    }


def token_label(token: str) -> str:
    """A token as a tick label: whitespace and control characters made visible, never an empty label.

    Space becomes ``␣``, newline ``\\n``, tab ``\\t``, other non-printable characters ``\\uXXXX`` (a label
    that renders as nothing, or as a line break, would misalign the reader's eye with the columns).
    """
    if token == "":
        return "∅"
    out = []
    for ch in token:
        if ch == " ":
            out.append("␣")
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ch.isprintable() and unicodedata.category(ch) not in ("Zs", "Cf"):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _rows(result: dict[str, Any]) -> tuple[list[list[int]], list[str]]:
    """Heatmap rows, layer 0 first: a traced layer shows its decisions, a dense layer is fully routed,
    and a layer whose router recorded no trace is grey (drawing it as routed would claim compute we did
    not observe)."""
    n_tokens = len(result["tokens"])
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for entry in result["layers"]:
        by_layer.setdefault(entry["layer"], []).append(entry)
    routers = list(result.get("routers") or [])
    n_layers = max([result.get("n_layers") or 0, len(routers), *(k + 1 for k in by_layer)])
    rows: list[list[int]] = []
    labels: list[str] = []
    for layer in range(n_layers):
        router = routers[layer] if layer < len(routers) else "unknown"
        if layer in by_layer:
            for entry in by_layer[layer]:
                rows.append([_ROUTED if r else _SKIPPED for r in entry["routed"]])
                labels.append(f"layer {layer} {short_name(entry['name'])} ({entry['routed_frac']:.0%})")
        elif router == "dense":
            rows.append([_ROUTED] * n_tokens)
            labels.append(f"layer {layer} dense")
        else:
            rows.append([_UNTRACED] * n_tokens)
            labels.append(f"layer {layer} {router} (no trace)")
    return rows, labels


def plot_exit_curve(points: list[dict[str, float]], full_loss: float, path: str | os.PathLike[str],
                    title: str = "") -> Path:
    """Validation loss against average exit depth, one point per shared confidence threshold (PNG)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CondformerError("plotting needs matplotlib; pip install 'condformer[plot]'") from None
    fig = Figure(figsize=(6, 4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pts = sorted(points, key=lambda p: p["mean_depth"])
    ax.plot([p["mean_depth"] for p in pts], [p["loss"] for p in pts], marker=".", label="confidence exits")
    ax.axhline(full_loss, color="grey", linestyle="--", linewidth=1, label="full depth")
    ax.axhline(full_loss * 1.01, color="grey", linestyle=":", linewidth=1, label="+1%")
    ax.set_xlabel("average exit depth (layers)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title or "quality vs average depth", fontsize=10)
    ax.legend(fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return out


def plot_routing(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw ``result`` (from :func:`inspect_routing`) as a PNG heatmap at ``path``; returns the path.

    Purple cells: the token went through the layer's block; orange: it skipped it (the colours of the
    MoD paper). Layer 0 is the bottom row, so depth reads upwards like the architecture. Tokens label
    the x axis when there are at most :data:`MAX_LABELLED_TOKENS`, positions otherwise.

    matplotlib is optional (``condformer[plot]``) and imported here, not at module import. The figure is
    drawn on an explicit Agg canvas rather than through pyplot, so it works headless and never changes
    the backend of a caller's interactive session. The PNG is written to a temporary file in the same
    directory and renamed into place, so an interrupted run never leaves a truncated image.
    """
    try:
        import matplotlib  # noqa: F401  (first, so a missing package fails here, not on a submodule)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import BoundaryNorm, ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise CondformerError("plotting needs matplotlib; pip install 'condformer[plot]'") from None

    rows, row_labels = _rows(result)
    tokens: list[str] = result["tokens"]
    n_tokens, n_rows = len(tokens), len(rows)
    labelled = n_tokens <= MAX_LABELLED_TOKENS
    x_labels = [token_label(t) for t in tokens]
    long_labels = labelled and any(len(s) > 2 for s in x_labels)

    width = min(20.0, max(6.0, 2.5 + 0.17 * n_tokens))
    height = 1.6 + 0.42 * max(n_rows, 1) + (0.8 if long_labels else 0.3)
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = ListedColormap([_COLOURS["skipped"], _COLOURS["routed"], _COLOURS["untraced"]])
    norm = BoundaryNorm([-0.5, 0.5, 1.5, 2.5], cmap.N)
    grid = rows if rows else [[_UNTRACED] * n_tokens]
    ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest", origin="lower")
    # thin white gridlines between cells, so single tokens stay distinguishable (between rows only when
    # there are too many tokens to label: there they would hatch the whole image)
    if labelled:
        ax.set_xticks([i - 0.5 for i in range(n_tokens + 1)], minor=True)
    ax.set_yticks([i - 0.5 for i in range(len(grid) + 1)], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_yticks(range(n_rows), row_labels if rows else [])
    if labelled:
        ax.set_xticks(range(n_tokens), x_labels, fontfamily="monospace", fontsize=8,
                      rotation=90 if long_labels else 0)
        ax.set_xlabel("token")
    else:
        step = max(1, n_tokens // 16)
        ax.set_xticks(range(0, n_tokens, step))
        ax.set_xlabel("token position")
    ax.set_ylabel("layer")

    frac = result.get("routed_frac")
    traced = result["layers"]
    if frac is None:
        title = f"{result.get('model', 'model')}: no routed layers (every layer computes all {n_tokens} tokens)"
    else:
        names = ", ".join(sorted({short_name(e["name"]) for e in traced}))
        title = (f"{result.get('model', 'model')}: {names} routed {frac:.1%} of {n_tokens} tokens "
                 f"in {len(traced)} routed layer{'s' if len(traced) != 1 else ''}")
    ax.set_title(title, fontsize=10)
    handles = [Patch(color=_COLOURS["routed"], label="block computed"),
               Patch(color=_COLOURS["skipped"], label="skipped (residual only)")]
    if any(_UNTRACED in r for r in rows):
        handles.append(Patch(color=_COLOURS["untraced"], label="not traced"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)

    out = Path(path)
    tmp: str | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        tmp = None
    except OSError as e:
        raise CondformerError(f"cannot write '{out}' ({e.strerror or e}); pass --out to a writable path") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return out
