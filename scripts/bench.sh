#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the benchmark report on whatever device is here:
# every llmfast backend against torch eager, torch.compile and Liger-Kernel (if installed).
# Results (JSON, PNG charts, a markdown summary) go to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m llmfast.bench "$@"
