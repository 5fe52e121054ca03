#!/usr/bin/env bash
# Mixture-of-Experts speed benchmarks (issue 4). Each row times two models alternately in one process and
# reports medians and ratios (see `condformer bench --help`). Every MoE here is on every layer (8 x 512),
# so the rows measure the MoE FFN itself rather than a diluted mix.
#   switch-*  : top-1 of 8 (capacity 1.25 in training, dropless eval) vs the dense FFN: equal active FLOPs
#   top2-*    : top-2 of 8 vs a dense FFN twice as wide (d_ff 4096): equal active FLOPs
#   dispatch-*: dropless sorted dispatch (one grouped matmul per projection) vs the per-expert loop
#   soft-*    : every expert on every token (soft mixture) vs top-2 hard routing: what hard routing saves
set -euo pipefail
OUT=${OUT:-runs/moe-bench}
C=benchmarks/configs
mkdir -p "$OUT"
b() { local name=$1; shift; condformer bench --no-progress --json "$@" | tee "$OUT/$name.txt" | tail -1 > "$OUT/$name.json"; }
common=(--seq-len 1024 --batch-size 2 --repeats 5)
b switch-train    --preset $C/medium-switch-all.json --vs medium --mode train "${common[@]}"
b switch-forward  --preset $C/medium-switch-all.json --vs medium --mode forward "${common[@]}"
b switch-dropless-train --preset $C/medium-switch-all-dropless.json --vs medium --mode train "${common[@]}"
# the same at 4x the tokens per step: parameter-proportional work (expert gradients, AdamW) amortises
b switch-dropless-train-b8 --preset $C/medium-switch-all-dropless.json --vs medium --mode train --seq-len 1024 \
  --batch-size 8 --repeats 3 --no-memory
b top2-train      --preset $C/medium-top2-all.json --vs $C/medium-ffn2x.json --mode train "${common[@]}"
b top2-forward    --preset $C/medium-top2-all.json --vs $C/medium-ffn2x.json --mode forward "${common[@]}"
b top2-dropless-train --preset $C/medium-top2-all-dropless.json --vs $C/medium-ffn2x.json --mode train "${common[@]}"
b dispatch-train  --preset $C/medium-top2-all-dropless.json --vs $C/medium-top2-all-loop.json --mode train "${common[@]}"
b dispatch-forward --preset $C/medium-top2-all-dropless.json --vs $C/medium-top2-all-loop.json --mode forward "${common[@]}"
b soft-train      --preset $C/medium-soft-all.json --vs $C/medium-top2-all.json --mode train "${common[@]}"
b soft-forward    --preset $C/medium-soft-all.json --vs $C/medium-top2-all.json --mode forward "${common[@]}"
# cached generation of the trained isoFLOP models (moe_quality.sh, mod_quality.sh), batch 1, real text
b generate-tiny --preset runs/moe-quality/tiny-moe --vs runs/mod-quality/tiny --mode generate --seq-len 256 --batch-size 1 --data stdlib --repeats 5
