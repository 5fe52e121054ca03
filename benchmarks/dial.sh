#!/usr/bin/env bash
# The compute dial (issue 21): one trained model with MoD and MoE layers, its knobs certified per quality tolerance
# by `condformer dial` (Learn-then-Test, delta 0.1), then each certified setting decoded against the same weights
# at full compute in the same process (`bench --vs RUN`, paired, medians), at batch 1 and 8.
#   RUN=runs/dial bash benchmarks/dial.sh        # ~10 min on 2 CPU cores
set -euo pipefail
RUN=${RUN:-runs/dial}
OUT=${OUT:-runs/dial-bench}
STEPS=${STEPS:-600}
mkdir -p "$OUT"
if [ ! -d "$RUN/checkpoints" ]; then
  condformer train --config benchmarks/configs/dial-mod-moe.json --max-steps "$STEPS" --seq-len 128 --batch-size 16 \
    --eval-every "$STEPS" --out "$RUN" --no-progress --json | tail -1 > "$OUT/train.json"
fi
for metric in agreement loss; do  # loss last: dial.json (what --tolerance reads) keeps the loss metric
  condformer dial "$RUN" --tolerance 0.005 0.01 0.02 0.05 --delta 0.1 --metric "$metric" --batches 150 \
    --no-progress --json | tail -1 > "$OUT/dial-$metric.json"
done
for eps in 0.005 0.01 0.02 0.05; do
  for b in 1 8; do
    condformer bench --preset "$RUN" --vs "$RUN" --mode generate --data stdlib --seq-len 256 --new-tokens 64 \
      --batch-size "$b" --repeats 7 --no-memory --no-progress --tolerance "$eps" --json 2>/dev/null \
      | tail -1 > "$OUT/bench-$eps-b$b.json" || echo "{\"tolerance\": $eps, \"skipped\": true}" > "$OUT/bench-$eps-b$b.json"
  done
done
