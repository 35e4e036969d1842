#!/usr/bin/env bash
# Set up bh_routing on a fresh machine (or Colab) without ever replacing an installed torch.
#   bash scripts/setup.sh                    # the package and its runtime dependencies (newest allowed)
#   bash scripts/setup.sh --test             # ... plus what the test suite needs
#   bash scripts/setup.sh --test --pinned    # ... at the known-good versions of constraints.txt
# Where no torch is installed it installs torch==2.13.0, which this project's machines serve as a
# local CPU wheel (elsewhere, install the torch build you want first: this script keeps it; the
# constraints never name torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PIP=("$PY" -m pip install -q --disable-pip-version-check)
extra="" constraints=()
for arg in "$@"; do
  case "$arg" in
    --test) extra="[test]" ;;
    --pinned) constraints=(-c constraints.txt) ;;
    *) echo "setup.sh: unknown option '$arg' (use --test and/or --pinned)" >&2; exit 2 ;;
  esac
done
if ! "$PY" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" torch==2.13.0
fi
"${PIP[@]}" "${constraints[@]}" -r requirements_bh.txt -e ".$extra"
