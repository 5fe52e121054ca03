"""A small deterministic code-like corpus for end-to-end runs (fast, no network, no stdlib scan)."""

from __future__ import annotations

from pathlib import Path


def write_corpus(root: Path, n_files: int = 40) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [f"def func_{i}_{j}(x, y={j}):\n    return x * {i} + y - {j % 7}\n\n" for j in range(40)]
        (root / f"mod_{i:03d}.py").write_text("".join(lines), encoding="utf-8")
    return root
