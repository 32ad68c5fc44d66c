"""Fused sampler updates of m = [x | v] (docs/math.md §7, §8, §12): one pass over memory each.

Layout: m is [B, 2C, ...] (x = m[:, :C], v = m[:, C:]) and is treated as [B, 2n] rows,
n = C * prod(rest); model outputs F are [B, C, ...], treated as [B, n] rows (any row stride,
unit column stride; anything else is copied once to a contiguous tensor, and an m with no
such view is updated through a contiguous copy written back). Programs cover row x column tiles
(`tiling.py`: int64 program offsets, no per-element division, 16-byte accesses when n and the
row strides are multiples of 16); element math is float32, storage float32, bfloat16 or
float16. Per-step scalars arrive as Python floats (computed in float64 by the caller) and enter
the kernel as float32.

Inputs are validated by `psb_fast.ops.phase_step`; the wrappers here assume valid arguments.

- `phase_step`: the multistep update of every solver variant in place (docs/math.md §7.1, §7.4),
      x <- p_xx x + p_xv v + sum_j Cx_j F_j,   v <- p_vx x + p_vv v + sum_j Cv_j F_j,
  j = 0..q-1, q in 1..4 (F_0 newest; the sources are model outputs, or the data form's x1
  estimates); the F form's transition is (1, h, 0, 1). Bytes moved per element of x: (4 + q) *
  itemsize.
- `phase_hop_weighted`: the sampling hop x1_hat = a_F F + a_x x + a_v v at t = T (new tensor
  [B, C, ...]) with the weights of `PhaseBridge.hop_weights(T)`; `phase_hop` / `phase_hop_sde`
  take the unfolded scalars instead,
      probODE: x1_hat = (N F + P (aa x + bb v)) / den,   SDE: x1_hat = (N F / P + v) tau + x.

The row helpers (`row_view`, `as_rows`), the history limit (`MAX_HISTORY`) and the hop weights
are owned by psb_fast (backends, multistep, bridge) and imported here, so the CPU path needs no
Triton.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from psb_fast.backends import as_rows, row_view
from psb_fast.bridge import probode_hop_weights, sde_hop_weights
from psb_fast.multistep import MAX_HISTORY

from .tiling import LAUNCH_OPTIONS, tile, tile_grid, tile_ptrs


@triton.jit
def _phase_step_kernel(
    m_ptr, f0_ptr, f1_ptr, f2_ptr, f3_ptr,
    stride_m, stride_f0, stride_f1, stride_f2, stride_f3,
    B, n, col_blocks,
    p_xx, p_xv, p_vx, p_vv, cx0, cx1, cx2, cx3, cv0, cv1, cv2, cv3,
    NUM_F: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """x <- p_xx x + p_xv v + sum_{j < NUM_F} cx_j F_j;  v <- p_vx x + p_vv v + sum_{j < NUM_F} cv_j F_j
    (in place). With the F form's (1, h, 0, 1): x + h v and v exactly (1 x and 0 x are exact)."""
    r0, c0, i, j, mask = tile(B, n, col_blocks, BLOCK_R, BLOCK_C)
    x_ptrs = tile_ptrs(m_ptr, stride_m, r0, c0, i, j)
    x0 = tl.load(x_ptrs, mask=mask).to(tl.float32)
    v0 = tl.load(x_ptrs + n, mask=mask).to(tl.float32)
    x = p_xx * x0 + p_xv * v0
    v = p_vx * x0 + p_vv * v0
    f = tl.load(tile_ptrs(f0_ptr, stride_f0, r0, c0, i, j), mask=mask).to(tl.float32)
    x += cx0 * f
    v += cv0 * f
    if NUM_F > 1:
        f = tl.load(tile_ptrs(f1_ptr, stride_f1, r0, c0, i, j), mask=mask).to(tl.float32)
        x += cx1 * f
        v += cv1 * f
    if NUM_F > 2:
        f = tl.load(tile_ptrs(f2_ptr, stride_f2, r0, c0, i, j), mask=mask).to(tl.float32)
        x += cx2 * f
        v += cv2 * f
    if NUM_F > 3:
        f = tl.load(tile_ptrs(f3_ptr, stride_f3, r0, c0, i, j), mask=mask).to(tl.float32)
        x += cx3 * f
        v += cv3 * f
    tl.store(x_ptrs, x.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(x_ptrs + n, v.to(m_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _phase_hop_kernel(
    m_ptr, f_ptr, out_ptr, stride_m, stride_f, B, n, col_blocks, a_f, a_x, a_v,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = a_f F + a_x x + a_v v, out contiguous [B, n]."""
    r0, c0, i, j, mask = tile(B, n, col_blocks, BLOCK_R, BLOCK_C)
    x_ptrs = tile_ptrs(m_ptr, stride_m, r0, c0, i, j)
    x = tl.load(x_ptrs, mask=mask).to(tl.float32)
    v = tl.load(x_ptrs + n, mask=mask).to(tl.float32)
    f = tl.load(tile_ptrs(f_ptr, stride_f, r0, c0, i, j), mask=mask).to(tl.float32)
    out = a_f * f + a_x * x + a_v * v
    tl.store(tile_ptrs(out_ptr, n, r0, c0, i, j), out.to(out_ptr.dtype.element_ty), mask=mask)


def launch_shape(m: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(B, n, BLOCK_R, BLOCK_C, col_blocks, programs) for the state m = [B, 2C, ...], n = C * prod(rest)."""
    B = m.shape[0]
    n = math.prod(m.shape[1:]) // 2
    return (B, n, *tile_grid(B, n))


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch context for t's CUDA device (kernels launch on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def phase_step(
    m: torch.Tensor,
    F_hist: Sequence[torch.Tensor],
    h: float | tuple[float, float, float, float],
    Cx: Sequence[float],
    Cv: Sequence[float],
) -> torch.Tensor:
    """One multistep update of m = [x | v] in place; returns m.

    m: [B, 2C, ...]; F_hist: 1..4 tensors [B, C, ...] (F_hist[0] newest), m's dtype and device;
    h: the step size (transition (1, h, 0, 1)) or the transition (p_xx, p_xv, p_vx, p_vv);
    Cx, Cv: coefficients of F_hist[j] in the x and v updates (len(F_hist) each).
    """
    p_xx, p_xv, p_vx, p_vv = h if isinstance(h, tuple) else (1.0, h, 0.0, 1.0)
    B, n, block_r, block_c, col_blocks, grid = launch_shape(m)
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
            rows, *fs, rows.stride(0), *(f.stride(0) for f in fs), B, n, col_blocks,
            float(p_xx), float(p_xv), float(p_vx), float(p_vv), *cx, *cv,
            NUM_F=num_f, BLOCK_R=block_r, BLOCK_C=block_c, **LAUNCH_OPTIONS,
        )
    if view is None:
        m.copy_(rows.view_as(m))
    return m


def _hop(m: torch.Tensor, F: torch.Tensor, a_f: float, a_x: float, a_v: float) -> torch.Tensor:
    """a_f F + a_x x + a_v v as a new tensor of F's shape, m's dtype."""
    B, n, block_r, block_c, col_blocks, grid = launch_shape(m)
    out = torch.empty(F.shape, dtype=m.dtype, device=m.device)
    if grid == 0:
        return out
    rows = as_rows(m, B, 2 * n)
    f = as_rows(F, B, n)
    with on_device(m):
        _phase_hop_kernel[(grid,)](
            rows, f, out, rows.stride(0), f.stride(0), B, n, col_blocks, a_f, a_x, a_v,
            BLOCK_R=block_r, BLOCK_C=block_c, **LAUNCH_OPTIONS,
        )
    return out


def phase_hop_weighted(m: torch.Tensor, F: torch.Tensor, a_f: float, a_x: float, a_v: float) -> torch.Tensor:
    """The hop x1_hat = a_F F + a_x x + a_v v as a new [B, C, ...] tensor in m's dtype.

    m: [B, 2C, ...]; F: [B, C, ...]; (a_F, a_x, a_v) = `PhaseBridge.hop_weights(T)` (float64,
    folded once, so the kernel does 3 multiply-adds per element). Bytes moved: 4 * itemsize
    per element.
    """
    return _hop(m, F, a_f, a_x, a_v)


def phase_hop(
    m: torch.Tensor, F: torch.Tensor, normalizer: float, P: float,
    hop_aa: float, hop_bb: float, hop_den: float,
) -> torch.Tensor:
    """probODE hop x1_hat = (N F + P (aa x + bb v)) / den as a new [B, C, ...] tensor.

    m: [B, 2C, ...]; F: [B, C, ...]; scalars at T from `PhaseBridge.coefficients`, folded by
    `psb_fast.bridge.probode_hop_weights` (the formula's one home) for `phase_hop_weighted`.
    """
    return _hop(m, F, *probode_hop_weights(normalizer, P, hop_aa, hop_bb, hop_den))


def phase_hop_sde(
    m: torch.Tensor, F: torch.Tensor, normalizer: float, P: float, tau: float
) -> torch.Tensor:
    """SDE-mode hop x1_hat = (N F / P + v) tau + x as a new [B, C, ...] tensor (scalars at T,
    folded by `psb_fast.bridge.sde_hop_weights`)."""
    return _hop(m, F, *sde_hop_weights(normalizer, P, tau))
