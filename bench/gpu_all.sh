#!/usr/bin/env bash
# Every GPU measurement gradproj needs, in one command of at most 8 minutes (bench/RESULTS.md):
#
#   bash bench/gpu_all.sh OUTDIR              # on a machine with one CUDA GPU
#   bash bench/gpu_all.sh --dry-run OUTDIR    # every step on the CPU at toy sizes, in seconds
#
# Steps, each under its own time limit (and within GPU_ALL_BUDGET seconds in all, default 480;
# the dry run's limits are GPU_ALL_DRY_SCALE (8) times longer):
# environment, setup, model, cuda_tests, matmul, extract_calibration, extract_bf16,
# extract_fp32, scoring, projection. A step that fails or runs out of time is recorded as such
# and the next one runs. Written as it goes into OUTDIR (five files, so that all come back from
# a lent machine): gpu_results.md (one markdown table, rewritten after each step; `gradproj plan
# --calibration OUTDIR/gpu_results.md` reads it), environment.txt (GPU, driver, torch, CUDA,
# nvidia-smi), raw.log (every step's output), steps.tsv, results.json. Scratch goes to WORKDIR
# (default: a fresh folder under /tmp; the runs of the scoring step take about 10 GB).
#
# Before the clock starts (here, with network; none is needed on the GPU machine):
#   bash bench/gpu_all.sh --pack        # writes .gpu_carry/ (git-ignored, about 5 MB): the
#                                       # bundled model's config and tokenizer, and wheels of the
#                                       # packages the GPU image lacks (datasets, python-dotenv)
# then run there, carrying .gpu_carry (the device tool: carry [".gpu_carry"]):
#   bash bench/gpu_all.sh "$OUT/gpu"
# The bundled weights (538 MB converted) are too large to carry: without them the model step
# builds random weights in the bundled model's configuration (the same FLOPs; the table's
# "model" row says which weights were used).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
if [ -x .venv/bin/python ]; then PY=${PYTHON:-$REPO/.venv/bin/python}; else PY=${PYTHON:-python3}; fi
export PYTHON=$PY PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
CARRY=$REPO/.gpu_carry

if [ "${1:-}" = "--pack" ]; then
    set -e
    "$PY" bench/gpu_all.py pack "$CARRY/smollm2-135m-instruct"
    mkdir -p "$CARRY/wheels"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d "$CARRY/wheels" datasets==5.2.0 python-dotenv==1.2.4 dill==0.4.0 multiprocess==0.70.18
    du -sh "$CARRY"
    exit 0
fi

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_all.sh [--dry-run] OUTDIR [WORKDIR] | --pack" >&2
    exit 2
fi
OUTDIR=$(realpath -m "$1")
WORK=$(realpath -m "${2:-$(mktemp -d /tmp/gradproj_gpu.XXXXXX)}")
mkdir -p "$OUTDIR" "$WORK"
rm -f "$OUTDIR"/{gpu_results.md,environment.txt,raw.log,steps.tsv,results.json,DRY_RUN}
# The dry run checks that every step works, not how fast: on a shared CPU its limits stretch.
SCALE=1
[ $DRY = 1 ] && SCALE=${GPU_ALL_DRY_SCALE:-8}
BUDGET=${GPU_ALL_BUDGET:-$((480 * SCALE))}
STARTED=$SECONDS

# The test files that hold `pytest.mark.gpu` tests (tests/test_gpu_check.py keeps this list whole):
# named, so that a test module importing a package the GPU image lacks cannot stop the step.
GPU_TESTS=(tests/test_projection.py tests/test_cuda.py)
if [ $DRY = 1 ]; then
    touch "$OUTDIR/DRY_RUN"
    DEVICE=cpu MATMUL=256 MODEL_FLAGS=(--tiny) WARMUP=0
    DATA=(--limit 8 --max_seq_length 64 --batch_tokens 256)
    DIMS=full,64,256
    SCORING=(--n_train 40 --n_test 4 --dims 2304 --device cpu)
    PROJ=(--dry-run)
else
    DEVICE=cuda MATMUL=8192 MODEL_FLAGS=() WARMUP=1
    DATA=(--max_seq_length 2048)
    DIMS=full,8192,2048000
    # 16,384 dims, and the full embedding gradients of 4,096 tokens x 576 hidden as vectors
    SCORING=(--n_train 1000 --n_test 100 --dims 16384,2359296 --device cuda)
    PROJ=()
fi

# step NAME LIMIT COMMAND...: run under min(LIMIT, budget left), append its output to raw.log,
# record "ok", "failed (exit N)", "timed out" or "skipped (budget)" in steps.tsv, redo the table.
step() {
    local name=$1 limit=$2 left status began rc
    shift 2
    limit=$((limit * SCALE))
    left=$((BUDGET - (SECONDS - STARTED)))
    [ "$left" -lt "$limit" ] && limit=$left
    began=$(date +%s%N)
    if [ "$limit" -lt 5 ]; then
        status="skipped (budget)"
    else
        echo "=== $name (limit ${limit} s): $*" >>"$OUTDIR/raw.log"
        # bash -c: the steps that are functions of this script run under timeout too
        timeout --kill-after=5 "$limit" bash -c '"$@"' _ "$@" >>"$OUTDIR/raw.log" 2>&1
        rc=$?
        case $rc in
            0) status=ok ;;
            124 | 137) status="timed out" ;;
            *) status="failed (exit $rc)" ;;
        esac
    fi
    local tenths=$((($(date +%s%N) - began) / 100000000))
    printf '%s\t%s\t%d.%d\t%s\n' "$name" "$status" $((tenths / 10)) $((tenths % 10)) "$limit" \
        >>"$OUTDIR/steps.tsv"
    echo "$name: $status" >&2
    "$PY" bench/gpu_all.py table "$OUTDIR" "$WORK" >>"$OUTDIR/raw.log" 2>&1
}

setup() {  # the packages the GPU image lacks, from the carried wheels
    if "$PY" -c "import datasets, dotenv" 2>/dev/null; then echo "packages present"; return 0; fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" \
        "$CARRY"/wheels/*.whl
}

extract() {  # extract NAME DTYPE ARGS...: optionally a short warm-up (Triton compiles), then timed
    local name=$1 dtype=$2
    shift 2
    read -ra DATA <<<"$DATA_ARGS"
    if [ $WARMUP = 1 ]; then
        "$PY" bench/gpu_all.py extract --model "$WORK/model" --device $DEVICE --dtype "$dtype" \
            --work "$WORK/warmup" --json "$WORK/warmup.json" -- "$@" --limit 8 || return
    fi
    "$PY" bench/gpu_all.py extract --model "$WORK/model" --device $DEVICE --dtype "$dtype" \
        --work "$WORK/$name" --json "$WORK/$name.json" -- "$@" "${DATA[@]}"
    rm -rf "$WORK/$name"
}

DATA_ARGS="${DATA[*]}"
export -f setup extract
export PY DEVICE WARMUP WORK CARRY DATA_ARGS
TARGETS=(--target embeddings,params --random_projection --proj_type rademacher --proj_dim $DIMS)
step environment 20 "$PY" bench/gpu_all.py environment "$OUTDIR" --json "$WORK/environment.json"
step setup 20 setup
export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
step model 40 "$PY" bench/gpu_all.py model "$WORK/model" --source "$CARRY/smollm2-135m-instruct" \
    "${MODEL_FLAGS[@]}" --json "$WORK/model.json"
step cuda_tests 60 "$PY" -m pytest -q -p no:cacheprovider --junitxml "$WORK/cuda_tests.xml" \
    -m gpu "${GPU_TESTS[@]}"
"$PY" bench/gpu_all.py junit "$WORK/cuda_tests.xml" --json "$WORK/cuda_tests.json" \
    >>"$OUTDIR/raw.log" 2>&1
step matmul 15 "$PY" bench/gpu_all.py matmul --device $DEVICE --size $MATMUL \
    --json "$WORK/matmul.json"
step extract_calibration 25 extract extract_calibration bf16 --target embeddings
step extract_bf16 40 extract extract_bf16 bf16 "${TARGETS[@]}"
step extract_fp32 35 extract extract_fp32 fp32 "${TARGETS[@]}"
step scoring 100 "$PY" bench/score_speed.py "${SCORING[@]}" --workdir "$WORK/scoring" \
    --json "$WORK/scoring.json"
rm -rf "$WORK/scoring"
step projection 180 bash bench/gpu_projection.sh "${PROJ[@]}" "$WORK/projection"
"$PY" bench/gpu_all.py table "$OUTDIR" "$WORK" >>"$OUTDIR/raw.log" 2>&1
echo "done in $((SECONDS - STARTED)) s: $OUTDIR/gpu_results.md" >&2
