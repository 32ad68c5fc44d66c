"""Every launch configuration of the Triton kernels, produced by calling the wrappers themselves.

`wrapper_calls()` calls each public wrapper of `bridge_sample.py`, `phase_step.py` and `sde_step.py`
once per branch that picks a different kernel or constexpr (history length q, model output F or
none, no noise / in-kernel Philox / supplied noise, xi_x needed or not, drawn or supplied bridge
noise), for every storage dtype and every layout of `LAYOUTS`. A layout fixes the shapes, and with them
what Triton specializes a launch on besides the constexprs: integer arguments' width (i32 or i64,
the latter for values >= 2**31), divisibility by 16 and the value 1, and pointers' 16-byte
alignment. `compile_check` runs these calls with the kernel launch intercepted and compiles
each distinct specialization ahead of time for a CUDA target; a new wrapper branch or a new
shape-dependent constexpr is compiled and checked as soon as it is reachable from these calls.

Layouts (x = [B, C, ...], rows of n = C * prod(rest) elements; m = [x | v] is [B, 2C, ...]):

    aligned      [64, 3, 32, 32]   n = 3072: a multiple of 1024 (1 x 1024 tiles)
    rows-784     [64, 1, 28, 28]   n = 784: a multiple of 16, not of 1024 (MNIST; 64 x 16 tiles)
    rows-64      [64, 1, 8, 8]     n = 64 (digits; 64 x 16 tiles)
    ragged       [3, 3, 5, 7]      n = 105, B = 3: nothing divisible by 16 (64 x 2 tiles); F and
                                   xi read through a row-strided slice whose data pointer is not
                                   16-byte aligned; seed and offset below 2**31 (i32)
    ragged-wide  [3, 3, 53, 53]    n = 8427: long rows, not a multiple of 16 (1 x 1024 tiles)
    narrow       [4096, 2]         n = 2: 2-D toy data, many short rows (64 x 2 tiles)
    huge         [2**31 + 64, 1]   B >= 2**31 (i64 sizes and offsets; rows stay below 2**31
                                   elements, tiling.MAX_ROW) on the meta device (no memory is
                                   used), and n = 1: specialized to the constant 1 (as are unit
                                   row strides)

Not covered: row strides of 2**31 or more (F a view into rows of 2**31+ elements), which Triton
would pass as i64; the kernels' index arithmetic is 64-bit from the first product either way.

The layouts with rows of a multiple of 16 elements (aligned, rows-784, rows-64) must get
16-byte loads and stores (`Layout.vector_loads`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import bridge_sample, phase_step, sde_step

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BIG_SEED = 2**40 + 12345  # seeds drawn by the package are in [0, 2**62): i64
SMALL_SEED = 7  # a user's small seed: i32


@dataclass(frozen=True)
class Layout:
    name: str
    x_shape: tuple[int, ...]
    device: str = "cpu"
    seed: int = BIG_SEED
    row_offset: int = 0  # bridge row_offset and (times n) the noise kernels' offset
    strided_f: bool = False  # F and xi as a row-strided, misaligned slice of a wider tensor
    vector_loads: bool = False  # rows and pointers allow 16-byte loads
    # n = 1: m's rows [x v] (stride 2) and unit-stride F rows are contiguous along different axes,
    # so Triton gives their accesses different layouts, converted through shared memory
    layout_conversions: bool = False

    @property
    def n(self) -> int:
        out = 1
        for s in self.x_shape[1:]:
            out *= s
        return out


LAYOUTS = (
    Layout("aligned", (64, 3, 32, 32), vector_loads=True),
    Layout("rows-784", (64, 1, 28, 28), row_offset=3, vector_loads=True),
    Layout("rows-64", (64, 1, 8, 8), vector_loads=True),
    Layout("ragged", (3, 3, 5, 7), seed=SMALL_SEED, row_offset=5, strided_f=True),
    Layout("ragged-wide", (3, 3, 53, 53)),
    Layout("narrow", (4096, 2)),
    Layout("huge", (2**31 + 64, 1), device="meta", row_offset=2**31 + 7, layout_conversions=True),
)


def _tensors(layout: Layout, dtype: torch.dtype, count: int) -> list[torch.Tensor]:
    """`count` tensors of x's shape (F's, xi's): contiguous, or strided slices starting one
    element into a wider tensor (a data pointer off 16-byte alignment, row stride != n)."""
    shape = layout.x_shape
    out = []
    for _ in range(count):
        if layout.strided_f:
            wide = torch.zeros((shape[0], shape[1] + 1, *shape[2:]), dtype=dtype, device=layout.device)
            out.append(wide[:, 1:])
        else:
            out.append(torch.zeros(shape, dtype=dtype, device=layout.device))
    return out


def wrapper_calls(layout: Layout, dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], object]]]:
    """(label, call) for every wrapper branch on `layout` in `dtype`; each call launches one kernel."""
    shape = layout.x_shape
    B, C, rest = shape[0], shape[1], shape[2:]
    dev = layout.device
    n = layout.n

    def state() -> torch.Tensor:
        return torch.zeros((B, 2 * C, *rest), dtype=dtype, device=dev)

    for q in range(1, phase_step.MAX_HISTORY + 1):
        yield f"phase_step q={q}", lambda q=q: phase_step.phase_step(
            state(), _tensors(layout, dtype, q), 0.1, [0.01] * q, [0.02] * q
        )
    yield "phase_step transition", lambda: phase_step.phase_step(
        state(), _tensors(layout, dtype, 2), (0.9, 0.1, -0.05, 0.8), [0.01] * 2, [0.02] * 2
    )
    yield "phase_hop", lambda: phase_step.phase_hop(
        state(), *_tensors(layout, dtype, 1), 0.5, 2.0, 0.3, 0.2, 1.1
    )
    yield "phase_hop_sde", lambda: phase_step.phase_hop_sde(
        state(), *_tensors(layout, dtype, 1), 0.5, 2.0, 0.3
    )
    if hasattr(phase_step, "phase_hop_weighted"):
        yield "phase_hop_weighted", lambda: phase_step.phase_hop_weighted(
            state(), *_tensors(layout, dtype, 1), 0.4, 0.5, 0.6
        )

    chols = {"no noise": None, "xi_v only (em)": (0.0, 0.0, 0.3), "xi_x and xi_v": (0.2, 0.1, 0.3)}
    for has_f in (False, True):
        for chol_name, chol in chols.items():
            for given in (False, True) if chol is not None else (False,):
                label = f"sde_step F={has_f} {chol_name}{' given xi' if given else ''}"

                def call(has_f=has_f, chol=chol, given=given):
                    F = _tensors(layout, dtype, 1)[0] if has_f else None
                    xi = tuple(_tensors(layout, torch.float32, 2)) if given else None
                    return sde_step.sde_step(
                        state(), F, 0.1, 0.01, 0.02, chol, seed=layout.seed,
                        offset=layout.row_offset * n, xi=xi,
                    )

                yield label, call

    def bridge_call(draw: bool):
        x1 = _tensors(layout, dtype, 1)[0]
        coef = torch.zeros((len(bridge_sample.COEF_FIELDS), B), dtype=torch.float64, device=dev)
        eps = None if draw else tuple(_tensors(layout, torch.float32, 2))
        return bridge_sample.bridge_sample_triton(
            x1, coef, seed=layout.seed, row_offset=layout.row_offset, eps=eps
        )

    yield "bridge_sample_triton drawn noise", lambda: bridge_call(True)
    yield "bridge_sample_triton given eps", lambda: bridge_call(False)


def all_calls(
    layouts: tuple[Layout, ...] = LAYOUTS, dtypes: tuple[torch.dtype, ...] = DTYPES
) -> Iterator[tuple[Layout, torch.dtype, str, Callable[[], object]]]:
    """(layout, dtype, label, call) over layouts x dtypes x wrapper branches."""
    for layout in layouts:
        for dtype in dtypes:
            for label, call in wrapper_calls(layout, dtype):
                yield layout, dtype, label, call
