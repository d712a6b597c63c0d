#!/usr/bin/env bash
# The original study's cosine result on the bundled model (docs/original_study.md): gradients of
# the example data in fp32 (full and Rademacher projections, one pass per split) and in fp16 (the
# original's model dtype, full only), scores, and the comparison with the emulated original.
# Rerunnable: a second run resumes from what is on disk.
# The fp16 model on CPU is slow (about 34 s of CPU per example at 256 tokens, against about 1 s in
# fp32): without STUDY_FP16=1 the emulation's fp16_model step rounds the fp32 gradients instead.
# Knobs (environment): STUDY_OUTPUT, STUDY_MAX_SEQ_LENGTH, STUDY_DIMS, STUDY_FP16, and
# STUDY_LIMIT_TRAIN / STUDY_LIMIT_TEST (the first rows only; keep more than 64 train rows).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=.venv/bin/python
OUT=${STUDY_OUTPUT:-original_study_output}
MODEL=bundled:smollm2-135m-instruct
DIMS=${STUDY_DIMS:-256,1024,4096}
LEN=${STUDY_MAX_SEQ_LENGTH:-256}
run() { echo "$OUT/$1/$2/smollm2-135m-instruct/$3/$3/0"; }

declare -A limit=([train]=${STUDY_LIMIT_TRAIN:-} [test]=${STUDY_LIMIT_TEST:-})
for split in train test; do
    opts=(--max_seq_length "$LEN" --device cpu)
    [ -n "${limit[$split]}" ] && opts+=(--limit "${limit[$split]}")
    echo "== $split gradients: fp32 model, full and rademacher at $DIMS dims"
    $PY extract_gradients.py "$MODEL" "examples/data/$split.jsonl" 0 --dataset_split "$split" \
        "${opts[@]}" --gradients_output_path "$OUT/fp32" \
        --random_projection --proj_dim "full,$DIMS" --proj_type rademacher
    [ "${STUDY_FP16:-0}" = 1 ] || continue
    echo "== $split gradients: fp16 model, full"
    $PY extract_gradients.py "$MODEL" "examples/data/$split.jsonl" 0 --dataset_split "$split" \
        "${opts[@]}" --gradients_output_path "$OUT/fp16" --dtype fp16
done

echo "== scores"
IFS=, read -ra dims <<< "$DIMS"
variants=(full)
for d in "${dims[@]}"; do variants+=("rademacher_$d"); done
for v in "${variants[@]}"; do
    $PY score_influence.py --train "$(run fp32 "$v" train)" --test "$(run fp32 "$v" test)" \
        --func both --output "$OUT/scores/$v"
done

echo "== comparison with the emulated original"
candidates=()
for v in "${variants[@]:1}"; do candidates+=("$OUT/scores/$v"); done
fp16=()
[ "${STUDY_FP16:-0}" = 1 ] && fp16=(--fp16_runs "$(run fp16 full train)" "$(run fp16 full test)")
$PY compare_projections.py --reference "$OUT/scores/full" --candidates "${candidates[@]}" \
    --output "$OUT/report" --emulate_original "${fp16[@]}"
echo "report: $OUT/report/report.md, ablation: $OUT/report/ablation.csv"
