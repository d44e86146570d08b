#!/usr/bin/env bash
# Installs what llmfast needs into the current Python and builds the extension in place.
# Idempotent: already-installed packages are kept and an up-to-date build is not redone.
#   torch 2.14.1 (CUDA 13.0 build: runs on the CPU too and lets the CUDA kernels compile here)
#   triton 3.8.0 (its interpreter runs the Triton kernels on the CPU), ninja, pytest, and
#   expecttest (torch.testing._internal needs it: tests/test_torch_samples.py feeds torch's own
#   test inputs to llmfast).
# Env: LLMFAST_TORCH (default torch==2.14.1), LLMFAST_NO_CUDA=1 (CPU kernels only),
#      LLMFAST_CUDA_ARCHS (default "80;90a"), MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_install=0
"$PY" - <<'PYEOF' || need_install=1
import importlib, os, sys
for mod in ("torch", "triton", "ninja", "pytest", "pytest_benchmark", "matplotlib", "numpy", "expecttest"):
    importlib.import_module(mod)
import torch
# A CPU-only torch cannot compile the CUDA kernels: replace it unless asked for a CPU build.
sys.exit(0 if torch.version.cuda or os.environ.get("LLMFAST_NO_CUDA") == "1" else 1)
PYEOF
if [ "$need_install" = 1 ]; then
  "$PY" -m pip install --quiet "${LLMFAST_TORCH:-torch==2.14.1}" "triton==3.8.0" ninja pytest pytest-benchmark matplotlib numpy \
    expecttest
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$PY" setup.py build_ext --inplace 2>&1 | grep -v -E "^(copying|creating|running|\[[0-9]+/[0-9]+\] )" || true
"$PY" -c "import llmfast, llmfast._C as C; print('llmfast built:', 'CUDA+CPU' if C.built_with_cuda() else 'CPU only', 'kernels; backends here:', llmfast.available_backends())"
