"""bridge_sample benchmarks (docs/math.md §5.1, §12): fused backends against the plain-PyTorch reference.

pytest-benchmark suite (triton cases need CUDA):

    python -m pytest benchmarks/bench_bridge_sample.py --benchmark-only

Script, side by side in one process, medians of interleaved runs (cpu: reference vs cpu,
B=256 x [3, 32, 32] float32; cuda: triton vs eager / compiled reference, >= 8M elements):

    python benchmarks/bench_bridge_sample.py --device cpu
    python benchmarks/bench_bridge_sample.py --device cuda

Roofline: bridge_sample must read x1 and write x_t, v_t and label, 4 x itemsize bytes per
element of x1 (16 B in float32); achieved GB/s is reported against the measured copy bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from psb_fast.benchmarks._timing import (
    TABLE_HEADER,
    KernelCase,
    copy_bandwidth,
    format_row,
    interleaved_medians,
    parametrize_benchmark,
    print_cuda_table,
    run_cli,
    sweep_shape,
    synchronizer,
)
from psb_fast.bridge import PhaseBridge
from psb_fast.kernels.bridge_sample import COEF_FIELDS, bridge_sample_triton
from psb_fast.ops.bridge_sample import bridge_sample

CPU_SHAPE = (256, 3, 32, 32)
CUDA_SHAPES = ((2048, 4, 32, 32), (8192, 4, 32, 32))


def bytes_moved(x1: torch.Tensor) -> int:
    """Bytes bridge_sample must move: read x1, write x_t, v_t, label."""
    return 4 * x1.numel() * x1.element_size()


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x1 ~ N(0, 1) of `shape` and t ~ U[1e-5, 0.999) per row."""
    x1 = torch.randn(shape, device=device).to(dtype)
    t = 1e-5 + (0.999 - 1e-5) * torch.rand(shape[0], device=device, dtype=torch.float64)
    return x1, t


def packed_coefficients(bridge: PhaseBridge, t: torch.Tensor) -> torch.Tensor:
    """[8, B] float64 coefficients in the kernel's COEF_FIELDS order."""
    co = bridge.coefficients(t)
    return torch.stack([getattr(co, field) for field in COEF_FIELDS])


def reference_formulation(x1: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.bridge_sample's math (float64, two randn, cat) on precomputed coefficients: what
    torch.compile gets to fuse."""
    c = coef.reshape((8, -1) + (1,) * (x1.dim() - 1))
    x = x1.double()
    eps_x, eps_v = torch.randn_like(x), torch.randn_like(x)
    x_t = c[0] * x + c[2] * eps_x
    v_t = c[1] * x + c[3] * eps_x + c[4] * eps_v
    label = c[5] * x + c[6] * eps_x + c[7] * eps_v
    return torch.cat([x_t, v_t], dim=1).to(x1.dtype), label.to(x1.dtype)


def suite_case(
    numel: int, dtype: torch.dtype, device: str, ours: str, compiled: Callable | None
) -> KernelCase:
    """The suite's sweep case: x1 of sweep_shape(numel); "float64" and `ours` run the public op
    (coefficients included); `compiled` (torch.compile of reference_formulation, or None) runs on
    precomputed coefficients."""
    bridge = PhaseBridge()
    x1, t = make_inputs(sweep_shape(numel), dtype, device)
    coef = packed_coefficients(bridge, t)
    fns = {
        backend: (lambda backend=backend: bridge_sample(bridge, x1, t, seed=0, backend=backend))
        for backend in ("float64", ours)
    }
    return KernelCase(fns, None if compiled is None else (lambda: compiled(x1, coef)), bytes_moved(x1))


# ---------------------------------------------------------------- pytest-benchmark suite

PARAMS = {
    "backend": {"float64": "float64", "cpu": "cpu", "triton": "triton"},
    "dtype": {"float32": torch.float32, "bfloat16": torch.bfloat16},
    "shape": {"toy-2d": (4096, 2), "cifar": CPU_SHAPE, "8M": CUDA_SHAPES[0]},
}


def pytest_generate_tests(metafunc) -> None:
    """The cases below (triton and the 8M-element shape with CUDA only), without importing pytest."""
    parametrize_benchmark(metafunc, PARAMS, cuda_shapes=CUDA_SHAPES[:1])


def test_bridge_sample(benchmark, backend: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    device = "cuda" if backend == "triton" else "cpu"
    bridge = PhaseBridge()
    x1, t = make_inputs(shape, dtype, device)
    sync = synchronizer(device)

    def run() -> None:
        bridge_sample(bridge, x1, t, seed=0, backend=backend)
        sync()

    benchmark.extra_info["bytes"] = bytes_moved(x1)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


# ---------------------------------------------------------------- script


def bench_cpu(reps: int, warmup: int) -> None:
    """reference vs cpu backend at B=256 x [3, 32, 32] float32."""
    bridge = PhaseBridge()
    x1, t = make_inputs(CPU_SHAPE, torch.float32, "cpu")
    fns = {
        backend: (lambda backend=backend: bridge_sample(bridge, x1, t, seed=0, backend=backend))
        for backend in ("float64", "cpu")
    }
    medians = interleaved_medians(fns, warmup=warmup, reps=reps)
    copy_bw = copy_bandwidth("cpu", nbytes=1 << 28)
    print(
        f"bridge_sample on cpu: x1 {list(CPU_SHAPE)} float32 ({x1.numel():,} elements), "
        f"{torch.get_num_threads()} torch threads, median of {reps} interleaved runs"
    )
    for name, seconds in medians.items():
        print(f"  {name:9s} {seconds * 1e3:8.2f} ms")
    print(f"  speedup reference / cpu: {medians['reference'] / medians['cpu']:.1f}x")
    print(f"  copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write)")
    print(TABLE_HEADER)
    for name, seconds in medians.items():
        print(format_row("bridge_sample", name, x1.dtype, x1.numel(), seconds, bytes_moved(x1), copy_bw))


def cuda_case(
    bridge: PhaseBridge, compiled: Callable, shape: tuple[int, ...], dtype: torch.dtype,
    reps: int, warmup: int, copy_bw: float,
) -> list[str]:
    """Table rows for one (shape, dtype) on CUDA."""
    x1, t = make_inputs(shape, dtype, "cuda")
    coef = packed_coefficients(bridge, t)
    fns: dict[str, Callable[[], object]] = {
        "triton (bridge_sample)": lambda: bridge_sample(bridge, x1, t, seed=0, backend="triton"),
        "triton (kernel only)": lambda: bridge_sample_triton(x1, coef, seed=0),
        "eager reference": lambda: bridge_sample(bridge, x1, t, seed=0, backend="float64"),
    }
    try:
        compiled(x1, coef)
        fns["compiled reference (kernel only)"] = lambda: compiled(x1, coef)
    except Exception as err:  # report and go on: a broken torch.compile is not this kernel's failure
        print(f"torch.compile failed for {list(shape)} {dtype}: {type(err).__name__}: {err}")
    medians = interleaved_medians(fns, warmup=warmup, reps=reps, sync=synchronizer("cuda"), inner=5)
    return [
        format_row("bridge_sample", name, dtype, x1.numel(), s, bytes_moved(x1), copy_bw)
        for name, s in medians.items()
    ]


def bench_cuda(reps: int, warmup: int) -> None:
    """triton (end to end and kernel only) vs eager reference vs torch.compile(reference formulation)."""
    bridge = PhaseBridge()
    copy_bw = copy_bandwidth("cuda")
    compiled = torch.compile(reference_formulation, dynamic=False)
    rows = [
        row
        for dtype in (torch.float32, torch.bfloat16)
        for shape in CUDA_SHAPES
        for row in cuda_case(bridge, compiled, shape, dtype, reps, warmup, copy_bw)
    ]
    print_cuda_table(copy_bw, rows)


if __name__ == "__main__":
    run_cli(__doc__, bench_cpu, bench_cuda, cpu_reps=9)
