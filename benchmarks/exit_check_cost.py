"""What an early-exit check costs when decoding one token at a time, in layers (for `calibrate --check-cost`).

Decodes the same greedy continuation with a trained exit run through its exit decoder, alternating
configurations 7 times (median): every exit off (full depth, no check), every exit checked but never firing
(threshold 2 > any confidence), and every token stopping at the first exit. A failed check's cost in layers
is (never-firing - all-off) / (exits checked) / (all-off / layers); the generic `model(...)` decode path is
timed too, for reference.

    python benchmarks/exit_check_cost.py runs/exit-quality/tiny-exit
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from condformer.checkpoint import load_for_inference
from condformer.generate import SamplingConfig, generate
from condformer.routing.early_exit import set_exit_thresholds


def main(run: str, new_tokens: int = 96, repeats: int = 7) -> dict:
    ck, model, tok = load_for_inference(run)
    n = model.exits.n_exits - 1
    prompt = [tok.encode("import os\nimport sys\n\ndef main(argv):\n    parser = argparse.ArgumentParser(")]
    sampling = SamplingConfig(max_new_tokens=new_tokens, greedy=True)
    cases = {"generic forward, full depth": None, "exit decoder, all exits off": [None] * n,
             "every exit checked, none fires": [2.0] * n, "every token stops at the first exit": [0.0] * n}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, thresholds in cases.items():
            set_exit_thresholds(model, thresholds)
            t0 = time.perf_counter()
            generate(model, prompt, sampling)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    off, checked = med["exit decoder, all exits off"], med["every exit checked, none fires"]
    per_layer = off / model.cfg.n_layers
    result = {"run": run, "threads": torch.get_num_threads(), "new_tokens": new_tokens,
              "median_ms": {k: v * 1e3 for k, v in med.items()},
              "check_cost_layers": (checked - off) / n / per_layer}
    for k, v in med.items():
        print(f"{k:38s} {v * 1e3:8.1f} ms  ({v / off:.3f} of all-off)")
    print(f"a failed exit check costs {result['check_cost_layers']:.3f} layers")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/exit-quality/tiny-exit")
