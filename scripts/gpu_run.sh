#!/usr/bin/env bash
# Everything one session does on a lent GPU machine, in one call: build the extension, run the
# whole test suite on the GPU, run the benchmark report, and (optionally) the CMake build.
# Logs and results go under $OUT (the device tool brings them back); benchmark results are
# also packed into $OUT/results.tgz to be committed under benchmarks/results/.
#   usage: bash scripts/gpu_run.sh [--no-tests] [--no-bench] [--cmake] [-k PYTEST_EXPR]
#                                  [--deadline SECONDS] [--shards N] [--profile] [bench ops...]
# The build is skipped when the in-place extension was built from the same sources (a warm
# machine keeps it between calls). The test files run in parallel shards (Triton compiles on the
# CPU; the GPU work of the tests is small). --deadline bounds the whole script so that the logs
# and results still come back inside the device tool's per-call limit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/llmfast_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
run_tests=1; run_bench=1; run_cmake=0; run_profile=0; kexpr=""; ops=(); deadline=570; shards=8
t0=$(date +%s)
left() { echo $(( deadline - ($(date +%s) - t0) )); }
while [ $# -gt 0 ]; do
  case "$1" in
    --no-tests) run_tests=0 ;; --no-bench) run_bench=0 ;; --cmake) run_cmake=1 ;;
    -k) kexpr="$2"; shift ;;
    --deadline) deadline="$2"; shift ;;
    --shards) shards="$2"; shift ;;
    --profile) run_profile=1 ;;
    *) ops+=("$1") ;;
  esac
  shift
done

# Wheels carried in .whl/ (e.g. Liger-Kernel, a benchmark peer).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export LLMFAST_CUDA_ARCHS=${LLMFAST_CUDA_ARCHS:-90a}
export MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

start=$(date +%s)
stamp=$(cat setup.py CMakeLists.txt $(find csrc -type f | sort) | sha1sum | cut -c1-16)
if [ -f build/.llmfast_stamp ] && [ "$(cat build/.llmfast_stamp)" = "$stamp" ] && ls llmfast/_C*.so >/dev/null 2>&1; then
  echo "build: reused (sources unchanged)"
else
  python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
  mkdir -p build && echo "$stamp" > build/.llmfast_stamp
  grep -E "warning|spill" "$OUT/build.log" | head -20
  echo "build: $(( $(date +%s) - start )) s"
fi

if [ "$run_cmake" = 1 ]; then
  # Full CMake build with the CUDA kernels, in the background while the tests run.
  ( cmake -S . -B /tmp/cmake-build -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')" \
      -DLLMFAST_CUDA_ARCHS=90a > "$OUT/cmake.log" 2>&1 \
    && cmake --build /tmp/cmake-build -j 8 >> "$OUT/cmake.log" 2>&1 \
    && echo "CMAKE BUILD OK" >> "$OUT/cmake.log" || echo "CMAKE BUILD FAILED" >> "$OUT/cmake.log" ) &
  cmake_pid=$!
fi

if [ "$run_tests" = 1 ]; then
  start=$(date +%s)
  # The emulated-CUDA tests (for machines without a GPU) are left out: here the real kernels run.
  # Tile tuning (llmfast/triton/_tuning.py) would compile every candidate for each large test
  # problem; the tests check the default tiles, tests/test_triton_tuning.py every candidate and
  # one real tuning run. The benchmark below tunes.
  export LLMFAST_TRITON_AUTOTUNE=0
  # Every fast Triton launch (llmfast/triton/_launch.py) also checked against Triton's own pick.
  export LLMFAST_TRITON_FAST_LAUNCH=check
  budget=$(( $(left) - 20 )); [ "$run_bench" = 1 ] && budget=$(( budget / 2 ))
  kargs=(); [ -n "$kexpr" ] && kargs=(-k "$kexpr")
  # LLMFAST_TEST_SHARD (tests/conftest.py) deals the collected tests out to $shards processes.
  files=$(ls tests/test_*.py | grep -v cuda_emulation)
  pids=()
  for ((i = 0; i < shards; i++)); do
    # shellcheck disable=SC2086
    LLMFAST_TEST_SHARD="$i/$shards" timeout "$budget" python3 -m pytest $files -v --tb=short -rf -p no:cacheprovider --durations=15 \
      "${kargs[@]}" > "$OUT/tests_$i.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; rc=$?
    echo "tests shard $i/$shards: exit $rc$([ $rc = 124 ] && echo ' TIMED OUT')$([ $rc -gt 128 ] && [ $rc != 137 ] && echo ' CRASHED')"
    tail -1 "$OUT/tests_$i.log"
  done
  cat "$OUT"/tests_*.log > "$OUT/tests.log"; rm -f "$OUT"/tests_*.log
  grep -B2 -A12 "Fatal Python error" "$OUT/tests.log" | grep -E "Fatal|tests/|llmfast/" | head -20
  echo "tests: $(( $(date +%s) - start )) s"
  grep -E "^(FAILED|ERROR)|(FAILED|ERROR) +\[" "$OUT/tests.log" | sort -u | head -60
fi

if [ "$run_profile" = 1 ]; then
  LLMFAST_TRITON_FAST_LAUNCH=1 timeout 120 python3 scripts/profile_host_overhead.py > "$OUT/host_overhead.txt" 2>&1
  tail -40 "$OUT/host_overhead.txt"
fi

if [ "$run_bench" = 1 ]; then
  export LLMFAST_TRITON_AUTOTUNE=1 LLMFAST_TRITON_FAST_LAUNCH=1
  start=$(date +%s)
  timeout $(( $(left) - 15 )) python3 -m llmfast.bench "${ops[@]}" --out benchmarks/results > "$OUT/bench.log" 2>&1
  rc=$?; echo "bench: exit $rc$([ $rc = 124 ] && echo ' TIMED OUT') in $(( $(date +%s) - start )) s"
  tar czf "$OUT/results.tgz" benchmarks/results
  tail -80 "$OUT/bench.log"
fi

if [ "$run_cmake" = 1 ]; then
  wait "$cmake_pid"
  tail -3 "$OUT/cmake.log"
fi
