"""Memory per rank of FSDP2 against DDP, and the all-to-all share of an expert-parallel step (issue 22).

Two modes:

* ``worker`` runs under torchrun: builds a preset, lays it out as the trainer does (``condformer.parallel.runtime
  .Layout``: FSDP2 or DDP, expert parallelism; under FSDP the model is a meta-device structure on every rank and
  rank 0 alone builds the values, unless ``--init eager`` builds the whole model on every rank first, the paired
  control), trains a few AdamW steps on random tokens, and reports per rank the bytes of parameters and optimizer
  state it holds (exact, from the local shards), its resident-memory high-water mark after building and sharding
  the model (``setup``) and after the steps (``peak``), rank 0's and the others' apart (rank 0 holds the CPU copy
  the shards come from), and the median step time; with expert parallelism also the share of
  the step spent in the all-to-alls (``expert_parallel.measure_all_to_all``). Rank 0 appends one JSON line to
  ``--out``.
* ``all`` runs the matrix of the RESULTS table, one torchrun after another (never side by side: 2 cores), and
  prints it as Markdown.

    python benchmarks/scale_out.py all --out benchmarks/scale-out.json

CPU + gloo, fp32, one thread per rank. Memory is what this measures; times on 2 shared cores with 4 ranks are
oversubscribed and only comparable within a row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# activations large enough for recomputation to matter: (preset, ranks, parallel, ac, batch per rank, seq_len)
AC_MATRIX = [("medium", 2, "fsdp", ac, 8, 512) for ac in ("none", "selective", "full")]
MATRIX = [  # (preset, ranks, parallel, expert_parallel, activation_checkpointing, init)
    ("medium", 2, "ddp", 1, "none", "meta"), ("medium", 2, "fsdp", 1, "none", "meta"),
    ("medium", 2, "fsdp", 1, "none", "eager"), ("medium", 4, "ddp", 1, "none", "meta"),
    ("medium", 4, "fsdp", 1, "none", "meta"), ("medium", 4, "fsdp", 1, "none", "eager"),
    ("medium-moe", 2, "ddp", 1, "none", "meta"), ("medium-moe", 2, "fsdp", 1, "none", "meta"),
    ("medium-moe", 4, "ddp", 1, "none", "meta"), ("medium-moe", 4, "fsdp", 1, "none", "meta"),
    ("medium-moe", 4, "fsdp", 1, "none", "eager"), ("medium-moe", 2, "ddp", 2, "none", "meta"),
    ("medium-moe", 4, "fsdp", 4, "none", "meta"), ("medium-moe", 4, "fsdp", 2, "none", "meta"),
    ("medium", 2, "fsdp", 1, "selective", "meta"), ("medium", 2, "fsdp", 1, "full", "meta"),
]  # "meta" is what the trainer does (DDP builds the whole model either way)


def _local_bytes(t) -> int:  # noqa: ANN001
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from condformer.config import TrainConfig
    from condformer.model import build_model
    from condformer.optim import before_optimizer_step, make_optimizer
    from condformer.parallel.runtime import Layout
    from condformer.presets import preset

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-3,
                      parallel=args.parallel, expert_parallel=args.ep,
                      activation_checkpointing=args.ac)
    model_cfg = preset(args.preset)
    model_cfg.vocab_size = 256
    torch.manual_seed(0)
    layout = Layout(cfg, rank, world, "cpu")
    layout.check()
    raw = build_model(model_cfg) if args.init == "eager" else layout.build(model_cfg)
    full_param_bytes = sum(p.numel() * p.element_size() for p in raw.parameters())  # meta tensors have sizes
    model, optimizer = layout.wrap(raw, lambda m: make_optimizer(m, cfg), None)
    # the high-water mark of building and sharding alone (before any activation, gradient or moment exists):
    # what deferred initialisation removes; later, freed memory is reused and the step's own peak hides it
    setup_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before_mb
    g = torch.Generator().manual_seed(rank)
    trained = [p for p in raw.parameters() if p.requires_grad]

    def step() -> None:
        x = torch.randint(0, 256, (args.batch_size, args.seq_len + 1), generator=g)
        out = model(x[:, :-1], x[:, 1:])
        out.train_loss.backward()
        layout.after_backward(raw)
        layout.clip(raw, trained, 1.0)
        before_optimizer_step(raw)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    a2a = None
    if args.ep > 1:
        from condformer.parallel.expert_parallel import measure_all_to_all

        a2a = measure_all_to_all(raw, step, steps=3, warmup=1)
    params = sum(_local_bytes(p) for p in raw.parameters())
    optim = sum(_local_bytes(v) for st in optimizer.state.values() for v in st.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    mine = torch.tensor([params, optim, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before_mb,
                         statistics.median(times[1:]), setup_mb], dtype=torch.float64)
    rows = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine)
    if rank == 0:
        per_rank = torch.stack(rows)
        record = {"preset": args.preset, "ranks": world, "parallel": args.parallel, "expert_parallel": args.ep,
                  "activation_checkpointing": args.ac,
                  "full_param_mb": full_param_bytes / 2**20,
                  "param_mb_per_rank": float(per_rank[:, 0].max()) / 2**20,
                  "optim_mb_per_rank": float(per_rank[:, 1].max()) / 2**20,
                  "init": args.init,
                  "peak_rss_growth_mb_per_rank": float(per_rank[:, 2].max()),
                  "peak_rss_growth_mb_rank0": float(per_rank[0, 2]),
                  "peak_rss_growth_mb_other_ranks": float(per_rank[1:, 2].max()),
                  "setup_rss_growth_mb_rank0": float(per_rank[0, 4]),
                  "setup_rss_growth_mb_other_ranks": float(per_rank[1:, 4].max()),
                  "step_s_median": float(per_rank[:, 3].median()),
                  "batch_size_per_rank": args.batch_size, "seq_len": args.seq_len, "steps": args.steps}
        if a2a is not None:
            record["all_to_all_share"] = a2a["share"]
            record["all_to_all_s_per_step"] = a2a["all_to_all_s"]
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    dist.barrier()  # rank 0 may still be writing: tearing gloo down under it aborts a rank
    dist.destroy_process_group()
    # leave without interpreter finalisation: under CPU contention it once aborted a rank here ("terminate called
    # without an active exception", after the row was written), the gloo-threads-at-finalisation race of
    # pytorch/pytorch#179291; the row is written and flushed, nothing else is left to do
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_all(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if not args.resume:
        out.unlink(missing_ok=True)
    done = {(r["preset"], r["ranks"], r["parallel"], r["expert_parallel"], r.get("activation_checkpointing", "none"),
             r.get("init", "eager")) for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())
            if r["batch_size_per_rank"] == args.batch_size} if out.exists() else set()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for preset_name, ranks, parallel, ep, ac, init in MATRIX:
        if (preset_name, ranks, parallel, ep, ac, init) in done:  # --resume: rows measured by an earlier call
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", __file__,
               "worker", "--preset", preset_name, "--parallel", parallel, "--ep", str(ep), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--out", str(out), "--ac", ac,
               "--init", init]
        print(f"{preset_name} x{ranks} {parallel} ep={ep} ac={ac} init={init}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env=env)
    done_ac = {(r["preset"], r["ranks"], r["parallel"], r.get("activation_checkpointing", "none"),
                r["batch_size_per_rank"], r["seq_len"]) for r in map(json.loads, out.read_text().splitlines())}
    for row in AC_MATRIX:
        if row in done_ac:
            continue
        preset_name, ranks, parallel, ac, batch, seq = row
        print(f"{preset_name} x{ranks} {parallel} ac={ac} batch {batch} x {seq}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                        __file__, "worker", "--preset", preset_name, "--parallel", parallel, "--ac", ac, "--steps",
                        str(args.steps), "--batch-size", str(batch), "--seq-len", str(seq), "--out", str(out)],
                       check=True, env=env)
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| preset | ranks | layout | batch x T per rank | full params MB | params MB / rank "
             "| AdamW state MB / rank | setup RSS growth MB: rank 0 / others | peak RSS growth MB: rank 0 / others "
             "| step s (median) | all-to-all share |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        layout = r["parallel"] + (f" + EP {r['expert_parallel']}" if r["expert_parallel"] > 1 else "")
        if r.get("activation_checkpointing", "none") != "none":
            layout += f" + {r['activation_checkpointing']} AC"
        if r["parallel"] == "fsdp" and r.get("init", "eager") == "eager":
            layout += " (eager build)"
        share = f"{r['all_to_all_share']:.1%}" if "all_to_all_share" in r else ""
        rss = f"{r['peak_rss_growth_mb_rank0']:.0f} / {r['peak_rss_growth_mb_other_ranks']:.0f}" \
            if "peak_rss_growth_mb_rank0" in r else f"{r['peak_rss_growth_mb_per_rank']:.0f}"
        setup = f"{r['setup_rss_growth_mb_rank0']:.0f} / {r['setup_rss_growth_mb_other_ranks']:.0f}" \
            if "setup_rss_growth_mb_rank0" in r else ""
        lines.append(f"| {r['preset']} | {r['ranks']} | {layout} | {r['batch_size_per_rank']} x {r['seq_len']} | "
                     f"{r['full_param_mb']:.1f} | "
                     f"{r['param_mb_per_rank']:.1f} | {r['optim_mb_per_rank']:.1f} | "
                     f"{setup} | {rss} | {r['step_s_median']:.2f} | {share} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["worker", "all", "table"])
    p.add_argument("--preset", default="medium")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--ac", choices=["none", "full", "selective"], default="none")
    p.add_argument("--init", choices=["meta", "eager"], default="meta",
                   help="worker, FSDP: build the model as the trainer does (meta) or whole on every rank (eager)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", default="benchmarks/scale-out.json")
    p.add_argument("--resume", action="store_true", help="all: keep the rows --out holds, measure the rest")
    args = p.parse_args()
    if args.mode == "worker":
        worker(args)
    elif args.mode == "all":
        run_all(args)
    else:
        print(table([json.loads(x) for x in Path(args.out).read_text(encoding="utf-8").splitlines()]))


if __name__ == "__main__":
    main()
