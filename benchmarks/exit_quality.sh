#!/usr/bin/env bash
# Early-exit quality (issue 6): exit models trained with aligned training (exits after every layer, shared
# head, uniform weights) for 800 steps of 16 x 256 stdlib tokens, their dense twins for the same steps, then
# confidence thresholds calibrated to <= 1% validation-loss increase (checked on held-out batches).
# tiny (4 x 128; its dense twin is runs/altup-quality/tiny, 799 steps) and deep (8 x 128).
set -euo pipefail
OUT=${OUT:-runs/exit-quality}
mkdir -p "$OUT"
common=(--max-steps 800 --seq-len 256 --batch-size 16 --no-progress --json)
train() {  # name, then the model flag
  [[ -f "$OUT.$1.json" ]] || condformer train "${@:2}" "${common[@]}" --out "$OUT/$1" | tail -1 > "$OUT.$1.json"
}
train tiny-exit --preset tiny-exit
train deep-exit --config benchmarks/configs/deep-exit.json
train deep --config benchmarks/configs/deep.json
# thresholds within 1% loss: cheapest by FLOPs (an exit check = head / layer FLOPs) and by agreement (reported
# only), then cheapest for decoding on this CPU (a check's cost measured by exit_check_cost.py), written
for run in tiny-exit deep-exit; do
  condformer calibrate "$OUT/$run" --tolerance 0.01 --dry-run --json | tail -1 > "$OUT.$run.calibrate-flops.json"
  condformer calibrate "$OUT/$run" --tolerance 0.01 --metric agreement --dry-run --json | tail -1 \
    > "$OUT.$run.calibrate-agreement.json"
  python benchmarks/exit_check_cost.py "$OUT/$run" | tail -1 > "$OUT.$run.check-cost.json"
  cost=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['check_cost_layers'])" "$OUT.$run.check-cost.json")
  condformer calibrate "$OUT/$run" --tolerance 0.01 --check-cost "$cost" --json | tail -1 > "$OUT.$run.calibrate.json"
done
