#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite. On a machine without a GPU the Triton
# kernels run in Triton's interpreter and the CUDA kernels are compiled but not run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest tests -q "$@"
