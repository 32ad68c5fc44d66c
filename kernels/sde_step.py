"""Affine phase update plus 2x2 Gaussian noise, fused, in place (SDE samplers, docs/math.md §9, §12).

One generic kernel serves every stochastic step: with m = [x | v] ([B, 2C, ...], treated as
[B, 2n] rows) and an optional model output F ([B, C, ...]),

    x <- x + h v + cxF F
    v <- v       + cvF F
    (x, v) += (Lxx xi_x, Lxv xi_x + Lvv xi_v)          (optional)

xi is drawn in the kernel, keyed by the seed and the element's global index g = offset + b * n
+ j over the x elements of the whole batch: one Philox4x32-10 block per element, counter
(lo32(g), hi32(g), 0, 0) under the key `seed`, whose first two words give (xi_x, xi_v) through
one Box-Muller transform (`tiling.normal_pair`, the same draw as the bridge_sample kernel's
(eps_x, eps_v)). A chunk of rows [b0, b1) launched with offset = b0 * n therefore draws exactly
the numbers of those rows in the whole batch, and no noise tensor is written or read. Bytes
moved per element of x: (4 + [F]) * itemsize. (Until the tiled kernels, xi_x and xi_v were the
cosine branches of two Philox blocks, tl.randn(seed, 2g) and tl.randn(seed, 2g + 1): twice the
integer work, and a stream that changed with Triton 3.0's 64-bit randint.)

The per-step scalars (h, cxF, cvF and the Cholesky factor (Lxx, Lxv, Lvv)) are computed by the
caller in float64 (`psb_fast.ops.sde_step`); element math is float32. Wrappers:

- `sde_exact_step`: exact-noise exponential step, m <- Phi(h) m + (cx, cv) F + chol(Q(t, h)) xi;
- `em_step`: Euler-Maruyama, x += h v; v += h N F + g sqrt(h) xi_v;
- `sscs_half_step`: compat SSCS half step, x += s v plus noise with the SSCS half covariance
  (its middle update v += h N F is `sde_step(m, F, 0, 0, h N)`);
- `sde_step`: the generic form, the kernel of the op `psb_fast.sde_step`. Each wrapper takes
  `xi=(xi_x, xi_v)` to use supplied
  noise tensors instead of the in-kernel draw (debugging, comparison with the reference).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from psb_fast.backends import as_rows, row_view

from .phase_step import launch_shape, on_device
from .tiling import LAUNCH_OPTIONS, normal_pair, tile, tile_ptrs

Chol = tuple[float, float, float]

NOISE_NONE, NOISE_PHILOX, NOISE_GIVEN = 0, 1, 2


@triton.jit(do_not_specialize=["seed", "offset"])
def _sde_step_kernel(
    m_ptr, f_ptr, xix_ptr, xiv_ptr,
    stride_m, stride_f, B, n, col_blocks,
    h, cx_f, cv_f, lxx, lxv, lvv, seed, offset,
    HAS_F: tl.constexpr, NOISE: tl.constexpr, NOISE_X: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """x <- x + h v + cx_f F;  v <- v + cv_f F;  (x, v) += (lxx xi_x, lxv xi_x + lvv xi_v).

    NOISE: 0 none, 1 Philox, (xi_x, xi_v) = normal_pair(seed, offset + b * n + j), 2 read xi_x,
    xi_v (contiguous [B, n]). NOISE_X (NOISE 2 only): lxx or lxv is nonzero (False for
    Euler-Maruyama: xi_x is then not read). Philox draws both normals of an element at once, so
    NOISE 1 always applies both (lxx = lxv = 0 for Euler-Maruyama).
    """
    r0, c0, i, j, mask = tile(B, n, col_blocks, BLOCK_R, BLOCK_C)
    x_ptrs = tile_ptrs(m_ptr, stride_m, r0, c0, i, j)
    x = tl.load(x_ptrs, mask=mask).to(tl.float32)
    v = tl.load(x_ptrs + n, mask=mask).to(tl.float32)
    x = x + h * v
    if HAS_F:
        f = tl.load(tile_ptrs(f_ptr, stride_f, r0, c0, i, j), mask=mask).to(tl.float32)
        x += cx_f * f
        v += cv_f * f
    if NOISE == 1:
        g = (offset + (r0 + tl.cast(i, tl.int64)) * n + c0)[:, None] + j[None, :]
        xi_x, xi_v = normal_pair(seed, g, x)
        x += lxx * xi_x
        v += lxv * xi_x + lvv * xi_v
    if NOISE == 2:
        v += lvv * tl.load(tile_ptrs(xiv_ptr, n, r0, c0, i, j), mask=mask).to(tl.float32)
        if NOISE_X:
            xi_x = tl.load(tile_ptrs(xix_ptr, n, r0, c0, i, j), mask=mask).to(tl.float32)
            x += lxx * xi_x
            v += lxv * xi_x
    tl.store(x_ptrs, x.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(x_ptrs + n, v.to(m_ptr.dtype.element_ty), mask=mask)


def sde_step(
    m: torch.Tensor,
    F: torch.Tensor | None,
    h: float,
    cxF: float,
    cvF: float,
    chol: Chol | None = None,
    seed: int = 0,
    offset: int = 0,
    xi: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The generic update in place; returns m.

    m: [B, 2C, ...]; F: [B, C, ...] or None (then cxF, cvF are ignored); h, cxF, cvF: scalars;
    chol: (Lxx, Lxv, Lvv) of the noise covariance, or None for no noise; seed: Philox seed,
    int in [0, 2^63); offset: global x-element index of m's first element (chunking);
    xi: (xi_x, xi_v), each [B, C, ...], used instead of the in-kernel draw (seed, offset unused).
    """
    B, n, block_r, block_c, col_blocks, grid = launch_shape(m)
    if grid == 0:
        return m
    view = row_view(m, B, 2 * n)
    rows = m.contiguous().view(B, 2 * n) if view is None else view
    f = rows if F is None else as_rows(F, B, n)
    lxx, lxv, lvv = (0.0, 0.0, 0.0) if chol is None else chol
    if chol is None:
        mode, xi_x, xi_v = NOISE_NONE, rows, rows
    elif xi is None:
        mode, xi_x, xi_v = NOISE_PHILOX, rows, rows
    else:
        mode, xi_x, xi_v = NOISE_GIVEN, xi[0].contiguous(), xi[1].contiguous()
    with on_device(m):
        _sde_step_kernel[(grid,)](
            rows, f, xi_x, xi_v, rows.stride(0), f.stride(0), B, n, col_blocks,
            float(h), float(cxF), float(cvF), float(lxx), float(lxv), float(lvv), int(seed), int(offset),
            HAS_F=F is not None, NOISE=mode, NOISE_X=mode == NOISE_GIVEN and (lxx != 0.0 or lxv != 0.0),
            BLOCK_R=block_r, BLOCK_C=block_c, **LAUNCH_OPTIONS,
        )
    if view is None:
        m.copy_(rows.view_as(m))
    return m


def sde_exact_step(
    m: torch.Tensor, F: torch.Tensor | None, h: float, cx: float, cv: float, chol: Chol | None,
    seed: int = 0, offset: int = 0, xi: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Exact-noise exponential step in place: m <- Phi(h) m + (cx, cv) F + chol xi.

    chol: Cholesky factor of the transition covariance Q(t, h) (None when h = 0).
    """
    return sde_step(m, F, h, cx, cv, chol, seed, offset, xi)


def em_step(
    m: torch.Tensor, F: torch.Tensor, h: float, normalizer: float, g: float,
    seed: int = 0, offset: int = 0, xi: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Euler-Maruyama step in place: x += h v; v += h N F + g sqrt(h) xi_v (g = g(t), N = N(t))."""
    chol = (0.0, 0.0, g * math.sqrt(h)) if h > 0 else None
    return sde_step(m, F, h, 0.0, h * normalizer, chol, seed, offset, xi)


def sscs_half_step(
    m: torch.Tensor, s: float, chol: Chol | None,
    seed: int = 0, offset: int = 0, xi: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Compat SSCS half step in place: x += s v, plus noise chol xi (chol of the SSCS half covariance)."""
    return sde_step(m, None, s, 0.0, 0.0, chol, seed, offset, xi)
