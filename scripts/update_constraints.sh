#!/usr/bin/env bash
# Regenerate constraints.txt: the known-good versions of every dependency of bh_routing and of its
# test extra, resolved from pyproject.toml by uv for every Python the package supports.
# torch and the packages only torch needs are excluded from the resolution, so installing with the
# constraints never pins, replaces or upgrades the torch you have (Colab's CUDA build stays).
#   bash scripts/update_constraints.sh        # then commit constraints.txt with the change that needed it
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
$PY -m uv --version >/dev/null 2>&1 || $PY -m pip install -q --disable-pip-version-check uv
excludes=$(mktemp)
trap 'rm -f "$excludes"' EXIT
echo torch >"$excludes"
$PY -m uv pip compile pyproject.toml --extra test --universal --python-version 3.10 --excludes "$excludes" \
  --no-header --quiet -o constraints.txt
{ printf '%s\n' "# Known-good versions for bh_routing and its tests (generated from pyproject.toml by" \
    "# scripts/update_constraints.sh; torch is deliberately absent). Use: bash scripts/setup.sh --pinned" \
    "# Last generated: $(date -u +%Y-%m-%d)"; cat constraints.txt; } >constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pinned packages"
