#!/usr/bin/env bash
# Simplified blocks (issue 7): validation loss per step against Pre-LN on the default corpus, the main
# job's budget (800 steps x 16 x 256 byte tokens, warmup 100 + cosine, wd 0.1), each block at its best
# peak learning rate of a small sweep (the 1e-3 default is too low for 4 x 128 models, and not equally so
# for every block). Runs two trainings at a time, one thread each; then prints the table
# (benchmarks/blocks_table.py). SWEEP="preset:lr,lr ..." overrides the grid (a name with a file
# benchmarks/configs/NAME.json trains that config instead of a preset); STEPS=400 with the encoder presets
# (tiny-bert, tiny-bert-sasp) gives the masked-LM comparison, and
# SWEEP="deep:0.002,0.004 deep-parallel:0.004,0.008" OUT=runs/blocks-depth the 8 x 128 depth check.
set -euo pipefail
OUT=${OUT:-runs/blocks-quality}
STEPS=${STEPS:-800}
JOBS=${JOBS:-2}
SWEEP=${SWEEP:-"tiny:0.002,0.004,0.008 tiny-sasp:0.004,0.008,0.016,0.032 tiny-sas:0.008,0.016,0.032 tiny-parallel:0.004,0.008,0.016"}
mkdir -p "$OUT"
runs=()
for entry in $SWEEP; do
  preset=${entry%%:*}
  lrs=${entry#*:}
  for lr in ${lrs//,/ }; do runs+=("$preset $lr"); done
done
run_one() {
  set -euo pipefail
  local preset=$1 lr=$2 dir="$OUT/$1-lr$2"
  [[ -f "$dir.json" ]] && return 0  # finished earlier: keep it
  local model=(--preset "$preset")
  [[ -f "benchmarks/configs/$preset.json" ]] && model=(--config "benchmarks/configs/$preset.json")
  OMP_NUM_THREADS=1 condformer train "${model[@]}" --lr "$lr" --max-steps "$STEPS" --seq-len 256 \
    --batch-size 16 --no-progress --json --out "$dir" | tail -1 > "$dir.json.part" && mv "$dir.json.part" "$dir.json"
}
export -f run_one; export OUT STEPS
printf '%s\n' "${runs[@]}" | xargs -P "$JOBS" -L 1 bash -c 'run_one $0 $1'
python benchmarks/blocks_table.py "$OUT"
