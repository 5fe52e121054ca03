#!/usr/bin/env bash
# isoFLOP quality study for AltUp (issue 5): dense width d, AltUp K=2, Recycled-AltUp K=2 and dense width 2d
# at the same training-FLOP budget as the other studies (`tiny` for 800 steps of 16 x 256 tokens =
# 2.127e13 FLOPs), default corpus, one seed each. AltUp's predict/correct work is in the FLOP count.
# SKIP="tiny" skips models whose result file already exists elsewhere.
set -euo pipefail
BUDGET=2.127e13
OUT=${OUT:-runs/altup-quality}
SKIP=${SKIP:-}
mkdir -p "$OUT"
common=(--budget-flops "$BUDGET" --seq-len 256 --batch-size 16 --no-progress --json)
run() {  # name, then the model flag
  [[ " $SKIP " == *" $1 "* ]] && return 0
  condformer train "${@:2}" "${common[@]}" --out "$OUT/$1" | tail -1 > "$OUT.$1.json"
}
run tiny --preset tiny
run tiny-altup --preset tiny-altup
run tiny-raltup --preset tiny-raltup
run tiny-wide --config benchmarks/configs/tiny-wide.json
