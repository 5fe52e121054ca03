#!/usr/bin/env bash
# Mixture-of-Depths speed benchmarks (issue 3): each row times MoD and its dense twin alternately in one
# process and reports medians and ratios (see `condformer bench --help`).
set -euo pipefail
OUT=${OUT:-runs/mod-bench}
mkdir -p "$OUT"
b() { local name=$1; shift; condformer bench --no-progress --json "$@" | tee "$OUT/$name.txt" | tail -1 > "$OUT/$name.json"; }
b train-1024    --preset medium-mod --vs medium --mode train   --seq-len 1024 --batch-size 2 --repeats 5
b train-2048    --preset medium-mod --vs medium --mode train   --seq-len 2048 --batch-size 1 --repeats 5
b forward-1024  --preset medium-mod --vs medium --mode forward --seq-len 1024 --batch-size 2 --repeats 5
b forward-2048  --preset medium-mod --vs medium --mode forward --seq-len 2048 --batch-size 1 --repeats 5
b c1-train-1024 --preset benchmarks/configs/medium-mod-c1.json --vs medium --mode train --seq-len 1024 --batch-size 2 --repeats 11
b c1-forward-1024 --preset benchmarks/configs/medium-mod-c1.json --vs medium --mode forward --seq-len 1024 --batch-size 2 --repeats 11
# generation needs trained routing decisions: the isoFLOP study's tiny-mod run vs its dense twin, batch 1, real text
b generate-tiny --preset runs/mod-quality/tiny-mod --vs runs/mod-quality/tiny --mode generate --seq-len 256 --batch-size 1 --data stdlib --repeats 5
