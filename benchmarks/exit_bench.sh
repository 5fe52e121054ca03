#!/usr/bin/env bash
# Early-exit and self-speculative decoding speed (issue 6): a trained exit run decoding 128 tokens after a
# 192-token prompt of stdlib validation text, batch 1 (and 8 for early exit), greedy, against the same
# weights decoding plainly at full depth in the same process (`bench --vs` decodes at full depth).
# Early exit uses the run's calibrated thresholds (`condformer calibrate RUN --tolerance 0.01` first).
set -euo pipefail
RUN=${RUN:-runs/exit-quality/tiny-exit}
OUT=${OUT:-runs/exit-bench}
mkdir -p "$OUT"
common=(--preset "$RUN" --vs "$RUN" --mode generate --data stdlib --seq-len 320 --new-tokens 128 --repeats 9
        --no-memory --no-progress --json)
name=$(basename "$RUN")
condformer bench "${common[@]}" --batch-size 1 | tee "$OUT/$name-exit-b1.txt" | tail -1 > "$OUT/$name-exit-b1.json"
condformer bench "${common[@]}" --batch-size 8 | tee "$OUT/$name-exit-b8.txt" | tail -1 > "$OUT/$name-exit-b8.json"
for E in ${DRAFT_DEPTHS:-1 2 3}; do
  condformer bench "${common[@]}" --batch-size 1 --speculative "$E" --draft-tokens "${DRAFT_TOKENS:-4}" \
    | tee "$OUT/$name-spec$E.txt" | tail -1 > "$OUT/$name-spec$E.json"
done
