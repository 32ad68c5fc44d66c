#!/usr/bin/env bash
# Native CUDA check of the Triton kernels in one run of under 5 minutes, installing nothing:
#   1. tests (stage limit TEST_LIMIT_S), natively: PSB_FAST_NATIVE_GPU=1 keeps tests/conftest.py off
#      the interpreter. tests/test_kernels_native.py (every kernel wrapper branch on every tile shape
#      and storage dtype against float64 math; the Philox stream's golden values, the same numbers
#      as under the interpreter), tests/test_bridge_sample.py (the fused data path against the
#      reference, noise statistics, chunking) and tests/test_cuda_graph.py (capture and replay).
#      tests/test_phase_step.py and tests/test_sde_step.py run their "triton" cases on CPU tensors
#      (interpreter only) and are left to CI; tests/test_kernel_compile.py needs no GPU (CI compiles
#      every configuration for sm_80 / sm_90 there).
#   2. the benchmark suite's kernel and training parts (stage limit SUITE_LIMIT_S): the roofline
#      (achieved GB/s of bridge_sample, phase_step and the exact SDE step vs the measured device copy
#      bandwidth, against eager and torch.compile'd reference formulations) and optimizer steps/s
#      with the fused vs the reference data path, with NVML telemetry if nvidia-ml-py is installed.
# Writes OUT_DIR/results.json (the suite), OUT_DIR/tests.xml (JUnit) and OUT_DIR/gpu_check.json
# (device, versions, per stage: status, seconds, test counts and failed test ids). Every stage runs
# even if an earlier one fails; the exit status is non-zero if any failed.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default benchmarks/results/gpu; logs: OUT_DIR/logs)
set -euo pipefail
cd "$(dirname "$0")/.."

TEST_LIMIT_S=${TEST_LIMIT_S:-110}   # first use of each kernel configuration JIT-compiles it (~0.5 s)
SUITE_LIMIT_S=${SUITE_LIMIT_S:-170}  # 110 + 170 + start-up stays under 5 minutes
OUT_DIR=${1:-benchmarks/results/gpu}
PARTS=${GPU_CHECK_PARTS:-kernels training}

export PSB_FAST_NATIVE_GPU=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
mkdir -p "$OUT_DIR/logs"
stages_json="$OUT_DIR/logs/stages.jsonl"
: >"$stages_json"
failed=()

python -c "import torch; assert torch.cuda.is_available(), 'gpu_check.sh: no CUDA device'"

# run NAME LIMIT_S CMD...: run CMD under a time limit, log to OUT_DIR/logs/NAME.log, record the stage.
run() {
    local name=$1 limit=$2 start status=0
    shift 2
    echo "== $name (limit ${limit}s): $*"
    start=$(date +%s%N)
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/logs/$name.log" || status=${PIPESTATUS[0]}
    if ((status != 0)); then failed+=("$name (exit $status)"); fi
    printf '{"stage": "%s", "exit": %d, "milliseconds": %d, "limit_s": %d}\n' \
        "$name" "$status" "$((($(date +%s%N) - start) / 1000000))" "$limit" >>"$stages_json"
}

tests=()
for f in tests/test_kernels_native.py tests/test_bridge_sample.py tests/test_cuda_graph.py; do
    if [[ -f $f ]]; then tests+=("$f"); else echo "(skipped: $f not found)"; fi
done
run tests "$TEST_LIMIT_S" python -m pytest "${tests[@]}" -q -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml"

# shellcheck disable=SC2086  # PARTS is a list of words
run suite "$SUITE_LIMIT_S" python -m psb_fast.benchmarks.suite --quick --device cuda --parts $PARTS \
    --out "$OUT_DIR"

python - "$OUT_DIR" <<'EOF'
import json, platform, sys, xml.etree.ElementTree as ET
from pathlib import Path

import torch

out = Path(sys.argv[1])
stages = [json.loads(line) for line in (out / "logs" / "stages.jsonl").read_text().splitlines() if line]
for stage in stages:
    stage["status"] = "ok" if stage["exit"] == 0 else ("timeout" if stage["exit"] == 124 else "failed")
    stage["seconds"] = round(stage.pop("milliseconds") / 1000, 1)
tests = next((s for s in stages if s["stage"] == "tests"), None)
junit = out / "tests.xml"
if tests is not None and junit.exists():
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in ET.parse(junit).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    tests.update(counts, failed=failed)
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
report = {
    "device": torch.cuda.get_device_name(0),
    "capability": list(torch.cuda.get_device_capability(0)),
    "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
    "python": platform.python_version(),
    "stages": stages,
    "suite_results": str(out / "results.json"),
}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
print(f"wrote {out / 'gpu_check.json'}")
EOF

echo "results: $OUT_DIR/gpu_check.json, $OUT_DIR/results.json; logs: $OUT_DIR/logs"
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "gpu_check: all stages passed"
