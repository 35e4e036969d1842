#!/usr/bin/env bash
# Set up bh_routing on a fresh machine (or Colab) without ever replacing an installed torch.
#   bash scripts/setup.sh           # the package and its runtime dependencies
#   bash scripts/setup.sh --test    # ... plus what the test suite needs
# Where no torch is installed it installs torch==2.13.0, which this project's machines serve as a
# local CPU wheel (elsewhere, install the torch build you want first: this script keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PIP="$PY -m pip install -q --disable-pip-version-check"
if ! $PY -c "import torch" 2>/dev/null; then
  $PIP torch==2.13.0
fi
$PIP -r requirements_bh.txt
if [ "${1:-}" = "--test" ]; then
  $PIP -e ".[test]"
else
  $PIP -e .
fi
