"""One MoE layer against a dense FFN of equal active FLOPs and against transformers' Mixtral block, in one process.

    python benchmarks/moe_peer.py                      # T 4096, d 512, 8 experts of 2048, top-2, fwd + bwd
    python benchmarks/moe_peer.py --mode forward       # inference forward (no grad)
    python benchmarks/moe_peer.py --device cuda --dtype bf16 --json runs/moe-peer.json

Rows: ``dense`` (SwiGLU of width top_k x 2048: the same FLOPs per token as top-2 of 8 experts of 2048),
condformer's ``MoEFFN`` with each dispatch (auto, grouped, sorted, loop), and ``MixtralSparseMoeBlock``
with its ``grouped_mm`` experts (and its eager per-expert loop). Every row gets the same input and
the same output gradient; the rows run in turn, ``--repeats`` times, after ``--warmup`` rounds, and the
table reports medians and the median of the per-round ratios to dense (paired, so drift between rounds
cancels). condformer's layer computes its balance and z losses too (the Mixtral block leaves its
auxiliary loss to the model); they are part of the time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from condformer.config import LayerSpec, ModelConfig
from condformer.context import Context
from condformer.layers.mlp import MLP
from condformer.routing.moe.ffn import MoEFFN


def _config(d: int, ff: int) -> ModelConfig:
    return ModelConfig(d_model=d, n_layers=8, n_heads=8, d_ff=ff, mlp="swiglu", vocab_size=256, init_std=0.02)


def _mixtral(d: int, width: int, experts: int, top_k: int, implementation: str) -> torch.nn.Module | None:
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    cfg = MixtralConfig(hidden_size=d, intermediate_size=width, num_local_experts=experts, num_experts_per_tok=top_k)
    cfg._experts_implementation = implementation
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():  # transformers leaves init to the model; same scale as condformer's
        torch.nn.init.normal_(p, std=0.02)
    return block


def build_rows(d: int, width: int, experts: int, top_k: int, peer: bool) -> dict[str, tuple[torch.nn.Module, bool]]:
    """{row name: (module, takes a context)}; Mixtral rows only when transformers is installed."""
    torch.manual_seed(0)
    rows: dict[str, tuple[torch.nn.Module, bool]] = {"dense": (MLP(_config(d, top_k * width), LayerSpec(), 0), True)}
    for how in ("auto", "grouped", "sorted", "loop"):
        spec = LayerSpec(ffn="moe", options={"experts": experts, "top_k": top_k, "capacity_factor": None,
                                             "dispatch": how})
        rows[f"condformer-{how}"] = (MoEFFN(_config(d, width), spec, 0), True)
    if peer:
        for impl, name in (("grouped_mm", "mixtral-grouped_mm"), ("eager", "mixtral-eager")):
            block = _mixtral(d, width, experts, top_k, impl)
            if block is not None:
                rows[name] = (block, False)
    return rows


def _op(module: torch.nn.Module, takes_ctx: bool, x: torch.Tensor, grad: torch.Tensor, mode: str,
        dtype: torch.dtype) -> Callable[[], None]:
    T = x.shape[1]
    autocast = dtype != torch.float32

    def run(inp: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
            if takes_ctx:
                return module(inp, Context(positions_BT=torch.arange(T, device=x.device)[None], causal=True))
            return module(inp)

    if mode == "forward":
        module.eval()

        def step() -> None:
            with torch.no_grad():
                run(x)
    else:
        module.train()

        def step() -> None:
            inp = x.detach().requires_grad_()
            y = run(inp)
            y.float().backward(grad)
            for p in module.parameters():
                p.grad = None
    return step


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--expert-dim", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--mode", choices=("train", "forward"), default="train", help="train: forward + backward")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true", help="leave out the transformers rows")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    rows = build_rows(a.d_model, a.expert_dim, a.experts, a.top_k, peer=not a.no_peer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, a.tokens, a.d_model, generator=g).to(device)
    grad = torch.randn(1, a.tokens, a.d_model, generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ops = {name: _op(m.to(device), ctx, x, grad, a.mode, dtype) for name, (m, ctx) in rows.items()}
    times: dict[str, list[float]] = {name: [] for name in ops}
    for r in range(a.warmup + a.repeats):
        for name, op in ops.items():
            sync()
            t0 = time.perf_counter()
            op()
            sync()
            if r >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    dense = times["dense"]
    result = {
        "mode": a.mode, "tokens": a.tokens, "d_model": a.d_model, "expert_dim": a.expert_dim, "experts": a.experts,
        "top_k": a.top_k, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "dtype": a.dtype, "repeats": a.repeats, "torch": torch.__version__,
        "rows": {name: {"median_ms": 1e3 * statistics.median(ts),
                        "speed_vs_dense": statistics.median(d / t for d, t in zip(dense, ts, strict=True))}
                 for name, ts in times.items()},
    }
    print(f"{a.mode}: T {a.tokens}, d {a.d_model}, {a.experts} experts of {a.expert_dim}, top-{a.top_k}, "
          f"{result['device']} {a.dtype}, medians of {a.repeats}")
    print("| row | ms | tokens/s vs dense (paired) |\n| --- | --- | --- |")
    for name, row in result["rows"].items():
        print(f"| {name} | {row['median_ms']:.1f} | {row['speed_vs_dense']:.3f} |")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
