#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one JSON under bench/results/, non-zero exit if any criterion
# fails (NaN/inf in float16, out of memory under the T4 cap). About 5 minutes on one H100/H200.
#   bash bench/gpu_check.sh                  # CUDA
#   bash bench/gpu_check.sh --device cpu --tiny   # smoke test anywhere
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"   # some GPU images have python3 only
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
exec timeout 480 "$PYTHON" bench/gpu_check.py "$@"
