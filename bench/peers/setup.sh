#!/usr/bin/env bash
# The peers' own venv, bench/peers/.venv (never gradproj's: peers are not its dependencies).
# torch is the CPU build of the version gradproj's lock has; each peer is installed under
# constraints.txt so that none replaces that torch or transformers. torchvision and
# torchaudio, which bergson and kronfluence pull in, are removed afterwards: their PyPI wheels
# do not load against the CPU torch and would break `import transformers`; no peer code that
# runs here imports them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m venv "$here/.venv"
pip="$here/.venv/bin/pip"
torch_wheel="${TORCH_WHEEL:-torch==2.13.0}"  # e.g. a local torch-2.13.0+cpu wheel
"$pip" install -q "$torch_wheel"
"$pip" install -q -c "$here/constraints.txt" transformers==5.24.0
for peer in kronfluence==1.0.1 traker==0.3.2 bergson==2.5.1 dattri==0.3.0; do
    "$pip" install -q -c "$here/constraints.txt" "$peer"
done
"$pip" uninstall -y -q torchvision torchaudio || true
"$pip" freeze > "$here/out-freeze.txt"
echo "peers installed; versions in $here/out-freeze.txt"
