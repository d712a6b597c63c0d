#!/usr/bin/env bash
# Projection speed on one CUDA GPU (expected about 3 minutes on an H100): the 500-token point
# (target: under 0.1 s per example at 2,048,000 dims), then the CPU table's columns for
# D = 16,777,216 (4096 tokens x 4096 hidden) and k up to 2,048,000. Run from anywhere:
#   bash bench/gpu_projection.sh [--dry-run] [JSON_PREFIX]
# --dry-run: the same two runs on the CPU at toy sizes, in seconds (bench/gpu_all.sh --dry-run).
# JSON_PREFIX: also write the rows to JSON_PREFIX_full.json and JSON_PREFIX_500.json as they come.
set -euo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
JSON=${1:-}
[ -z "$JSON" ] || JSON=$(realpath -m "$JSON")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3
export PYTHONUNBUFFERED=1
json() { [ -z "$JSON" ] || echo "--json ${JSON}_$1.json"; }
if [ $DRY = 1 ]; then
    FULL=(--device cpu --log2-dims 13 --ks 64 --batch 2 --roofline-batch 2
          --roofline-log2-dim 13 --max-entries 1e6 --no-trak)
    AT500=(--device cpu --log2-dims 13 --ks 128 --tokens 1 --batch 2 --roofline-batch 2
           --roofline-log2-dim 13 --max-entries 1e6 --no-trak)
else
    FULL=(--device cuda --log2-dims 24 --ks 8192,16384,204800,2048000 --batch 32
          --roofline-batch 128 --max-entries 2e11)
    AT500=(--device cuda --log2-dims 24 --ks 2048000 --tokens 500 --batch 128
           --roofline-batch 128 --max-entries 5e11 --no-trak)
fi
# The 500-token point first: it is the target, and the full table may not fit a time limit.
echo "500-token examples (D used = 500 x 4096), batch 128:"
# shellcheck disable=SC2046
"$PY" bench/projection_speed.py "${AT500[@]}" $(json 500)
# shellcheck disable=SC2046
"$PY" bench/projection_speed.py "${FULL[@]}" $(json full)
