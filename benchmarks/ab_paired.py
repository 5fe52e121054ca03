"""Paired A/B speed benchmark of two source trees: does a refactor cost any speed?

Usage (from the repository root, on an otherwise idle machine)::

    git worktree add /tmp/base <old commit>
    python benchmarks/ab_paired.py --a /tmp/base/src --b src --rounds 5 --out runs/ab-paired.json

One long-lived worker process per tree imports condformer from that tree (``PYTHONPATH=TREE``) and
waits for requests on stdin; only one worker computes at a time. For every case and every round the
parent asks A for one measurement, then B (ABAB...), so the two measurements of a round are taken back to
back and a slow drift of the machine's speed cancels in their ratio. A measurement is one call of the
library's own :func:`condformer.bench.run_bench` (fresh model from the bench seed, warm-up, then the
median of ``repeats`` timed repeats), so both trees run their own copy of the same, public, measurement
code. Reported per case: median time of A, of B, and the median of the per-round ratios B/A (> 1: B is
slower). Each case is the technique's tiny preset and, for comparison, the dense twin in the same mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO


@dataclass(frozen=True)
class Case:
    """One benchmark row: a preset in one bench mode (kwargs go to BenchConfig as they are)."""

    name: str
    preset: str
    mode: str
    options: dict[str, Any] = field(default_factory=dict)


# the exit model decodes with its first exit off and the second (after layer 2 of 4) on: at the bench seed's
# random init every token's confidence there lies between 0.01 and 0.02 (exit 1's above 0.02), so it decodes
# at depth 2 in both settings; the mean depth each tree decoded at is reported, and a mismatch warned about
EXIT_THRESHOLDS: list[float | None] = [None, 0.008, None]
CASES: tuple[Case, ...] = (
    Case("dense-train", "tiny", "train"),
    Case("mod-train", "tiny-mod", "train"),
    Case("moe-train", "tiny-moe", "train"),
    Case("parallel-train", "tiny-parallel", "train"),
    Case("sas-train", "tiny-sas", "train"),
    Case("sasp-train", "tiny-sasp", "train"),
    Case("altup-train", "tiny-altup", "train"),
    Case("dense-forward", "tiny", "forward"),
    Case("mod-forward", "tiny-mod", "forward"),
    Case("dense-generate", "tiny", "generate"),
    Case("exit-generate-full", "tiny-exit", "generate", {"exit_threshold": [None, None, None]}),
    Case("exit-generate", "tiny-exit", "generate", {"exit_threshold": EXIT_THRESHOLDS}),
)

# BenchConfig fields per setting; generate mode decodes new_tokens after a seq_len - new_tokens prompt
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "train": dict(seq_len=256, batch_size=8, repeats=3, warmup=2, min_time_s=0.2),
        "forward": dict(seq_len=256, batch_size=8, repeats=3, warmup=2, min_time_s=0.2),
        "generate": dict(seq_len=96, new_tokens=32, batch_size=1, repeats=3, warmup=1, min_time_s=0.2),
    },
    "quick": {
        "train": dict(seq_len=64, batch_size=2, repeats=1, warmup=1, min_time_s=0.02),
        "forward": dict(seq_len=64, batch_size=2, repeats=1, warmup=1, min_time_s=0.02),
        "generate": dict(seq_len=32, new_tokens=8, batch_size=1, repeats=1, warmup=1, min_time_s=0.02),
    },
}


# -- worker: runs with PYTHONPATH=TREE -----------------------------------------------------------------
def worker() -> None:
    """Answer one JSON request per stdin line with one JSON line on the original stdout."""
    reply: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the library prints goes to stderr, never into the protocol
    import torch

    import condformer
    from condformer.bench import BenchConfig, run_bench

    reply.write(json.dumps({"condformer": str(Path(condformer.__file__).resolve().parent), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        try:
            cfg = BenchConfig(preset=req["preset"], mode=req["mode"], memory=False, max_retries=1, **req["options"])
            t0 = time.perf_counter()
            res = run_bench(cfg, progress=False)
            (m,) = res["models"].values()
            gen = m.get("generation") or {}
            answer = {"ok": True, "time_s": m["median_s"], "disturbed": m["disturbed"],
                      "others_cpu": m["others_cpu_median"], "wall_s": time.perf_counter() - t0,
                      "mean_depth": gen.get("exit_mean_depth")}
        except Exception as e:  # reported to the parent, which stops with the message
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply.write(json.dumps(answer) + "\n")


# -- parent --------------------------------------------------------------------------------------------
class Worker:
    def __init__(self, tag: str, src: Path, threads: int | None) -> None:
        env = dict(os.environ, PYTHONPATH=str(src), PYTHONDONTWRITEBYTECODE="1")
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        self.tag, self.src = tag, src
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], env=env, text=True, bufsize=1,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.info = self._read()
        got = Path(self.info["condformer"])
        if got.parent != src:
            self.close()
            raise SystemExit(f"tree {tag}: asked for {src} but condformer was imported from {got}; "
                             f"is PYTHONPATH overridden by an install that shadows it?")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.tag} ({self.src}) exited (code {self.proc.wait()}); see stderr above")
        return json.loads(line)

    def measure(self, case: Case, setting: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        req = {"preset": case.preset, "mode": case.mode, "options": {**setting, **case.options}}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        if not answer["ok"]:
            raise SystemExit(f"tree {self.tag} ({self.src}), case {case.name}: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def summarise(case: Case, a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    ta, tb = [m["time_s"] for m in a], [m["time_s"] for m in b]
    ratios = [y / x for x, y in zip(ta, tb, strict=True) if x > 0]
    return {
        "preset": case.preset, "mode": case.mode, "options": case.options,
        "median_a_s": statistics.median(ta), "median_b_s": statistics.median(tb),
        "ratio_b_over_a": statistics.median(ratios) if ratios else None,
        "ratio_min": min(ratios, default=None), "ratio_max": max(ratios, default=None),
        "times_a_s": ta, "times_b_s": tb, "ratios": ratios,
        "disturbed_a": sum(m["disturbed"] for m in a), "disturbed_b": sum(m["disturbed"] for m in b),
        "mean_depth_a": a[0]["mean_depth"], "mean_depth_b": b[0]["mean_depth"],
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [("case", "A ms", "B ms", "B/A (median of rounds)", "range", "disturbed A/B")]
    for name, r in results.items():
        ratio = "-" if r["ratio_b_over_a"] is None else f"{r['ratio_b_over_a']:.3f}"
        span = "-" if r["ratio_min"] is None else f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f}"
        rows.append((name, f"{r['median_a_s'] * 1e3:.2f}", f"{r['median_b_s'] * 1e3:.2f}", ratio, span,
                     f"{r['disturbed_a']}/{r['disturbed_b']}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Paired A/B speed benchmark of two condformer source trees.")
    ap.add_argument("--a", type=Path, help="source tree A (the directory holding condformer/), e.g. /tmp/base/src")
    ap.add_argument("--b", type=Path, help="source tree B, e.g. src")
    ap.add_argument("--rounds", type=int, default=5, help="paired measurements per case (default 5)")
    ap.add_argument("--quick", action="store_true", help="short sequences and single repeats: a smoke run")
    ap.add_argument("--cases", default=None, help="comma-separated subset of: " + ",".join(c.name for c in CASES))
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the workers (default: inherited)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker()
        return
    if args.a is None or args.b is None:
        ap.error("--a and --b are required")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    cases = list(CASES)
    if args.cases:
        wanted = args.cases.split(",")
        unknown = sorted(set(wanted) - {c.name for c in CASES})
        if unknown:
            ap.error(f"unknown case(s) {unknown}")
        cases = [c for c in CASES if c.name in wanted]
    srcs = {}
    for tag, src in (("A", args.a), ("B", args.b)):
        src = src.resolve()
        if not (src / "condformer" / "__init__.py").is_file():
            ap.error(f"--{tag.lower()} {src}: no condformer/__init__.py there; pass a tree's src directory")
        srcs[tag] = src
    setting = SETTINGS["quick" if args.quick else "full"]
    started = time.perf_counter()
    workers = {tag: Worker(tag, src, args.threads) for tag, src in srcs.items()}
    try:
        for tag, w in workers.items():
            print(f"{tag}: {w.info['condformer']} (torch {w.info['torch']}, {w.info['threads']} threads)",
                  file=sys.stderr)
        results: dict[str, dict[str, Any]] = {}
        for case in cases:
            got: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
            for r in range(args.rounds):
                for tag in ("A", "B"):  # A then B in every round: the round's pair runs back to back
                    got[tag].append(workers[tag].measure(case, setting[case.mode]))
                a, b = got["A"][-1]["time_s"], got["B"][-1]["time_s"]
                print(f"{case.name} round {r + 1}/{args.rounds}: A {a * 1e3:.2f} ms, B {b * 1e3:.2f} ms, "
                      f"B/A {b / a:.3f}", file=sys.stderr)
            results[case.name] = summarise(case, got["A"], got["B"])
            depths = results[case.name]["mean_depth_a"], results[case.name]["mean_depth_b"]
            if depths[0] != depths[1]:
                print(f"warning: {case.name}: A decoded at mean depth {depths[0]}, B at {depths[1]}; "
                      f"their times are not comparable", file=sys.stderr)
    finally:
        for w in workers.values():
            w.close()
    print(table(results))
    payload = {
        "a": str(srcs["A"]), "b": str(srcs["B"]), "rounds": args.rounds, "quick": args.quick,
        "settings": setting, "workers": {tag: w.info for tag, w in workers.items()},
        "wall_s": time.perf_counter() - started, "cases": results,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
