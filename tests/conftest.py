"""Run Triton kernels under the interpreter unless a CUDA device is used natively.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at
collection start. `PSB_FAST_NATIVE_GPU=1` (benchmarks/gpu_check.sh) keeps kernels native.
"""

import os

if os.environ.get("PSB_FAST_NATIVE_GPU") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
