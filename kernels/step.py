"""Fused sampler updates of the phase state m = [x | v] (SPEC §3, §5): one pass over memory each.

Layout: m is [B, 2C, ...] (x = m[:, :C], v = m[:, C:]) and is treated as [B, 2n] rows,
n = C * prod(rest); model outputs F are [B, C, ...], treated as [B, n] rows (any row stride,
unit column stride; anything else is copied once to a contiguous tensor, and an m with no
such view is updated through a contiguous copy written back). The grid is 1-D over
the B * n elements of x with int64 index math; element math is float32, storage float32,
bfloat16 or float16. Per-step scalars arrive as Python floats (computed in float64 by the
caller) and enter the kernel as float32.

Inputs are validated by `psb_fast.stepping`; the wrappers here assume valid arguments.

- `phase_step`: the multistep ODE update of m in place,
      x <- x + h v + sum_j Cx_j F_j,   v <- v + sum_j Cv_j F_j,   j = 0..q-1, q in 1..4
  (F_0 newest). Bytes moved per element of x: (4 + q) * itemsize.
- `phase_hop` / `phase_hop_sde`: the sampling hop x1_hat at t = T (new tensor [B, C, ...]),
      probODE: x1_hat = (N F + P (aa x + bb v)) / den,   SDE: x1_hat = (N F / P + v) tau + x.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024
MAX_HISTORY = 4


@triton.jit
def phase_index(n, total, BLOCK: tl.constexpr, ROW_ALIGNED: tl.constexpr):
    """This program's x-element indices: (global index, row b, column j, mask), all int64.

    ROW_ALIGNED (n % BLOCK == 0): the block lies inside one row, so the row is a scalar and
    the columns are contiguous (vectorized loads and stores).
    """
    start = tl.program_id(0).to(tl.int64) * BLOCK
    lane = tl.arange(0, BLOCK)
    gidx = start + lane
    if ROW_ALIGNED:
        row = start // n
        col = (start - row * n) + lane
    else:
        row = gidx // n
        col = gidx - row * n
    return gidx, row, col, gidx < total


@triton.jit
def _phase_step_kernel(
    m_ptr, f0_ptr, f1_ptr, f2_ptr, f3_ptr,
    stride_m, stride_f0, stride_f1, stride_f2, stride_f3,
    n, total,
    h, cx0, cx1, cx2, cx3, cv0, cv1, cv2, cv3,
    NUM_F: tl.constexpr, BLOCK: tl.constexpr, ROW_ALIGNED: tl.constexpr,
):
    """x <- x + h v + sum_{j < NUM_F} cx_j F_j;  v <- v + sum_{j < NUM_F} cv_j F_j (in place)."""
    _, row, col, mask = phase_index(n, total, BLOCK, ROW_ALIGNED)
    x_off = row * stride_m + col
    x = tl.load(m_ptr + x_off, mask=mask).to(tl.float32)
    v = tl.load(m_ptr + x_off + n, mask=mask).to(tl.float32)
    x = x + h * v
    f = tl.load(f0_ptr + row * stride_f0 + col, mask=mask).to(tl.float32)
    x += cx0 * f
    v += cv0 * f
    if NUM_F > 1:
        f = tl.load(f1_ptr + row * stride_f1 + col, mask=mask).to(tl.float32)
        x += cx1 * f
        v += cv1 * f
    if NUM_F > 2:
        f = tl.load(f2_ptr + row * stride_f2 + col, mask=mask).to(tl.float32)
        x += cx2 * f
        v += cv2 * f
    if NUM_F > 3:
        f = tl.load(f3_ptr + row * stride_f3 + col, mask=mask).to(tl.float32)
        x += cx3 * f
        v += cv3 * f
    tl.store(m_ptr + x_off, x.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + x_off + n, v.to(m_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _phase_hop_kernel(
    m_ptr, f_ptr, out_ptr, stride_m, stride_f, n, total, a_f, a_x, a_v,
    BLOCK: tl.constexpr, ROW_ALIGNED: tl.constexpr,
):
    """out = a_f F + a_x x + a_v v, out contiguous [B, n]."""
    gidx, row, col, mask = phase_index(n, total, BLOCK, ROW_ALIGNED)
    x_off = row * stride_m + col
    x = tl.load(m_ptr + x_off, mask=mask).to(tl.float32)
    v = tl.load(m_ptr + x_off + n, mask=mask).to(tl.float32)
    f = tl.load(f_ptr + row * stride_f + col, mask=mask).to(tl.float32)
    out = a_f * f + a_x * x + a_v * v
    tl.store(out_ptr + gidx, out.to(out_ptr.dtype.element_ty), mask=mask)


def launch_shape(m: torch.Tensor) -> tuple[int, int, int, bool]:
    """(B, n, grid size, ROW_ALIGNED) for the state m = [B, 2C, ...], n = C * prod(rest)."""
    B = m.shape[0]
    n = math.prod(m.shape[1:]) // 2
    return B, n, triton.cdiv(B * n, BLOCK_SIZE), n % BLOCK_SIZE == 0


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch context for t's CUDA device (kernels launch on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def row_view(t: torch.Tensor, B: int, n: int) -> torch.Tensor | None:
    """t viewed as [B, n] with unit column stride (any row stride), or None if no such view."""
    try:
        rows = t.view(B, n)
    except RuntimeError:
        return None
    return rows if n <= 1 or rows.stride(1) == 1 else None


def as_rows(t: torch.Tensor, B: int, n: int) -> torch.Tensor:
    """t as a [B, n] tensor with unit column stride: a view when one exists, else a copy."""
    rows = row_view(t, B, n)
    return t.contiguous().view(B, n) if rows is None else rows


def phase_step(
    m: torch.Tensor,
    F_hist: Sequence[torch.Tensor],
    h: float,
    Cx: Sequence[float],
    Cv: Sequence[float],
) -> torch.Tensor:
    """One multistep ODE update of m = [x | v] in place; returns m.

    m: [B, 2C, ...]; F_hist: 1..4 tensors [B, C, ...] (F_hist[0] newest), m's dtype and device;
    h: step size; Cx, Cv: coefficients of F_hist[j] in the x and v updates (len(F_hist) each).
    """
    B, n, grid, aligned = launch_shape(m)
    if grid == 0:
        return m
    view = row_view(m, B, 2 * n)
    rows = m.contiguous().view(B, 2 * n) if view is None else view
    fs = [as_rows(F, B, n) for F in F_hist]
    num_f = len(fs)
    fs = fs + [fs[0]] * (MAX_HISTORY - num_f)
    cx = [float(c) for c in Cx] + [0.0] * (MAX_HISTORY - num_f)
    cv = [float(c) for c in Cv] + [0.0] * (MAX_HISTORY - num_f)
    with on_device(m):
        _phase_step_kernel[(grid,)](
            rows, *fs, rows.stride(0), *(f.stride(0) for f in fs), n, B * n,
            float(h), *cx, *cv,
            NUM_F=num_f, BLOCK=BLOCK_SIZE, ROW_ALIGNED=aligned,
        )
    if view is None:
        m.copy_(rows.view_as(m))
    return m


def _hop(m: torch.Tensor, F: torch.Tensor, a_f: float, a_x: float, a_v: float) -> torch.Tensor:
    """a_f F + a_x x + a_v v as a new tensor of F's shape, m's dtype."""
    B, n, grid, aligned = launch_shape(m)
    out = torch.empty(F.shape, dtype=m.dtype, device=m.device)
    if grid == 0:
        return out
    rows = as_rows(m, B, 2 * n)
    f = as_rows(F, B, n)
    with on_device(m):
        _phase_hop_kernel[(grid,)](
            rows, f, out, rows.stride(0), f.stride(0), n, B * n, a_f, a_x, a_v,
            BLOCK=BLOCK_SIZE, ROW_ALIGNED=aligned,
        )
    return out


def hop_weights(
    normalizer: float, P: float, hop_aa: float, hop_bb: float, hop_den: float
) -> tuple[float, float, float]:
    """(a_F, a_x, a_v) with probODE x1_hat = a_F F + a_x x + a_v v, folded in float64.

    Scalars at T (from PhaseBridge.coefficients): N = normalizer, P = 4 / tau, aa = hop_aa,
    bb = hop_bb, den = hop_den; x1_hat = (N F + P (aa x + bb v)) / den.
    """
    return normalizer / hop_den, P * hop_aa / hop_den, P * hop_bb / hop_den


def hop_weights_sde(normalizer: float, P: float, tau: float) -> tuple[float, float, float]:
    """(a_F, a_x, a_v) with SDE-mode x1_hat = (N F / P + v) tau + x = a_F F + a_x x + a_v v."""
    return normalizer * tau / P, 1.0, tau


def phase_hop(
    m: torch.Tensor, F: torch.Tensor, normalizer: float, P: float,
    hop_aa: float, hop_bb: float, hop_den: float,
) -> torch.Tensor:
    """probODE hop x1_hat = (N F + P (aa x + bb v)) / den as a new [B, C, ...] tensor.

    m: [B, 2C, ...]; F: [B, C, ...]; scalars as in `hop_weights` (folded there in float64,
    so the kernel does 3 multiply-adds per element). Bytes moved: 4 * itemsize per element.
    """
    return _hop(m, F, *hop_weights(normalizer, P, hop_aa, hop_bb, hop_den))


def phase_hop_sde(
    m: torch.Tensor, F: torch.Tensor, normalizer: float, P: float, tau: float
) -> torch.Tensor:
    """SDE-mode hop x1_hat = (N F / P + v) tau + x as a new [B, C, ...] tensor (scalars at T)."""
    return _hop(m, F, *hop_weights_sde(normalizer, P, tau))
