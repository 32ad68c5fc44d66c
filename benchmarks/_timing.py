"""Shared timing and roofline functions of the kernel benchmarks (docs/math.md §12.3).

    median_time(fn, warmup, reps, sync)   median seconds per call
    interleaved_medians(fns, ...)         the same for several callables, run in turn (fair under load)
    copy_bandwidth(device)                measured device copy bandwidth, bytes/s (read + write)
    format_row(...) / TABLE_HEADER        one markdown table row per measurement; the rows of
                                          every benchmark script are merged by gpu_check.sh
    sweep_shape(numel) / KernelCase       the shape and callables of one case of the suite's size sweep
    parametrize_benchmark(metafunc, ...)  the pytest-benchmark parameters of a bench_<op>.py module
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

TABLE_HEADER = (
    "| op | impl | dtype | elements | median (us) | GB/s | of copy BW |\n"
    "|---|---|---|---|---|---|---|"
)


SWEEP_ROW = 1000  # elements per row of x in the suite's size sweep


def sweep_shape(numel: int) -> tuple[int, int]:
    """x's shape [numel / SWEEP_ROW, SWEEP_ROW] for a sweep case of `numel` elements."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < SWEEP_ROW or numel % SWEEP_ROW:
        raise ValueError(f"numel must be a positive multiple of {SWEEP_ROW}, got {numel!r}")
    return numel // SWEEP_ROW, SWEEP_ROW


@dataclass(frozen=True)
class KernelCase:
    """One (op, size, dtype) of the suite's sweep.

    fns: impl name -> a callable running the op once (eager: "float64" and the fused backend);
    compiled: the torch.compile'd reference formulation on the same inputs, or None (its first call
    compiles); bytes_moved: bytes the op must read and write (the roofline numerator).
    """

    fns: dict[str, Callable[[], object]]
    compiled: Callable[[], object] | None
    bytes_moved: int


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for all work queued on `device` (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _sample(fn: Callable[[], object], sync: Callable[[], None], inner: int) -> float:
    """Seconds per call of `fn`, averaged over `inner` back-to-back calls."""
    sync()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    return (time.perf_counter() - start) / inner


def median_time(
    fn: Callable[[], object],
    warmup: int = 3,
    reps: int = 10,
    sync: Callable[[], None] = lambda: None,
    inner: int = 1,
) -> float:
    """Median over `reps` samples of the seconds one call of `fn` takes.

    Each sample runs `fn` `inner` times between two `sync()` calls (use inner > 1 to amortize the
    synchronization for microsecond GPU kernels). `warmup` untimed calls come first.
    """
    for _ in range(warmup):
        fn()
    return statistics.median(_sample(fn, sync, inner) for _ in range(reps))


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    warmup: int = 3,
    reps: int = 10,
    sync: Callable[[], None] = lambda: None,
    inner: int = 1,
) -> dict[str, float]:
    """median_time for several callables, sampled in turn so that load drifts hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_sample(fn, sync, inner))
    return {name: statistics.median(s) for name, s in samples.items()}


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Bytes/s of a large same-device tensor copy, counting the bytes read and written (2 nbytes)."""
    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), warmup=2, reps=reps, sync=synchronizer(device))
    return 2 * src.numel() * src.element_size() / seconds


def format_row(
    op: str,
    impl: str,
    dtype: torch.dtype,
    numel: int,
    seconds: float,
    bytes_moved: int,
    copy_bw: float,
) -> str:
    """A TABLE_HEADER row: achieved GB/s = bytes_moved / seconds, and its fraction of copy_bw."""
    bw = bytes_moved / seconds
    name = str(dtype).removeprefix("torch.")
    return (
        f"| {op} | {impl} | {name} | {numel:,} | {seconds * 1e6:,.1f} | {bw / 1e9:,.2f} | "
        f"{bw / copy_bw:.0%} |"
    )


def print_cuda_table(copy_bw: float, rows: list[str]) -> None:
    """The device line, then the benchmark rows under TABLE_HEADER."""
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {copy_bw / 1e9:,.0f} GB/s (read + write)")
    print(TABLE_HEADER)
    print("\n".join(rows))


def parametrize_benchmark(metafunc, params: dict[str, dict[str, object]], cuda_shapes: tuple = ()) -> None:
    """pytest_generate_tests of a bench_<op>.py module's pytest-benchmark suite: every combination of
    the parameters its test takes (`params`: name -> {id: value}), less those that cannot run here
    (backend "triton" without CUDA; a shape in `cuda_shapes` on the CPU backends). The modules need
    no pytest import this way, so `psb-fast bench`, which imports them, runs on the base install."""
    names = [name for name in params if name in metafunc.fixturenames]
    cases, ids = [], []
    for picked in itertools.product(*(params[name].items() for name in names)):
        case = {name: value for name, (_, value) in zip(names, picked, strict=True)}
        if case.get("backend") == "triton" and not torch.cuda.is_available():
            continue
        if case.get("backend") != "triton" and case.get("shape") in cuda_shapes:
            continue
        cases.append(tuple(case.values()))
        ids.append("-".join(key for key, _ in picked))
    metafunc.parametrize(names, cases, ids=ids)


def run_cli(
    doc: str, bench_cpu: Callable[[int, int], None], bench_cuda: Callable[[int, int], None], cpu_reps: int
) -> None:
    """The command line shared by the bench_<op>.py scripts: --device cpu|cuda, --reps, --warmup."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--reps", type=int, help=f"timed samples per case (default {cpu_reps} cpu, 20 cuda)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device")
        bench_cuda(args.reps or 20, args.warmup)
    else:
        bench_cpu(args.reps or cpu_reps, args.warmup)
