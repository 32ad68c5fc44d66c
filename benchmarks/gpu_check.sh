#!/usr/bin/env bash
# Native CUDA check of the Triton kernels, the CUDA-graph sampler and the GPU part of the benchmark
# suite (no interpreter), in under 5 minutes, installing nothing:
#   1. the kernel tests, natively (PSB_FAST_NATIVE_GPU=1 keeps tests/conftest.py off the interpreter);
#   2. the suite's GPU parts (kernels over sizes / dtypes / backends, sampler throughput with and
#      without CUDA graphs, training throughput), with NVML telemetry when nvidia-ml-py is installed,
#      written to OUT_DIR (results.json, PNG plots) and printed as tables.
# Every stage runs even if an earlier one fails; the exit status is non-zero if any failed.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default benchmarks/results/gpu; logs go to a
# temporary folder, printed at the end). The quality part is device-independent and left out.
set -euo pipefail
cd "$(dirname "$0")/.."

TEST_LIMIT_S=100   # seconds per stage; 100 + 180 stays under 5 minutes
SUITE_LIMIT_S=180
OUT_DIR=${1:-benchmarks/results/gpu}

export PSB_FAST_NATIVE_GPU=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
logs=$(mktemp -d)
failed=()

python -c "import torch; assert torch.cuda.is_available(), 'gpu_check.sh: no CUDA device'"

# run NAME LIMIT_S CMD...: run CMD under a time limit, log to $logs/NAME.log, record a failure.
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    if timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"; then
        :
    else
        failed+=("$name (exit $?)")
    fi
}

tests=()
for f in tests/test_bridge_sample.py tests/test_step.py tests/test_noise.py tests/test_cuda_graph.py; do
    if [[ -f $f ]]; then tests+=("$f"); else echo "(skipped: $f not found)"; fi
done
run tests "$TEST_LIMIT_S" python -m pytest "${tests[@]}" -q

run suite "$SUITE_LIMIT_S" python -m psb_fast.benchmarks.suite --quick --device cuda \
    --parts kernels sampler training --out "$OUT_DIR"

echo "results: $OUT_DIR/results.json; logs: $logs"
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "gpu_check: all stages passed"
