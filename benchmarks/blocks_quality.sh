#!/usr/bin/env bash
# Simplified blocks (issue 7): validation loss at the same step count as Pre-LN, default corpus, the main
# job's settings (800 steps x 16 x 256 byte tokens). Decoders: Pre-LN (`tiny`, the main job) vs parallel,
# SAS, SAS-P; encoders (masked LM, 15% masking): BERT-style Pre-LN vs SAS-P.
# SKIP="tiny" reuses an existing runs/blocks-quality.tiny.json (e.g. copied from the main job's run).
set -euo pipefail
OUT=${OUT:-runs/blocks-quality}
SKIP=${SKIP:-}
STEPS=${STEPS:-800}
mkdir -p "$OUT"
common=(--max-steps "$STEPS" --seq-len 256 --batch-size 16 --no-progress --json)
for p in tiny tiny-parallel tiny-sas tiny-sasp tiny-bert tiny-bert-sasp; do
  [[ " $SKIP " == *" $p "* ]] && continue
  condformer train --preset "$p" "${common[@]}" --out "$OUT/$p" | tail -1 > "$OUT.$p.json"
done
