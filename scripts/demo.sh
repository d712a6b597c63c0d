#!/usr/bin/env bash
# The whole study on the bundled model and example data, on CPU, in a few minutes:
# gradients (full and projected, one pass per split) -> scores -> comparison report and
# explanation browser (explanations.html), and the
# ground-truth retrieval table (which method ranks each test example's source first), for which
# the same pass also extracts the parameter-gradient target (kronecker per layer) and the mean
# last hidden state (and, opted in, a pass of its own the LESS-style dense projection of a few
# layers).
# The params and hidden targets are also scored whitened by the train set's Gram
# (--precondition gram), the ranking that explains best; the report and the closing table name the
# method of highest LDS.
# Rerunnable: a second run resumes from what is on disk and is quick.
# Knobs (environment): DEMO_OUTPUT, DEMO_MAX_SEQ_LENGTH, DEMO_DIMS, DEMO_TYPES, DEMO_LIMIT,
# DEMO_RETRIEVAL (space-separated subset of "params less hidden", default "params hidden": the
# LESS-style pass costs about 5 more minutes; empty: embeddings only),
# DEMO_LESS_MODULES, DEMO_LESS_DIM. The linear datamodeling score (LDS) table is added from the
# shipped ground truth (examples/ground_truth.safetensors, of `gradproj retrain`) when the run
# covers the same examples: the whole example set at max_seq_length 256 (no DEMO_LIMIT).
# The far test set (examples/data/test_far.jsonl: new questions, not paraphrases; docs/lds.md) is
# extracted in the same way, scored against the same train runs (without the LESS-style pass)
# and compared into $DEMO_OUTPUT/report_far, its retrieval by `related_ids` and its LDS from
# examples/ground_truth_far.safetensors; DEMO_FAR=0 leaves it out.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${DEMO_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=.venv/bin/python
OUT=${DEMO_OUTPUT:-demo_output}
MODEL=bundled:smollm2-135m-instruct
DIMS=${DEMO_DIMS:-512,4096,32768}
TYPES=${DEMO_TYPES:-rademacher}

RETRIEVAL=${DEMO_RETRIEVAL-params hidden}
LESS_MODULES=${DEMO_LESS_MODULES:-model.layers.2[6-9].self_attn.v_proj}
LESS_DIM=${DEMO_LESS_DIM:-1024}
FAR=${DEMO_FAR:-1}
run() { echo "$OUT/gradients/$1/smollm2-135m-instruct/$2/$2/0"; }
# Other targets, for the retrieval table only: run directory. params and hidden come from the
# embedding gradients' own pass; the LESS-style dense projection needs a pass of its own.
declare -A retrieval_runs=(
    [params]=params_kronecker_16x16 [hidden]=hidden [less]="params_rademacher_${LESS_DIM}"
)
LESS_OPTIONS=(--target params --modules "$LESS_MODULES" --random_projection --proj_type rademacher
    --proj_dim "$LESS_DIM" --batch_tokens 8192 --proj_memory_gb 2)
extract() {  # split, then extra options
    local split=$1; shift
    $PY extract_gradients.py "$MODEL" "examples/data/$split.jsonl" 0 --dataset_split "$split" \
        --max_seq_length "${DEMO_MAX_SEQ_LENGTH:-256}" --gradients_output_path "$OUT/gradients" \
        --device cpu ${DEMO_LIMIT:+--limit "$DEMO_LIMIT"} "$@"
}
score() {  # variant, output, then extra options (TEST: the test split, default test)
    local variant=$1 output=$2; shift 2
    $PY score_influence.py --train "$(run "$variant" train)" \
        --test "$(run "$variant" "${TEST:-test}")" --func both --output "$output" --top_k 5 "$@"
}

targets=embeddings
for name in $RETRIEVAL; do
    [ -n "${retrieval_runs[$name]:-}" ] || { echo "DEMO_RETRIEVAL: unknown '$name'" >&2; exit 2; }
    [ "$name" = less ] || targets+=",$name"
done
projections=(--target "$targets" --random_projection --proj_dim "full,$DIMS" --proj_type "$TYPES")
echo "== 1/5 train gradients (full and ${TYPES} at ${DIMS} dims; targets $targets; one pass)"
extract train "${projections[@]}"
echo "== 2/5 test gradients"
extract test "${projections[@]}"
[ "$FAR" != 1 ] || extract test_far "${projections[@]}"

if [[ " $RETRIEVAL " == *" less "* ]]; then
    echo "== 3/5 the LESS-style target for the retrieval table (a pass of its own)"
    for split in train test; do extract "$split" "${LESS_OPTIONS[@]}"; done
else
    echo "== 3/5 (no LESS-style pass: DEMO_RETRIEVAL=\"params less hidden\" adds it)"
fi

echo "== 4/5 influence scores (dot and cosine)"
variants=(full)
IFS=, read -ra dims <<< "$DIMS"
IFS=, read -ra types <<< "$TYPES"
for t in "${types[@]}"; do for d in "${dims[@]}"; do variants+=("${t}_${d}"); done; done
for v in "${variants[@]}"; do score "$v" "$OUT/scores/$v"; done
others=()
for name in $RETRIEVAL; do
    variant=${retrieval_runs[$name]}
    score "$variant" "$OUT/retrieval_scores/$variant"
    others+=("$OUT/retrieval_scores/$variant")
    # Whitened by the train set's Gram (docs/choosing.md): the ranking that explains best.
    # Its factorization (seconds) is stored beside the train run and reused by a rerun.
    if [ "$name" != less ]; then
        score "$variant" "$OUT/retrieval_scores/${variant}_gram" --precondition gram
        others+=("$OUT/retrieval_scores/${variant}_gram")
    fi
done
far_others=()
if [ "$FAR" = 1 ]; then  # the far set: the same scorings against the same train runs
    for v in "${variants[@]}"; do TEST=test_far score "$v" "$OUT/scores_far/$v"; done
    for name in $RETRIEVAL; do
        [ "$name" != less ] || continue
        variant=${retrieval_runs[$name]}
        TEST=test_far score "$variant" "$OUT/retrieval_scores_far/$variant"
        TEST=test_far score "$variant" "$OUT/retrieval_scores_far/${variant}_gram" \
            --precondition gram
        far_others+=("$OUT/retrieval_scores_far/$variant" "$OUT/retrieval_scores_far/${variant}_gram")
    done
fi

echo "== 5/5 comparison with the full gradient, and retrieval of each test example's source"
candidates=()
for v in "${variants[@]:1}"; do candidates+=("$OUT/scores/$v"); done
GROUND_TRUTH=examples/ground_truth.safetensors
FAR_TRUTH=examples/ground_truth_far.safetensors
lds=() far_lds=()
if [ -z "${DEMO_LIMIT:-}" ] && [ "${DEMO_MAX_SEQ_LENGTH:-256}" = 256 ] && [ -f "$GROUND_TRUTH" ]; then
    lds=(--lds "$GROUND_TRUTH")
    [ ! -f "$FAR_TRUTH" ] || far_lds=(--lds "$FAR_TRUTH")
else
    echo "(no LDS table: the shipped ground truth covers the whole example set at 256 tokens)"
fi
if [ "$FAR" = 1 ]; then
    far_candidates=()
    for v in "${variants[@]:1}"; do far_candidates+=("$OUT/scores_far/$v"); done
    echo "-- the far test set (new questions; retrieval of related_ids): $OUT/report_far"
    $PY compare_projections.py --reference "$OUT/scores_far/full" \
        --candidates "${far_candidates[@]}" --output "$OUT/report_far" --retrieval \
        --source_field related_ids ${far_others[@]:+--retrieval_methods "${far_others[@]}"} \
        ${far_lds[@]:+"${far_lds[@]}"}
    $PY scripts/demo_summary.py --report "$OUT/report_far"
    echo "-- the paraphrase test set: $OUT/report"
fi
$PY compare_projections.py --reference "$OUT/scores/full" --candidates "${candidates[@]}" \
    --output "$OUT/report" --emulate_original --retrieval ${others[@]:+--retrieval_methods "${others[@]}"} \
    ${lds[@]:+"${lds[@]}"}
echo "explanation browser (a static page; open it in a web browser): $OUT/report/explanations.html"
$PY scripts/demo_summary.py --report "$OUT/report"
