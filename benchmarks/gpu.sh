#!/usr/bin/env bash
# The accelerator check, in one go (issue 20): the device test subset, then the headline speed ratios at GPU
# sizes in bf16, every row a paired A/B in one process, then one JSON and one Markdown table.
#
#   bash benchmarks/gpu.sh                 # on a CUDA machine (target: under 8 minutes on an H100/H200)
#   bash benchmarks/gpu.sh --device cpu    # smoke mode: tiny sizes, fp32, one repeat; checks the script
#
# Writes $OUT (default runs/gpu-<device>): tests.txt, one <row>.json per bench row, gpu.json and gpu.md
# (which names the device). Rows: MoD (medium-mod vs medium), MoE (top-2 of 8 vs a dense FFN of equal
# FLOPs, train and forward, and the layer against transformers' Mixtral block), SAS-P vs Pre-LN (compiled),
# AltUp K=2 vs dense width d, early exit and self-speculative decoding of a tiny exit model trained here
# first (batch 1 and 8) against the same weights at full depth; and the MFU of a bf16 + compiled training step of
# gpt2-small and gpt2-small-moe under FSDP2 on one rank (benchmarks/fsdp_mfu.py, mfu.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [[ "${1:-}" == "--device" ]]; then DEVICE=${2:?--device needs a value}; fi
OUT=${OUT:-runs/gpu-$DEVICE}
mkdir -p "$OUT"
start=$SECONDS
if [[ $DEVICE == cpu ]]; then  # smoke: every row runs, at sizes that finish in a couple of minutes
  DT=fp32; R=(--repeats 1 --warmup 1); BIG=(--seq-len 64 --batch-size 2); SMALL=(--seq-len 64 --batch-size 2)
  PEER=(--tokens 256 --repeats 1 --warmup 1); STEPS=20; GEN=(--seq-len 48 --new-tokens 16)
  MEDIUM=tiny; MOE_A=benchmarks/configs/medium-top2-all-dropless.json; MOE_B=benchmarks/configs/medium-ffn2x.json
  MFU_PRESETS=(tiny tiny-moe); MFU=(--seq-len 64 --batch-size 2 --steps 2 --warmup 1)
else
  DT=bf16; R=(--repeats 5 --warmup 3); BIG=(--seq-len 1024 --batch-size 8); SMALL=(--seq-len 256 --batch-size 32)
  PEER=(--tokens 16384 --repeats 7 --warmup 3 --dtype bf16); STEPS=600; GEN=(--seq-len 320 --new-tokens 128)
  MEDIUM=medium; MOE_A=benchmarks/configs/medium-top2-all-dropless.json; MOE_B=benchmarks/configs/medium-ffn2x.json
  MFU_PRESETS=(gpt2-small gpt2-small-moe); MFU=(--seq-len 1024 --batch-size 8 --steps 10 --warmup 3 --compile)
fi
echo "== tests on $DEVICE"
CONDFORMER_TEST_DEVICE=$DEVICE python -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$OUT/tests.txt" | tail -3
b() {  # row name, then bench flags
  condformer bench --no-progress --no-memory --json --device "$DEVICE" --dtype "$DT" "${R[@]}" "${@:2}" \
    > "$OUT/$1.txt" 2>&1 || { echo "row $1 failed: see $OUT/$1.txt"; return 0; }
  tail -1 "$OUT/$1.txt" > "$OUT/$1.json"
  grep -E "paired speedup" "$OUT/$1.txt" | sed "s/^/$1: /"
}
echo "== speed rows"
b mod-train --preset medium-mod --vs medium --mode train "${BIG[@]}"
b moe-top2-train --preset "$MOE_A" --vs "$MOE_B" --mode train "${BIG[@]}"
b moe-top2-forward --preset "$MOE_A" --vs "$MOE_B" --mode forward "${BIG[@]}"
python benchmarks/moe_peer.py --device "$DEVICE" "${PEER[@]}" --json "$OUT/moe-peer.json" | tail -10 || echo "moe-peer failed"
b sasp-train-compiled --preset medium-sasp --vs medium --mode train --compile "${SMALL[@]}"
b altup-train --preset "$MEDIUM-altup" --vs "$MEDIUM" --mode train "${SMALL[@]}"
echo "== a tiny exit model for the decoding rows ($STEPS steps)"
RUN=$OUT/tiny-exit
rm -rf "$RUN"
condformer train --preset tiny-exit --max-steps "$STEPS" --device "$DEVICE" --no-progress --out "$RUN" \
  > "$OUT/train.txt" 2>&1 || echo "training failed: see $OUT/train.txt"
condformer calibrate "$RUN" --tolerance 0.01 > "$OUT/calibrate.txt" 2>&1 || echo "calibration failed: see $OUT/calibrate.txt"
for B in 1 8; do
  b "exit-b$B" --preset "$RUN" --vs "$RUN" --mode generate --data stdlib "${GEN[@]}" --batch-size "$B"
  b "spec-b$B" --preset "$RUN" --vs "$RUN" --mode generate --data stdlib "${GEN[@]}" --batch-size "$B" \
    --speculative 2 --draft-tokens 4
done
echo "== FSDP2 on one rank: MFU of a training step (issue 22)"
rm -f "$OUT/mfu.jsonl"
for P in "${MFU_PRESETS[@]}"; do
  torchrun --standalone --nproc_per_node=1 benchmarks/fsdp_mfu.py --preset "$P" --device "$DEVICE" "${MFU[@]}" \
    --out "$OUT/mfu.jsonl" > "$OUT/mfu-$P.txt" 2>&1 || echo "mfu $P failed: see $OUT/mfu-$P.txt"
done
python benchmarks/gpu_table.py "$OUT"
echo "== done in $((SECONDS - start)) s: $OUT/gpu.md"
