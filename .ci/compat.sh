#!/usr/bin/env bash
# Run the patching / recording tests (the cheap selection tests, and the evaluator's batching tests)
# under another transformers version, in a throw-away venv layered on $PYTHON's environment: it
# sees that environment's packages (torch included, never reinstalled) behind its own, and installs
# only transformers and what that version needs differently (tokenizers, huggingface-hub):
#
#   .ci/compat.sh 4.46.*        # oldest supported
#   .ci/compat.sh 4.57.*        # newest 4.x
#   .ci/compat.sh 5.0.0         # any 5.x
#
# The venv lives in ${COMPAT_VENV_ROOT:-/tmp}/bh-routing-tf-<version> and is reused by later runs
# (delete it to start afresh; CI gives each run a new root). Extra arguments go to pytest.
set -euo pipefail

VERSION="${1:?usage: .ci/compat.sh TRANSFORMERS_VERSION [pytest args] (e.g. 4.46.* or 4.57.*)}"
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${COMPAT_VENV_ROOT:-/tmp}/bh-routing-tf-${VERSION//[^0-9A-Za-z.]/_}"

start=$(date +%s)
TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  # the calling environment's site-packages, after the venv's own (a .pth line is appended to sys.path)
  "$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("purelib"))' \
    >"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/calling-env.pth"
fi
# torch pinned to the version already there, so pip never replaces it
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "transformers==$VERSION" "torch==$TORCH_VERSION" \
  pytest 2>&1 | grep -v -e "^WARNING: Location" -e "outside environment" -e "dependency conflicts" \
  -e "pip's dependency resolver" -e "requires .* but you have" || true
# A failed install must not go unnoticed.
"$VENV/bin/python" - "$VERSION" <<'PY'
import fnmatch, sys, transformers
if not fnmatch.fnmatch(transformers.__version__, sys.argv[1]):
    sys.exit(f"compat: wanted transformers {sys.argv[1]}, the venv has {transformers.__version__}")
PY

TESTS=(tests/test_patching.py tests/test_recording.py tests/test_families.py tests/test_family_llama4.py)
for cheap in tests/test_selection.py tests/test_pvalues.py; do
  [ -f "$ROOT/$cheap" ] && TESTS+=("$cheap")
done
# The evaluator's batching: padding, and the packed rows of shared prefixes (a custom 4-D attention
# mask, which each transformers version handles in its own masking code).
TESTS+=("tests/test_evaluation.py::test_batched_per_token_logprobs_equal_unbatched"
        "tests/test_evaluation.py::test_padding_side_batch_composition_and_prefix_sharing_do_not_change_scores"
        "tests/test_evaluation.py::test_routing_statistics_exclude_padding")

cd "$ROOT"
echo "compat: transformers $("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)')," \
     "torch $TORCH_VERSION, venv $VENV (setup $(( $(date +%s) - start ))s)"
set +e
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@"
status=$?
echo "compat: transformers $VERSION finished in $(( $(date +%s) - start ))s (exit $status)"
exit $status
