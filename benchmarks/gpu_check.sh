#!/usr/bin/env bash
# Native CUDA check of the Triton kernels (no interpreter), in under 5 minutes, installing nothing:
#   1. the kernel tests, natively (PSB_FAST_NATIVE_GPU=1 keeps tests/conftest.py off the interpreter);
#   2. the kernel benchmark scripts with --device cuda;
#   3. one table merging every benchmark's rows (benchmarks/_timing.py format).
# Every stage runs even if an earlier one fails; the exit status is non-zero if any failed.
# Usage: bash benchmarks/gpu_check.sh   (from anywhere; logs go to a temporary folder, printed at the end)
set -euo pipefail
cd "$(dirname "$0")/.."

TEST_LIMIT_S=110   # seconds per stage; 110 + 120 + 2 x 30 stays under 5 minutes
BRIDGE_LIMIT_S=120
OTHER_LIMIT_S=30

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
for f in tests/test_bridge_sample.py tests/test_step.py tests/test_noise.py; do
    if [[ -f $f ]]; then tests+=("$f"); else echo "(skipped: $f not found)"; fi
done
run tests "$TEST_LIMIT_S" python -m pytest "${tests[@]}" -q

run bench_bridge "$BRIDGE_LIMIT_S" python benchmarks/bench_bridge.py --device cuda
for bench in bench_step bench_noise; do
    if [[ -f benchmarks/$bench.py ]]; then
        run "$bench" "$OTHER_LIMIT_S" python "benchmarks/$bench.py" --device cuda
    fi
done

echo
echo "== kernel benchmarks, $(python -c 'import torch; print(torch.cuda.get_device_name())')"
python -c 'import sys; sys.path.insert(0, "benchmarks"); from _timing import TABLE_HEADER; print(TABLE_HEADER)'
grep -h '^| ' "$logs"/bench_*.log | grep -v -e '^| op |' -e '^|---' || echo "(no benchmark rows)"
echo "logs: $logs"

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "gpu_check: all stages passed"
