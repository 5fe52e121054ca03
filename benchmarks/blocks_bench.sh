#!/usr/bin/env bash
# Simplified blocks (issue 7): train-step throughput of parallel, SAS and SAS-P against Pre-LN at equal
# depth and width (medium, 8 x 512), short sequences as in the paper (T = 256, 16 sequences per step).
# REPEATS alternating measurements per pair (paired speedup = median of the per-repeat ratios).
set -euo pipefail
OUT=${OUT:-runs/blocks-bench}
REPEATS=${REPEATS:-9}
mkdir -p "$OUT"
b() { local name=$1; shift; condformer bench --no-progress --json "$@" | tee "$OUT/$name.txt" | tail -1 > "$OUT/$name.json"; }
for blk in parallel sas sasp; do
  b "$blk-train" --preset "medium-$blk" --vs medium --mode train --seq-len 256 --batch-size 16 --repeats "$REPEATS"
done
