#!/usr/bin/env bash
# isoFLOP quality study for Mixture-of-Experts (issue 4): dense vs MoE variants at the same training-FLOP
# budget as the MoD study (`tiny` for 800 steps of 16 x 256 tokens = 2.127e13 FLOPs), default corpus.
# Validation is dropless (eval_capacity_factor null), as generation is.
# SKIP="tiny" skips models whose result file already exists elsewhere (e.g. the dense run of mod_quality.sh).
set -euo pipefail
BUDGET=2.127e13
OUT=${OUT:-runs/moe-quality}
SKIP=${SKIP:-}
mkdir -p "$OUT"
common=(--budget-flops "$BUDGET" --seq-len 256 --batch-size 16 --no-progress --json)
for p in tiny tiny-moe tiny-mode tiny-switch; do
  [[ " $SKIP " == *" $p "* ]] && continue
  condformer train --preset "$p" "${common[@]}" --out "$OUT/$p" | tail -1 > "$OUT.$p.json"
done
