"""sde_step benchmarks (docs/math.md §9, §12): the fused affine + 2x2 noise update against the reference.

pytest-benchmark suite (triton cases need CUDA):

    python -m pytest benchmarks/bench_sde_step.py --benchmark-only

Script, side by side in one process, medians of interleaved runs:

    python benchmarks/bench_sde_step.py --device cpu    # reference vs cpu, B=256 x [3, 32, 32] float32
    python benchmarks/bench_sde_step.py --device cuda   # triton vs eager / compiled reference formulation

Roofline: with the noise drawn in the kernel, a step with a model output must read x, v, F and
write x, v: 5 x itemsize bytes per element of x (the SSCS half step, without F: 4 x itemsize).
Achieved GB/s is reported against the measured copy bandwidth.
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
from psb_fast.multistep import multistep_coefficients
from psb_fast.ops.sde_step import noise_cholesky, sde_step, transition_covariance

CPU_SHAPE = (256, 3, 32, 32)
CUDA_SHAPES = ((2048, 4, 32, 32), (8192, 4, 32, 32))  # 8.4M and 33.6M elements of x
KINDS = ("exact", "em", "sscs_half")
T, H = 0.3, 0.05


def step_bytes(kind: str, x_numel: int, itemsize: int) -> int:
    """Bytes an SDE step must move: read x, v (and F); write x, v."""
    return (4 if kind == "sscs_half" else 5) * x_numel * itemsize


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """m = [x | v] for x of `shape`, and a model output F, all N(0, 1)."""
    m = torch.randn((shape[0], 2 * shape[1], *shape[2:]), device=device).to(dtype)
    return m, torch.randn(shape, device=device).to(dtype)


def exact_coefficients(bridge: PhaseBridge, t: float, h: float) -> dict[str, float]:
    """cx, cv of the exact step over [t, t + h] (what a sampler caches per grid)."""
    co = multistep_coefficients(bridge, torch.tensor([t, t + h], dtype=torch.float64), order=0)
    return dict(cx=co.Cx[0, 0].item(), cv=co.Cv[0, 0].item())


def step_fn(
    kind: str, bridge: PhaseBridge, m: torch.Tensor, F: torch.Tensor, backend: str
) -> Callable[[], object]:
    """One seeded sde_step of `kind` (exact-step coefficients precomputed)."""
    extra = exact_coefficients(bridge, T, H) if kind == "exact" else {}
    F_arg = None if kind == "sscs_half" else F
    return lambda: sde_step(kind, m, F_arg, bridge, T, H, seed=0, backend=backend, **extra)


def reference_formulation(
    m: torch.Tensor, F: torch.Tensor, h: float, cx: float, cv: float, chol: tuple[float, float, float]
) -> None:
    """reference.sde_step.exact_noise_step's operations (float32 math, torch.randn noise) written
    back into m: what eager PyTorch runs op by op and what torch.compile gets to fuse."""
    C = m.shape[1] // 2
    x, v = m[:, :C], m[:, C:]
    lxx, lxv, lvv = chol
    xi_x = torch.randn(x.shape, device=m.device)
    xi_v = torch.randn(x.shape, device=m.device)
    x_new = x.float() + h * v.float() + cx * F.float() + lxx * xi_x
    v_new = v.float() + cv * F.float() + lxv * xi_x + lvv * xi_v
    x.copy_(x_new)
    v.copy_(v_new)


def suite_case(
    numel: int, dtype: torch.dtype, device: str, ours: str, compiled: Callable | None
) -> KernelCase:
    """The suite's sweep case: the exact-noise step of m = [x | v], x of sweep_shape(numel), in
    place; `compiled` is torch.compile of reference_formulation (torch.randn noise) or None."""
    bridge = PhaseBridge(mode="SDE")
    m, F = make_inputs(sweep_shape(numel), dtype, device)
    fns = {backend: step_fn("exact", bridge, m, F, backend) for backend in ("float64", ours)}
    exact = exact_coefficients(bridge, T, H)
    args = (F, H, exact["cx"], exact["cv"], noise_cholesky(transition_covariance(bridge.p, T, H)))
    return KernelCase(fns, None if compiled is None else (lambda: compiled(m, *args)),
                      step_bytes("exact", numel, m.element_size()))


# ---------------------------------------------------------------- pytest-benchmark suite

PARAMS = {
    "backend": {"float64": "float64", "cpu": "cpu", "triton": "triton"},
    "kind": {kind: kind for kind in KINDS},
    "dtype": {"float32": torch.float32, "bfloat16": torch.bfloat16},
    "shape": {"toy-2d": (4096, 2), "cifar": CPU_SHAPE, "8M": CUDA_SHAPES[0]},
}


def pytest_generate_tests(metafunc) -> None:
    """The cases below (triton and the 8M-element shape with CUDA only), without importing pytest."""
    parametrize_benchmark(metafunc, PARAMS, cuda_shapes=CUDA_SHAPES[:1])


def test_sde_step(benchmark, backend: str, kind: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    device = "cuda" if backend == "triton" else "cpu"
    m, F = make_inputs(shape, dtype, device)
    step = step_fn(kind, PhaseBridge(mode="SDE"), m, F, backend)
    sync = synchronizer(device)

    def run() -> None:
        step()
        sync()

    benchmark.extra_info["bytes"] = step_bytes(kind, F.numel(), F.element_size())
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


# ---------------------------------------------------------------- script


def bench_cpu(reps: int, warmup: int) -> None:
    """reference vs cpu backend for each kind at B=256 x [3, 32, 32] float32."""
    bridge = PhaseBridge(mode="SDE")
    m, F = make_inputs(CPU_SHAPE, torch.float32, "cpu")
    fns = {
        f"{kind} {backend}": step_fn(kind, bridge, m, F, backend)
        for kind in KINDS
        for backend in ("float64", "cpu")
    }
    medians = interleaved_medians(fns, warmup=warmup, reps=reps)
    copy_bw = copy_bandwidth("cpu", nbytes=1 << 28)
    numel = F.numel()
    print(
        f"sde_step on cpu: x {list(CPU_SHAPE)} float32 ({numel:,} elements), seeded noise, "
        f"{torch.get_num_threads()} torch threads, median of {reps} interleaved runs"
    )
    for kind in KINDS:
        ref_s, cpu_s = medians[f"{kind} reference"], medians[f"{kind} cpu"]
        print(f"  {kind:9s} reference {ref_s * 1e3:8.2f} ms   cpu {cpu_s * 1e3:8.2f} ms   "
              f"speedup {ref_s / cpu_s:.1f}x")
    print(f"  copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write)")
    print(TABLE_HEADER)
    for name, seconds in medians.items():
        kind, backend = name.split()
        print(format_row(f"sde_step {kind}", backend, torch.float32, numel, seconds,
                         step_bytes(kind, numel, 4), copy_bw))


def cuda_rows(
    bridge: PhaseBridge, compiled: Callable, shape: tuple[int, ...], dtype: torch.dtype,
    reps: int, warmup: int, copy_bw: float,
) -> list[str]:
    """Table rows for one (shape, dtype) on CUDA: every kind in triton, and the exact step's
    eager and compiled reference formulations."""
    m, F = make_inputs(shape, dtype, "cuda")
    fns: dict[str, Callable[[], object]] = {
        f"{kind} triton": step_fn(kind, bridge, m, F, "triton") for kind in KINDS
    }
    exact = exact_coefficients(bridge, T, H)
    args = (F, H, exact["cx"], exact["cv"], noise_cholesky(transition_covariance(bridge.p, T, H)))
    fns["exact eager reference formulation"] = lambda: reference_formulation(m, *args)
    try:
        compiled(m, *args)
        fns["exact compiled reference formulation"] = lambda: compiled(m, *args)
    except Exception as err:  # report and go on: a broken torch.compile is not this kernel's failure
        print(f"torch.compile failed for {list(shape)} {dtype}: {type(err).__name__}: {err}")
    medians = interleaved_medians(fns, warmup=warmup, reps=reps, sync=synchronizer("cuda"), inner=5)
    rows = []
    for name, seconds in medians.items():
        kind, impl = name.split(" ", 1)
        nbytes = step_bytes(kind, F.numel(), F.element_size())
        rows.append(format_row(f"sde_step {kind}", impl, dtype, F.numel(), seconds, nbytes, copy_bw))
    return rows


def bench_cuda(reps: int, warmup: int) -> None:
    """triton vs eager vs torch.compile of the reference formulation, >= 8M elements."""
    bridge = PhaseBridge(mode="SDE")
    copy_bw = copy_bandwidth("cuda")
    compiled = torch.compile(reference_formulation, dynamic=False)
    rows = [
        row
        for dtype in (torch.float32, torch.bfloat16)
        for shape in CUDA_SHAPES
        for row in cuda_rows(bridge, compiled, shape, dtype, reps, warmup, copy_bw)
    ]
    print_cuda_table(copy_bw, rows)


if __name__ == "__main__":
    run_cli(__doc__, bench_cpu, bench_cuda, cpu_reps=9)
