"""Fused bridge sampling (docs/math.md §5.1, §12): x1 -> (m_t = [x_t | v_t], label) in one pass over memory.

Per element, with per-row coefficients (float64 in memory, float32 in registers):

    x_t   = cx x1 + Lxx eps_x
    v_t   = cv x1 + Lxv eps_x + Lvv eps_v
    label = label_x1 x1 + label_eps_x eps_x + label_eps_v eps_v

Noise is drawn in the kernel (`tiling.normal_pair`): element g (its global flat index, below)
uses the Philox4x32-10 block with counter (lo32(g), hi32(g), 0, 0) under key `seed`; its first
two 32-bit words go through one Box-Muller transform, whose cosine and sine branches are eps_x
and eps_v (two independent N(0, 1)): one Philox block per element, not one per normal. Since no
noise depends on the launch geometry, a batch processed in chunks (each with its `row_offset`)
gets the same numbers as one call on the whole batch. They are the SDE kernel's (xi_x, xi_v) of
the same (seed, g), and are pinned by golden values and a float64 recomputation from an
independent Philox implementation (tests/test_kernels_native.py, interpreter and GPU alike).

Layout: x1 is flattened to [B, n], n = C * prod(rest); programs cover tiles of rows x columns
(`tiling.py`), so tiny rows (2-D toy data) and long rows are both fine and no element index is
divided. Each program loads the 8 coefficients of each of its rows once and broadcasts them
along the row. Row r of m is [x_t(r) | v_t(r)], 2n long, i.e. m = concat([x_t, v_t], dim=1) of
shape [B, 2C, ...] written without a concat. Program offsets and Philox counters are int64.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from psb_fast.ops.bridge_sample import COEF_FIELDS as COEF_FIELDS  # re-exported for launches, benchmarks

from .tiling import LAUNCH_OPTIONS, MAX_ROW, normal_pair, tile, tile_grid, tile_ptrs

# Row k of the packed [8, B] float64 coefficient tensor holds PhaseBridge.coefficients(t).<field>
# for field = COEF_FIELDS[k] (owned by the dispatch, psb_fast.ops.bridge_sample; the cpu path packs
# the same rows).

# x1's rows must have fewer than MAX_ROW = 2**31 elements (tiling.MAX_ROW, imported here for callers).


@triton.jit(do_not_specialize=["seed", "offset"])
def _bridge_sample_kernel(
    x1_ptr,
    coef_ptr,
    m_ptr,
    label_ptr,
    eps_x_ptr,
    eps_v_ptr,
    seed,
    offset,
    B,
    n,
    stride_m,
    col_blocks,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DRAW: tl.constexpr,
):
    """One tile of BLOCK_R rows x BLOCK_C columns of the [B, n] elements.

    x1_ptr: [B, n] storage dtype; coef_ptr: [8, B] float64 (rows in COEF_FIELDS order);
    m_ptr: [B, 2n] out (stride_m = 2n, passed as an argument so that Triton assumes no more
    alignment for m's rows than for the others: one layout for every access); label_ptr: [B, n]
    out; eps_x_ptr, eps_v_ptr: [B, n] noise (read only when DRAW is False); seed: Philox key;
    offset: global flat index of element (0, 0).
    """
    r0, c0, i, j, mask = tile(B, n, col_blocks, BLOCK_R, BLOCK_C)
    x1 = tl.load(tile_ptrs(x1_ptr, n, r0, c0, i, j), mask=mask, other=0.0).to(tl.float32)

    # The 8 coefficients of each row: [BLOCK_R] loads, broadcast along the columns. Field k of
    # row r is at k * B + r, reached by adding B to the pointer (no 32-bit k * B product).
    row_mask = i < tl.minimum(B - r0, BLOCK_R).to(tl.int32)
    c = coef_ptr + r0 + i
    cx = tl.load(c, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    c += B
    cv = tl.load(c, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    c += B
    lxx = tl.load(c, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    c += B
    lxv = tl.load(c, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    c += B
    lvv = tl.load(c, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    c += B
    lab_x1 = tl.load(c, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    c += B
    lab_ex = tl.load(c, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    c += B
    lab_ev = tl.load(c, mask=row_mask, other=0.0).to(tl.float32)[:, None]

    if DRAW:
        g = (offset + (r0 + tl.cast(i, tl.int64)) * n + c0)[:, None] + j[None, :]
        eps_x, eps_v = normal_pair(seed, g, x1)
    else:
        eps_x = tl.load(tile_ptrs(eps_x_ptr, n, r0, c0, i, j), mask=mask, other=0.0).to(tl.float32)
        eps_v = tl.load(tile_ptrs(eps_v_ptr, n, r0, c0, i, j), mask=mask, other=0.0).to(tl.float32)

    x_t = cx * x1 + lxx * eps_x
    v_t = cv * x1 + lxv * eps_x + lvv * eps_v
    label = lab_x1 * x1 + lab_ex * eps_x + lab_ev * eps_v

    out_ty = m_ptr.dtype.element_ty
    x_ptrs = tile_ptrs(m_ptr, stride_m, r0, c0, i, j)
    tl.store(x_ptrs, x_t.to(out_ty), mask=mask)
    tl.store(x_ptrs + n, v_t.to(out_ty), mask=mask)
    tl.store(tile_ptrs(label_ptr, n, r0, c0, i, j), label.to(out_ty), mask=mask)


def bridge_sample_triton(
    x1: torch.Tensor,
    coef: torch.Tensor,
    seed: int = 0,
    row_offset: int = 0,
    eps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused kernel. Inputs are assumed validated (see psb_fast.ops.bridge_sample).

    Args:
        x1: [B, C, ...] float32 / bfloat16 / float16, any strides (made contiguous).
        coef: [8, B] float64 on x1's device, rows in COEF_FIELDS order.
        seed: Philox key, 0 <= seed < 2**63.
        row_offset: global index of x1's first row; noise of element (b, j) is keyed by
            (row_offset + b) * n + j, so chunks of a batch reproduce the whole batch's noise.
        eps: optional (eps_x, eps_v), each x1's shape: used instead of drawing noise.

    Returns:
        m_t [B, 2C, ...] and label [B, C, ...], contiguous, in x1's dtype.
    """
    B, C = x1.shape[:2]
    rest = tuple(x1.shape[2:])
    n = math.prod(x1.shape[1:])
    if n >= MAX_ROW:
        raise ValueError(f"x1 rows must have fewer than {MAX_ROW} elements (C * prod(rest)), got {n}")
    x1 = x1.contiguous()
    m = torch.empty((B, 2 * C, *rest), dtype=x1.dtype, device=x1.device)
    label = torch.empty_like(x1)
    total = B * n
    if total == 0:
        return m, label
    if eps is None:
        eps_x = eps_v = x1  # never read
    else:
        eps_x, eps_v = (e.contiguous() for e in eps)
    block_r, block_c, col_blocks, grid = tile_grid(B, n)
    with torch.cuda.device(x1.device) if x1.is_cuda else nullcontext():
        _bridge_sample_kernel[(grid,)](
            x1, coef.contiguous(), m, label, eps_x, eps_v,
            seed, row_offset * n, B, n, 2 * n, col_blocks,
            BLOCK_R=block_r, BLOCK_C=block_c, DRAW=eps is None, **LAUNCH_OPTIONS,
        )
    return m, label

