#!/usr/bin/env bash
# The whole study on the bundled model and example data, on CPU, in a few minutes:
# gradients (full and projected, one pass per split) -> scores -> comparison report.
# Rerunnable: a second run resumes from what is on disk and is quick.
# Knobs (environment): DEMO_OUTPUT, DEMO_MAX_SEQ_LENGTH, DEMO_DIMS, DEMO_TYPES, DEMO_LIMIT.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${DEMO_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=.venv/bin/python
OUT=${DEMO_OUTPUT:-demo_output}
MODEL=bundled:smollm2-135m-instruct
DIMS=${DEMO_DIMS:-512,4096,32768}
TYPES=${DEMO_TYPES:-rademacher,normal}
common=(--max_seq_length "${DEMO_MAX_SEQ_LENGTH:-256}" --gradients_output_path "$OUT/gradients"
        --random_projection --proj_dim "full,$DIMS" --proj_type "$TYPES" --device cpu)
[ -n "${DEMO_LIMIT:-}" ] && common+=(--limit "$DEMO_LIMIT")

echo "== 1/4 train gradients (full and ${TYPES} at ${DIMS} dims, one pass)"
$PY extract_gradients.py "$MODEL" examples/data/train.jsonl 0 --dataset_split train "${common[@]}"
echo "== 2/4 test gradients"
$PY extract_gradients.py "$MODEL" examples/data/test.jsonl 0 --dataset_split test "${common[@]}"

echo "== 3/4 influence scores (dot and cosine)"
run() { echo "$OUT/gradients/$1/smollm2-135m-instruct/$2/$2/0"; }
variants=(full)
IFS=, read -ra dims <<< "$DIMS"
IFS=, read -ra types <<< "$TYPES"
for t in "${types[@]}"; do for d in "${dims[@]}"; do variants+=("${t}_${d}"); done; done
for v in "${variants[@]}"; do
    $PY score_influence.py --train "$(run "$v" train)" --test "$(run "$v" test)" \
        --func both --output "$OUT/scores/$v" --top_k 5
done

echo "== 4/4 comparison with the full gradient"
candidates=()
for v in "${variants[@]:1}"; do candidates+=("$OUT/scores/$v"); done
$PY compare_projections.py --reference "$OUT/scores/full" --candidates "${candidates[@]}" \
    --output "$OUT/report" --emulate_original
$PY scripts/demo_summary.py --scores "$OUT/scores" --report "$OUT/report" \
    --test_data examples/data/test.jsonl
