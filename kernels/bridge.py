"""Fused bridge sampling (SPEC §2, §5): x1 -> (m_t = [x_t | v_t], label) in one pass over memory.

Per element, with per-row coefficients (float64 in memory, float32 in registers):

    x_t   = cx x1 + Lxx eps_x
    v_t   = cv x1 + Lxv eps_x + Lvv eps_v
    label = label_x1 x1 + label_eps_x eps_x + label_eps_v eps_v

Noise is drawn in the kernel (Philox, 10 rounds): element g (its global flat index, below) uses
the Philox counter (lo32(g), hi32(g), 0, 0) under key `seed`; the first two of the four 32-bit
outputs go through one Box-Muller transform, whose cosine and sine branches are eps_x and eps_v
(two independent N(0, 1)). One Philox block per element instead of one per normal halves the
integer work, the kernel's main ALU cost. Since no noise depends on the launch
geometry, a batch processed in chunks (each with its `row_offset`) gets the same numbers as one
call on the whole batch. These are the first two outputs of `tl.randn4x(seed, g)` (Triton 3.8).

Layout: x1 is flattened to [B, n], n = C * prod(rest); the grid is 1-D over the B * n elements,
so tiny rows (2-D toy data) and huge batches are both fine. Row r of m is [x_t(r) | v_t(r)], 2n
long, i.e. m = concat([x_t, v_t], dim=1) of shape [B, 2C, ...] written without a concat.
Program-level offsets and Philox counters are int64; per-element offsets within a program are
int32, which bounds a row: n < MAX_ROW = 2**30 - BLOCK.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

# Row k of the packed [8, B] float64 coefficient tensor holds PhaseBridge.coefficients(t).<field>.
COEF_FIELDS = ("cx", "cv", "lxx", "lxv", "lvv", "label_x1", "label_eps_x", "label_eps_v")

BLOCK = 1024
NUM_WARPS = 4
MAX_ROW = 2**30 - BLOCK


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
    total,
    BLOCK: tl.constexpr,
    DRAW: tl.constexpr,
):
    """One BLOCK of the flat [B * n] element range.

    x1_ptr: [B, n] storage dtype; coef_ptr: [8, B] float64 (rows in COEF_FIELDS order);
    m_ptr: [B, 2n] out; label_ptr: [B, n] out; eps_x_ptr, eps_v_ptr: [B, n] noise (read only
    when DRAW is False); seed: Philox key; offset: global flat index of element (0, 0).
    """
    start = tl.program_id(0).to(tl.int64) * BLOCK
    row0 = start // n
    lead = (start - row0 * n).to(tl.int32)  # column of `start` in row row0, < n
    a = tl.arange(0, BLOCK)
    mask = a < tl.minimum(total - start, BLOCK).to(tl.int32)
    local = lead + a  # < n + BLOCK
    r = local // n  # row - row0
    # element (row, col) sits at row * n + col in x1 and at row * 2n + col = idx + row * n in m
    m_off = a + r * n

    x1 = tl.load(x1_ptr + start + a, mask=mask, other=0.0).to(tl.float32)
    c = coef_ptr + row0 + r
    cx = tl.load(c, mask=mask, other=0.0).to(tl.float32)
    cv = tl.load(c + B, mask=mask, other=0.0).to(tl.float32)
    lxx = tl.load(c + 2 * B, mask=mask, other=0.0).to(tl.float32)
    lxv = tl.load(c + 3 * B, mask=mask, other=0.0).to(tl.float32)
    lvv = tl.load(c + 4 * B, mask=mask, other=0.0).to(tl.float32)
    lab_x1 = tl.load(c + 5 * B, mask=mask, other=0.0).to(tl.float32)
    lab_ex = tl.load(c + 6 * B, mask=mask, other=0.0).to(tl.float32)
    lab_ev = tl.load(c + 7 * B, mask=mask, other=0.0).to(tl.float32)

    if DRAW:
        g = offset + start + a
        lo = g.to(tl.uint32)
        hi = (g >> 32).to(tl.uint32)
        zero = lo * 0
        i1, i2, _, _ = tl.philox(seed, lo, hi, zero, zero)
        eps_x, eps_v = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i1), tl.uint_to_uniform_float(i2))
    else:
        eps_x = tl.load(eps_x_ptr + start + a, mask=mask, other=0.0).to(tl.float32)
        eps_v = tl.load(eps_v_ptr + start + a, mask=mask, other=0.0).to(tl.float32)

    x_t = cx * x1 + lxx * eps_x
    v_t = cv * x1 + lxv * eps_x + lvv * eps_v
    label = lab_x1 * x1 + lab_ex * eps_x + lab_ev * eps_v

    m_base = m_ptr + start + row0 * n
    out_ty = m_ptr.dtype.element_ty
    tl.store(m_base + m_off, x_t.to(out_ty), mask=mask)
    tl.store(m_base + m_off + n, v_t.to(out_ty), mask=mask)
    tl.store(label_ptr + start + a, label.to(out_ty), mask=mask)


def bridge_sample_triton(
    x1: torch.Tensor,
    coef: torch.Tensor,
    seed: int = 0,
    row_offset: int = 0,
    eps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused kernel. Inputs are assumed validated (see psb_fast.sample_bridge).

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
    grid = (triton.cdiv(total, BLOCK),)
    with torch.cuda.device(x1.device) if x1.is_cuda else nullcontext():
        _bridge_sample_kernel[grid](
            x1, coef.contiguous(), m, label, eps_x, eps_v,
            seed, row_offset * n, B, n, total,
            BLOCK=BLOCK, DRAW=eps is None, num_warps=NUM_WARPS,
        )
    return m, label

