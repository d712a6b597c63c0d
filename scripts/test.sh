#!/usr/bin/env bash
# Install everything, then lint and run the whole test suite (offline, CPU; a local SLURM
# cluster is installed and started by the tests themselves; headless Chromium for the browser
# test is installed here, where root and apt-get allow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/browser_local.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q -rs "$@"  # -rs: say why anything skipped
