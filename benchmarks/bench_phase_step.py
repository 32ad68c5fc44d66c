"""phase_step / phase_hop benchmarks (docs/math.md §7, §8, §12): fused backends against the reference.

pytest-benchmark suite (triton cases need CUDA):

    python -m pytest benchmarks/bench_phase_step.py --benchmark-only

Script, side by side in one process, medians of interleaved runs (cpu: reference vs cpu,
B=256 x [3, 32, 32] float32, q = 3; cuda: triton vs eager / compiled reference formulation):

    python benchmarks/bench_phase_step.py --device cpu
    python benchmarks/bench_phase_step.py --device cuda

Roofline: a multistep update with q history terms must read x, v and the q F's and write x, v:
(4 + q) x itemsize bytes per element of x; the hop reads x, v, F and writes x1_hat: 4 x itemsize.
Achieved GB/s is reported against the measured copy bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
from psb_fast.ops.phase_step import phase_hop, phase_step

CPU_SHAPE = (256, 3, 32, 32)
CUDA_SHAPES = ((2048, 4, 32, 32), (8192, 4, 32, 32))  # 8.4M and 33.6M elements of x
H = 0.0123
CX = (2.1e-3, -1.3e-3, 0.6e-3, -0.2e-3)
CV = (0.31, -0.17, 0.08, -0.03)
ORDER2 = 3  # history terms of an order-2 multistep update


def step_bytes(x_numel: int, itemsize: int, q: int) -> int:
    """Bytes phase_step must move: read x, v, q F's; write x, v."""
    return (4 + q) * x_numel * itemsize


def make_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: str, q: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """m = [x | v] for x of `shape` and q model outputs, all N(0, 1)."""
    m = torch.randn((shape[0], 2 * shape[1], *shape[2:]), device=device).to(dtype)
    return m, [torch.randn(shape, device=device).to(dtype) for _ in range(q)]


def reference_formulation(
    m: torch.Tensor, F_hist: Sequence[torch.Tensor], h: float, Cx: Sequence[float], Cv: Sequence[float]
) -> None:
    """reference.phase_step.phase_step's operations (float32 math) written back into m: what eager
    PyTorch runs op by op and what torch.compile gets to fuse."""
    C = m.shape[1] // 2
    x, v = m[:, :C], m[:, C:]
    x_new = x.float() + h * v.float()
    v_new = v.float()
    for cx, cv, F in zip(Cx, Cv, F_hist, strict=True):
        x_new = x_new + cx * F.float()
        v_new = v_new + cv * F.float()
    x.copy_(x_new)
    v.copy_(v_new)


def suite_case(
    numel: int, dtype: torch.dtype, device: str, ours: str, compiled: Callable | None
) -> KernelCase:
    """The suite's sweep case: an order-2 update (q = 3 history terms) of m = [x | v], x of
    sweep_shape(numel), in place; `compiled` is torch.compile of reference_formulation or None."""
    q = ORDER2
    m, F_hist = make_inputs(sweep_shape(numel), dtype, device, q)
    args = (F_hist, H, CX[:q], CV[:q])
    fns = {
        backend: (lambda backend=backend: phase_step(m, *args, backend=backend))
        for backend in ("float64", ours)
    }
    return KernelCase(fns, None if compiled is None else (lambda: compiled(m, *args)),
                      step_bytes(numel, m.element_size(), q))


# ---------------------------------------------------------------- pytest-benchmark suite

PARAMS = {
    "backend": {"float64": "float64", "cpu": "cpu", "triton": "triton"},
    "q": {"1": 1, str(ORDER2): ORDER2},
    "dtype": {"float32": torch.float32, "bfloat16": torch.bfloat16},
    "shape": {"toy-2d": (4096, 2), "cifar": CPU_SHAPE, "8M": CUDA_SHAPES[0]},
}


def pytest_generate_tests(metafunc) -> None:
    """The cases below (triton and the 8M-element shape with CUDA only), without importing pytest."""
    parametrize_benchmark(metafunc, PARAMS, cuda_shapes=CUDA_SHAPES[:1])


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" else "cpu"


def test_phase_step(benchmark, backend: str, q: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    device = _device(backend)
    m, F_hist = make_inputs(shape, dtype, device, q)
    sync = synchronizer(device)

    def run() -> None:
        phase_step(m, F_hist, H, CX[:q], CV[:q], backend=backend)
        sync()

    benchmark.extra_info["bytes"] = step_bytes(F_hist[0].numel(), m.element_size(), q)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


def test_phase_hop(benchmark, backend: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    device = _device(backend)
    bridge = PhaseBridge()
    m, (F,) = make_inputs(shape, dtype, device, 1)
    sync = synchronizer(device)

    def run() -> None:
        phase_hop(bridge, m, F, 0.9, backend=backend)
        sync()

    benchmark.extra_info["bytes"] = 4 * F.numel() * F.element_size()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


# ---------------------------------------------------------------- script


def bench_cpu(reps: int, warmup: int) -> None:
    """float64 vs cpu backend for phase_step at B=256 x [3, 32, 32] float32, order 2 (q = 3)."""
    q = ORDER2
    m, F_hist = make_inputs(CPU_SHAPE, torch.float32, "cpu", q)
    fns = {
        backend: (lambda backend=backend: phase_step(m, F_hist, H, CX[:q], CV[:q], backend=backend))
        for backend in ("float64", "cpu")
    }
    medians = interleaved_medians(fns, warmup=warmup, reps=reps)
    copy_bw = copy_bandwidth("cpu", nbytes=1 << 28)
    numel = F_hist[0].numel()
    print(
        f"phase_step on cpu: x {list(CPU_SHAPE)} float32 ({numel:,} elements), q = {q} history terms, "
        f"{torch.get_num_threads()} torch threads, median of {reps} interleaved runs"
    )
    for name, seconds in medians.items():
        print(f"  {name:9s} {seconds * 1e3:8.2f} ms")
    print(f"  speedup reference / cpu: {medians['reference'] / medians['cpu']:.1f}x")
    print(f"  copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write)")
    print(TABLE_HEADER)
    for name, seconds in medians.items():
        print(format_row(f"phase_step q={q}", name, torch.float32, numel, seconds,
                         step_bytes(numel, 4, q), copy_bw))


def cuda_step_rows(
    compiled: Callable, shape: tuple[int, ...], dtype: torch.dtype, q: int,
    reps: int, warmup: int, copy_bw: float,
) -> list[str]:
    """Table rows for phase_step with q terms at one (shape, dtype) on CUDA."""
    m, F_hist = make_inputs(shape, dtype, "cuda", q)
    args = (F_hist, H, CX[:q], CV[:q])
    fns: dict[str, Callable[[], object]] = {
        "triton": lambda: phase_step(m, *args, backend="triton"),
        "eager reference formulation": lambda: reference_formulation(m, *args),
    }
    try:
        compiled(m, *args)
        fns["compiled reference formulation"] = lambda: compiled(m, *args)
    except Exception as err:  # report and go on: a broken torch.compile is not this kernel's failure
        print(f"torch.compile failed for {list(shape)} {dtype}: {type(err).__name__}: {err}")
    medians = interleaved_medians(fns, warmup=warmup, reps=reps, sync=synchronizer("cuda"), inner=5)
    numel = F_hist[0].numel()
    nbytes = step_bytes(numel, m.element_size(), q)
    op = f"phase_step q={q}"
    return [format_row(op, name, dtype, numel, s, nbytes, copy_bw) for name, s in medians.items()]


def cuda_hop_rows(
    shape: tuple[int, ...], dtype: torch.dtype, reps: int, warmup: int, copy_bw: float
) -> list[str]:
    """Table rows for phase_hop (triton vs the float64 reference) on CUDA."""
    bridge = PhaseBridge()
    m, (F,) = make_inputs(shape, dtype, "cuda", 1)
    fns = {
        backend: (lambda backend=backend: phase_hop(bridge, m, F, 0.9, backend=backend))
        for backend in ("triton", "float64")
    }
    medians = interleaved_medians(fns, warmup=warmup, reps=reps, sync=synchronizer("cuda"), inner=5)
    nbytes = 4 * F.numel() * F.element_size()
    numel = F.numel()
    return [format_row("phase_hop", name, dtype, numel, s, nbytes, copy_bw) for name, s in medians.items()]


def bench_cuda(reps: int, warmup: int) -> None:
    """triton vs eager vs torch.compile of the reference formulation, >= 8M elements."""
    copy_bw = copy_bandwidth("cuda")
    compiled = torch.compile(reference_formulation, dynamic=False)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in CUDA_SHAPES:
            for q in (1, ORDER2):
                rows += cuda_step_rows(compiled, shape, dtype, q, reps, warmup, copy_bw)
            rows += cuda_hop_rows(shape, dtype, reps, warmup, copy_bw)
    print_cuda_table(copy_bw, rows)


if __name__ == "__main__":
    run_cli(__doc__, bench_cpu, bench_cuda, cpu_reps=15)
