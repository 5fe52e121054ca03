"""Model FLOP utilisation of a training step under FSDP2 on the ranks torchrun gives (issue 22's GPU row).

    torchrun --standalone --nproc_per_node=1 benchmarks/fsdp_mfu.py --preset gpt2-small --compile --out mfu.jsonl
    torchrun --standalone --nproc_per_node=1 benchmarks/fsdp_mfu.py --preset tiny --device cpu --steps 2 ...  # smoke

The model is laid out as the trainer lays it out (``condformer.parallel.runtime.Layout``: FSDP2 with bf16
parameters and fp32 reduction on CUDA, fp32 on the CPU), optionally compiled, and trained on random tokens. MFU =
analytic training FLOPs of the work done (``condformer.flops.count_flops``: only selected tokens and active
experts count) per second over the device's peak dense bf16 rate; on a device whose peak is not in the table MFU
is left out and only the FLOP rate is reported. Rank 0 appends one JSON line to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

# peak dense bf16 tensor-core rates, FLOP/s (vendor datasheets, without sparsity)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device_name: str) -> float | None:
    """The peak of the first table entry whose name appears in the device's name (``NVIDIA H100 80GB HBM3``)."""
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="mfu.jsonl")
    args = p.parse_args()

    import os

    import torch
    import torch.distributed as dist

    from condformer.config import TrainConfig
    from condformer.flops import count_flops
    from condformer.model import build_model
    from condformer.optim import make_optimizer
    from condformer.parallel.runtime import Layout
    from condformer.presets import preset

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-4,
                      parallel="fsdp", compile=args.compile)
    model_cfg = preset(args.preset)
    model_cfg.max_seq_len = max(model_cfg.max_seq_len, args.seq_len)
    torch.manual_seed(0)
    raw = build_model(model_cfg).to(device)
    layout = Layout(cfg, rank, world, device)
    layout.check(model_cfg)
    model, optimizer = layout.wrap(raw, lambda m: make_optimizer(m, cfg), None)
    if args.compile:
        model = torch.compile(model)
    trained = [q for q in raw.parameters() if q.requires_grad]
    g = torch.Generator().manual_seed(rank)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step() -> None:
        x = torch.randint(0, model_cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(device)
        with autocast:
            out = model(x[:, :-1], x[:, 1:])
        out.train_loss.backward()
        layout.clip(raw, trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = count_flops(model_cfg, args.seq_len).train_flops * args.batch_size  # this rank's work per step
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_flops(name) if cuda else None
    record = {"preset": args.preset, "device": name, "ranks": world, "compile": args.compile,
              "dtype": "bf16" if cuda else "fp32", "batch_size_per_rank": args.batch_size, "seq_len": args.seq_len,
              "step_s_median": step_s, "tokens_per_s_per_rank": args.batch_size * args.seq_len / step_s,
              "tflops_per_rank": flops / step_s / 1e12, "mfu": None if peak is None else flops / step_s / peak,
              "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}
    if rank == 0:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record))
    dist.barrier()  # rank 0 may still be writing: tearing gloo down under it aborts a rank
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
