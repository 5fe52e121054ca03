"""Collect the rows of ``benchmarks/gpu.sh`` into one JSON and one Markdown table: ``python gpu_table.py DIR``."""

from __future__ import annotations

import json
import pathlib
import sys


def _bench_row(name: str, r: dict) -> dict:
    a, b = list(r["models"].values())[:2]
    return {"row": name, "mode": r["mode"], "A": a["preset"], "B": b["preset"], "batch": r["batch_size"],
            "seq_len": r["seq_len"], "A_ms": 1e3 * a["median_s"], "B_ms": 1e3 * b["median_s"],
            "paired_speedup": r["paired_speedup"], "flop_ratio": r["flop_ratio"], "dtype": r["dtype"],
            "compile": r.get("compile", False), "device": r["device"], "machine": r.get("machine", {})}


def collect(out: pathlib.Path) -> dict:
    rows, device = [], None
    for path in sorted(out.glob("*.json")):
        if path.name in ("gpu.json", "moe-peer.json"):
            continue
        try:
            r = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        rows.append(_bench_row(path.stem, r))
    peer_path = out / "moe-peer.json"
    peer = json.loads(peer_path.read_text()) if peer_path.exists() else None
    if peer is not None:
        device = f"{peer['device']} (torch {peer['torch']}, {peer['threads']} CPU threads)"
    tests = (out / "tests.txt").read_text().strip().splitlines()[-1:] if (out / "tests.txt").exists() else []
    mfu_path = out / "mfu.jsonl"  # benchmarks/fsdp_mfu.py: one line per preset
    mfu = [json.loads(x) for x in mfu_path.read_text().splitlines() if x.strip()] if mfu_path.exists() else []
    return {"device": device, "tests": tests[0] if tests else None, "rows": rows, "moe_peer": peer, "mfu": mfu}


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(result: dict) -> str:
    lines = [f"Device: {result['device']}; tests: {result['tests']}", "",
             "| row | mode | A vs B | batch x T | A ms | B ms | paired speedup | FLOP ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['mode']}{' (compiled)' if r['compile'] else ''} | {r['A']} vs {r['B']} | "
                     f"{r['batch']} x {r['seq_len']} | {r['A_ms']:.1f} | {r['B_ms']:.1f} | "
                     f"{_num(r['paired_speedup'], '.2f')}x | {_num(r['flop_ratio'], '.3f')} |")
    peer = result["moe_peer"]
    if peer:
        lines += ["", f"MoE layer, {peer['mode']}, T {peer['tokens']}, d {peer['d_model']}, {peer['experts']} experts "
                  f"of {peer['expert_dim']}, top-{peer['top_k']}, {peer['dtype']}:", "",
                  "| row | ms | tokens/s vs dense |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v['median_ms']:.1f} | {v['speed_vs_dense']:.3f} |" for k, v in peer["rows"].items()]
    if result.get("mfu"):
        lines += ["", "Training step under FSDP2 (benchmarks/fsdp_mfu.py):", "",
                  "| preset | device | ranks | dtype | compiled | batch x T | tokens/s per rank | TFLOP/s per rank "
                  "| MFU |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {m['preset']} | {m['device']} | {m['ranks']} | {m['dtype']} | {m['compile']} | "
                  f"{m['batch_size_per_rank']} x {m['seq_len']} | {m['tokens_per_s_per_rank']:.0f} | "
                  f"{m['tflops_per_rank']:.2f} | {_num(m['mfu'], '.1%')} |" for m in result["mfu"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    out = pathlib.Path(argv[0])
    result = collect(out)
    (out / "gpu.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "gpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
