#!/usr/bin/env bash
# Projection speed on one CUDA GPU (expected about 3 minutes on an H100): the CPU table's columns for
# D = 16,777,216 (4096 tokens x 4096 hidden) and k up to 2,048,000, then the 500-token point
# (target: under 0.1 s per example at 2,048,000 dims). Run from anywhere: bash bench/gpu_projection.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3
export PYTHONUNBUFFERED=1
"$PY" bench/projection_speed.py --device cuda --log2-dims 24 --ks 8192,16384,204800,2048000 \
    --batch 32 --roofline-batch 128 --max-entries 2e11
echo "500-token examples (D used = 500 x 4096), batch 128:"
"$PY" bench/projection_speed.py --device cuda --log2-dims 24 --ks 2048000 --tokens 500 \
    --batch 128 --roofline-batch 128 --max-entries 5e11 --no-trak
