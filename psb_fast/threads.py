"""CPU intra-op threads: how many train, sample, tune and the Python API use (one home).

torch runs each op on one thread per core by default. For a small network call the threads cost
more in synchronisation than they gain, and on a loaded or shared machine far more:
`benchmarks/bench_threads.py` measures NFE-10 sampling with one thread against torch's default
count per size of a network call (B x prod(x_shape) elements of x); the README's "CPU threads"
paragraph gives its numbers. Below SMALL_WORK elements per call the automatic choice is one
thread; from there on, torch's count.

    n = auto_threads(work_elements(batch, x_shape), device)   # 1 or torch's count
    n = choose_threads(requested, elements, device)           # requested, or auto with 0
    with intra_op_threads(n): ...                             # n for a block, then the previous count
    with api_threads(m0): ...                                 # PhaseSampler.sample and tune

The Python API (`PhaseSampler.sample`, `psb_fast.tune`) applies the automatic choice only while
the count is torch's default, i.e. the count psb_fast found when it was imported with neither
OMP_NUM_THREADS nor MKL_NUM_THREADS set; a count set with torch.set_num_threads after importing
psb_fast, or by those variables, is the caller's and is kept. `set_auto(False)` turns the
automatic choice off for the API. The count is process-wide: the API restores it when the call
returns, so calls from several Python threads at once should fix it themselves first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

SMALL_WORK = 1 << 16
"""Elements of x per network call (B x prod(x_shape)) below which one thread is used (measured by
benchmarks/bench_threads.py: one thread was faster at every size below this on the machines measured;
the README's "CPU threads" paragraph has the table)."""

_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_AT_IMPORT = torch.get_num_threads()
_auto = True


def work_elements(batch: int, x_shape: tuple[int, ...]) -> int:
    """Elements of x in one network call on `batch` points of shape `x_shape`."""
    return batch * math.prod(x_shape)


def auto_threads(elements: int, device: torch.device | str = "cpu") -> int:
    """The automatic count for network calls on `elements` elements of x: 1 on the CPU below
    SMALL_WORK, else torch's current count (also for accelerators, whose work is not on CPU threads)."""
    if torch.device(device).type == "cpu" and elements < SMALL_WORK:
        return 1
    return torch.get_num_threads()


def choose_threads(requested: int, elements: int, device: torch.device | str = "cpu") -> int:
    """`requested` threads (an int >= 1), or the automatic count with 0; ValueError naming the value
    when it is negative or not an int."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"threads must be an int >= 0 (0: automatic), got {requested!r}")
    return requested or auto_threads(elements, device)


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block, the previous count restored after."""
    previous = torch.get_num_threads()
    if n != previous:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def user_chose_threads() -> bool:
    """Whether the current count is the caller's choice: OMP_NUM_THREADS or MKL_NUM_THREADS is set,
    the count differs from the one at import (torch.set_num_threads was called since), or set_auto(False)."""
    return not _auto or any(os.environ.get(name) for name in _ENV) or torch.get_num_threads() != _AT_IMPORT


def set_auto(enabled: bool) -> None:
    """Turn the API's automatic thread choice on (the default) or off (torch's count is always kept)."""
    global _auto
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _auto = enabled


@contextmanager
def api_threads(m: torch.Tensor) -> Iterator[None]:
    """For the API's entry points: the automatic count for network calls on `m` ([B, 2C, ...], the
    state; x is half of it) inside the block, unless the caller chose the count (user_chose_threads)."""
    if user_chose_threads():
        yield
        return
    with intra_op_threads(auto_threads(m.numel() // 2, m.device)):
        yield
