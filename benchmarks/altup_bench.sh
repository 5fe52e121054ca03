#!/usr/bin/env bash
# Train-step time of AltUp (issue 5) against its dense twin of width d and a dense model of width 2d, each
# pair measured alternately in one process (`condformer bench`). Width d = `tiny` (4 x 128) and `medium`
# (8 x 512); width 2d = benchmarks/configs/{tiny,medium}-wide.json. Run it on an otherwise idle machine.
set -euo pipefail
OUT=${OUT:-runs/altup-bench}
REPEATS=${REPEATS:-9}
mkdir -p "$OUT"
bench() {  # name, then bench flags
  condformer bench "${@:2}" --mode train --seq-len 256 --repeats "$REPEATS" --no-memory --no-progress --json \
    | tee "$OUT/$1.txt" | tail -1 > "$OUT/$1.json"
  head -n -1 "$OUT/$1.txt"
}
bench tiny-altup-vs-tiny --preset tiny-altup --vs tiny --batch-size 16
bench tiny-raltup-vs-tiny --preset tiny-raltup --vs tiny --batch-size 16
bench tiny-altup-vs-wide --preset tiny-altup --vs benchmarks/configs/tiny-wide.json --batch-size 16
bench medium-altup-vs-medium --preset medium-altup --vs medium --batch-size 8
bench medium-raltup-vs-medium --preset medium-raltup --vs medium --batch-size 8
bench medium-altup-vs-wide --preset medium-altup --vs benchmarks/configs/medium-wide.json --batch-size 8 --repeats 5
