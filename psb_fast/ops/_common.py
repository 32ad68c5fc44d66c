"""Shared by the fused sampler ops (`psb_fast.ops.phase_step`, `psb_fast.ops.sde_step`): the state's
shape checks (scalars: `psb_fast.checks`), the in-place CPU path and the float64 write-back.

The phase state is m = [x | v], [B, 2C, ...] (x = m[:, :C], v = m[:, C:]); model outputs F
have x's shape [B, C, ...] and m's dtype and device. Storage dtypes: float32, bfloat16,
float16; element math is float32 (float64 for "float64"); per-step scalars are float64
(docs/math.md §12).

Backends of the ops:
- "triton": the fused kernels of `psb_fast.kernels.phase_step` / `psb_fast.kernels.sde_step`
  (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), imported on first use (so Triton is
  needed only for this backend);
- "cpu": in-place float32 torch ops (x.add_(v, alpha=h), x.add_(F, alpha=c), ...), source-
  major over chunks that stay in the last-level cache, each op parallelized by torch
  (`_cpu_affine`);
- "float64": plain float64 torch (`psb_fast.ops.float64`; the hop is
  `PhaseBridge.estimate_x1`), written back into m (`_write_back`);
- "auto": "triton" for CUDA tensors, "cpu" otherwise.

Every argument is validated before any kernel runs (ValueError for bad values and shapes,
TypeError for bad types and dtypes, each naming the argument).

Aliasing: inputs (F_hist, F, xi) may share memory with m, e.g. a model output that is a view
of its input. The in-place ops copy such an input before updating m (an O(dims) address-range
test per input, so inputs that do not overlap m are used as they are); the result is that of
the same call on copied inputs. m itself must not have overlapping elements (ValueError).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..backends import as_rows, check_storage, row_view
from ..bridge import split_phase

CPU_CHUNK = 1 << 20  # elements of x per chunk of the CPU path (x, v and one source: 12 MiB in float32)
#: A step's transition of (x, v): a float h for the F form [[1, h], [0, 1]], or (p_xx, p_xv, p_vx, p_vv).
Transition = float | tuple[float, float, float, float]


# ----------------------------------------------------------------------------- validation


def _x_shape(m: torch.Tensor) -> tuple[int, ...]:
    check_storage("m", m)
    if m.dim() < 2 or m.shape[1] % 2:
        raise ValueError(f"m must be [B, 2C, ...] with an even dim 1, got shape {tuple(m.shape)}")
    return (m.shape[0], m.shape[1] // 2, *m.shape[2:])


def _check_like_x(name: str, t: torch.Tensor, m: torch.Tensor, x_shape: tuple[int, ...]) -> None:
    """t must be a storage-dtype tensor of x's shape with m's dtype and device."""
    check_storage(name, t)
    if tuple(t.shape) != x_shape:
        raise ValueError(f"{name} must have m's x-shape {x_shape}, got {tuple(t.shape)}")
    if t.dtype != m.dtype:
        raise TypeError(f"{name} must have m's dtype {m.dtype}, got {t.dtype}")
    if t.device != m.device:
        raise ValueError(f"{name} must be on m's device {m.device}, got {t.device}")


# ----------------------------------------------------------------------------- CPU fast path


def _cpu_affine(
    m: torch.Tensor, h: Transition, terms: Sequence[tuple[torch.Tensor | None, float, float]],
    views: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """In place: (x, v) <- Phi (x, v) + sum_k (a_k, b_k) S_k, for terms (S_k, a_k, b_k).

    h: the transition Phi, a float h for [[1, h], [0, 1]] (the F form) or (p_xx, p_xv, p_vx, p_vv).
    Sources S_k have x's shape (a None source must have a = b = 0; zero coefficients are
    skipped). In-place float32 ops, source-major (x and v stay in cache while each S_k is read
    once), over chunks of about CPU_CHUNK elements of x (whole rows, or a row's columns) so
    that the operands of a chunk stay in the last-level cache; each op is parallelized by
    torch. 16-bit states are widened per chunk and rounded once on the way back. views: m's
    (x, v) = split_phase(m), when the caller keeps them across calls on the same m (a loop).
    """
    B = m.shape[0]
    n = math.prod(m.shape[1:]) // 2
    if B * n == 0:
        return m
    if m.dtype == torch.float32 and n < CPU_CHUNK and B <= CPU_CHUNK // n and m.is_contiguous():
        # One chunk holds the whole state: the same ops on m's own views of x and v (no reshaping;
        # a sampler loop calls this every step on small states, where the per-call work counts).
        x, v = split_phase(m) if views is None else views
        _affine(x, v, h, terms)
        return m
    view = row_view(m, B, 2 * n)
    rows = m.contiguous().view(B, 2 * n) if view is None else view
    terms = [(as_rows(S, B, n), a, b) for S, a, b in terms if a != 0.0 or b != 0.0]
    widen = m.dtype != torch.float32
    if n >= CPU_CHUNK:
        blocks = [(b, b + 1, j, min(n, j + CPU_CHUNK)) for b in range(B) for j in range(0, n, CPU_CHUNK)]
    else:
        per = CPU_CHUNK // n
        blocks = [(b, min(B, b + per), 0, n) for b in range(0, B, per)]
    for b0, b1, j0, j1 in blocks:
        x = rows[b0:b1, j0:j1]
        v = rows[b0:b1, n + j0 : n + j1]
        x32, v32 = (x.float(), v.float()) if widen else (x, v)
        _affine(x32, v32, h, [(S[b0:b1, j0:j1], a, b) for S, a, b in terms])
        if widen:
            x.copy_(x32)
            v.copy_(v32)
    if view is None:
        m.copy_(rows.view_as(m))
    return m


def _affine(
    x: torch.Tensor, v: torch.Tensor, h: Transition, terms: Sequence[tuple[torch.Tensor | None, float, float]]
) -> None:
    """(x, v) <- Phi (x, v) + sum_k (a_k, b_k) S_k in place, float32 (docs/math.md §7.4, "One step path").

    F form (h a float): x += h v, then the sources: the published update's ops. A full transition
    (a, b, c, d) with d != 0 and det = a d - b c != 0 takes no temporary: v~ = v + (c/d) x and
    x~ = x + (b d / det) v~, the sources added with their coefficients divided by the scales
    s_x = det / d and s_v = d, and finally x = s_x x~, v = s_v v~ (equal to a x + b v and
    c x + d v in exact arithmetic; scaling keeps the relative rounding of x~ and v~).
    """
    sx = sv = 1.0
    if not isinstance(h, tuple):
        if h != 0.0:
            x.add_(v, alpha=h)
    else:
        a, b, c, d = h
        det = a * d - b * c
        if d != 0.0 and det != 0.0:
            if c != 0.0:
                v.add_(x, alpha=c / d)
            if b != 0.0:
                x.add_(v, alpha=b * d / det)
            sx, sv = det / d, d
        else:  # a singular or v-annihilating transition: with a temporary
            x_new = x * a + v * b
            v.mul_(d).add_(x, alpha=c)
            x.copy_(x_new)
    for S, a_k, b_k in terms:
        if a_k != 0.0:
            x.add_(S, alpha=a_k if sx == 1.0 else a_k / sx)
        if b_k != 0.0:
            v.add_(S, alpha=b_k if sv == 1.0 else b_k / sv)
    if sx != 1.0:
        x.mul_(sx)
    if sv != 1.0:
        v.mul_(sv)


def _write_back(m: torch.Tensor, x_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
    x, v = split_phase(m)
    x.copy_(x_new)
    v.copy_(v_new)
    return m
