#!/usr/bin/env bash
# isoFLOP quality study for Mixture-of-Depths (issue 3): every model trains to the same training-FLOP
# budget (the main job's: `tiny` for 800 steps of 16 x 256 tokens = 2.127e13 FLOPs) on the default corpus.
# Validation loss uses each model's causal routing (eval mode), as sampling would.
set -euo pipefail
BUDGET=2.127e13
OUT=${OUT:-runs/mod-quality}
mkdir -p "$(dirname "$OUT")"
common=(--budget-flops "$BUDGET" --seq-len 256 --batch-size 16 --no-progress --json)
condformer train --preset tiny "${common[@]}" --out "$OUT/tiny" | tail -1 > "$OUT.tiny.json"
condformer train --preset tiny-mod "${common[@]}" --out "$OUT/tiny-mod" | tail -1 > "$OUT.tiny-mod.json"
condformer train --config benchmarks/configs/mod-8x128.json "${common[@]}" --out "$OUT/mod-8x128" | tail -1 > "$OUT.mod-8x128.json"
condformer train --config benchmarks/configs/mod-4x192.json "${common[@]}" --out "$OUT/mod-4x192" | tail -1 > "$OUT.mod-4x192.json"
# the other causal-routing method: BCE on the router's own logits (aux_coef 0.1) instead of a predictor
condformer train --config benchmarks/configs/tiny-mod-aux.json "${common[@]}" --out "$OUT/tiny-mod-aux" | tail -1 > "$OUT.tiny-mod-aux.json"
# non-causal top-k evaluation of the same checkpoint: the upper bound that causal routing approximates
condformer eval "$OUT/tiny-mod" --eval-routing topk --json | tail -1 > "$OUT.tiny-mod.topk.json"
