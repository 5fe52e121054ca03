"""Looking inside a trained model: routed share per layer, expert load, AltUp coefficients, per token class.

Separate from the study loop because it reads only a finished run directory; it is the one part of a study
that needs the model's traces, and the per-class numbers only exist on corpora that record token classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from condformer.compare.config import StudyConfig, run_dir

HEATMAP_TOKENS = 64  # tokens of validation text in each routing heatmap (labelled cells stay readable)


def _analyse(cfg: StudyConfig, name: str, out: Path) -> dict[str, Any]:
    """Routing of the trained model (seed 0) on validation windows: per layer, and per token class when the
    corpus records classes (``synthetic:mixed-difficulty``)."""
    import torch

    from condformer.checkpoint import load_for_inference
    from condformer.data import prepare_data
    from condformer.inspection import inspect_routing

    ck, model, _ = load_for_inference(run_dir(out, name, 0))
    tcfg = ck.train_cfg
    data = prepare_data(tcfg.data, tcfg.tokenizer, tcfg.val_fraction)  # cached by the run: no re-tokenising
    tok = data.tokenizer
    x, _ = data.get_batch("val", 0, cfg.analysis_windows, cfg.seq_len, seed=1234)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        o = model(x.to(device), trace=True)
    classes = _token_classes(cfg.data, tok, x)
    layers: list[dict[str, Any]] = []
    for key, v in sorted(o.traces.items()):
        prefix, _, trace = key.partition("/")
        if not prefix.startswith("layer") or not prefix[len("layer"):].isdigit():
            continue  # not a per-layer trace (e.g. early exit's per-token depth)
        layer = int(prefix[len("layer"):])
        if v.dtype == torch.bool and v.dim() == 2:
            computed = v.float().cpu()
        elif v.dtype == torch.long and v.dim() == 3:  # expert ids per choice; -1 = none (no-op / dropped)
            computed = (v >= 0).float().mean(-1).cpu()
        else:
            continue
        entry: dict[str, Any] = {"layer": layer, "trace": trace, "computed_frac": float(computed.mean())}
        if v.dtype == torch.long:
            ids_BTK = v.cpu()
            # how many experts exist: the layer's per-expert load statistics, so an idle expert still shows
            stem = f"{prefix}/{trace.rsplit('_', 1)[0]}_load_e"
            n = max([int(ids_BTK.max()) + 1, 1, *(int(k[len(stem):]) + 1 for k in o.stats
                                                  if k.startswith(stem) and k[len(stem):].isdigit())])
            counts = torch.bincount(ids_BTK[ids_BTK >= 0], minlength=n)
            entry["expert_load"] = (counts / max(int(counts.sum()), 1)).tolist()
            if classes is not None:
                entry["experts_per_class"] = _experts_per_class(ids_BTK, classes, n)
        if classes is not None:
            entry["per_class"] = _per_class(computed, classes)
        layers.append(entry)
    result: dict[str, Any] = {"layers": layers, "altup": model.stream.report(o.stats)}
    if any(e["trace"].endswith(("_routed", "_computed")) for e in layers):  # a heatmap of a short validation text
        result["heatmap"] = inspect_routing(model, tok, tok.decode(x[0, :HEATMAP_TOKENS].tolist()))
    if classes is not None:
        from condformer.data.synthetic import CLASSES

        counts = torch.bincount(classes[classes >= 0], minlength=len(CLASSES))
        result["class_tokens"] = {c: int(counts[i]) for i, c in enumerate(CLASSES)}
    return result


def _token_classes(data: str, tok: Any, x: Any) -> Any:
    """Per-token class ids (B, T) for a corpus that records them, else None.

    Each token is decoded alone: a one-character token takes that character's class; a special token
    (the end-of-document separator decodes to nothing) gets -1 and is left out of every per-class number.
    A tokenizer with multi-character tokens (BPE) has no per-character classes: None.
    """
    if not data.startswith("synthetic:"):
        return None
    import torch

    from condformer.data.synthetic import classify

    rows = []
    for row in x.tolist():
        pieces = [tok.decode([t]) for t in row]
        if any(len(p) > 1 for p in pieces):
            return None
        classes = iter(classify("".join(pieces)))
        rows.append([next(classes) if p else -1 for p in pieces])
    return torch.tensor(rows)


def _experts_per_class(ids_BTK: Any, classes: Any, n_experts: int) -> dict[str, list[float] | None]:
    """For each token class, the share of its choices that reached each real expert (None: no such token)."""
    import torch

    from condformer.data.synthetic import CLASSES

    out: dict[str, list[float] | None] = {}
    for i, c in enumerate(CLASSES):
        ids = ids_BTK[classes == i]  # (n_tokens_of_class, K)
        ids = ids[ids >= 0]
        out[c] = (torch.bincount(ids, minlength=n_experts) / ids.numel()).tolist() if ids.numel() else None
    return out


def _per_class(computed: Any, classes: Any) -> dict[str, float | None]:
    from condformer.data.synthetic import CLASSES

    out: dict[str, float | None] = {}
    for i, c in enumerate(CLASSES):
        mask = classes == i
        out[c] = float(computed[mask].mean()) if bool(mask.any()) else None
    return out
