"""The "float64" backend: the ops in plain float64 PyTorch (slow, simple, deterministic).

A production backend (called "reference" until that name was given to the oracle alone; the old
name still selects it, with a warning), selected with backend="float64" in `bridge_sample`,
`phase_step`, `phase_hop`, `sde_step`, `training_loss` and `PhaseSampler`.
The dispatch functions (`psb_fast.ops.bridge_sample`, `psb_fast.ops.phase_step`,
`psb_fast.ops.sde_step`, `psb_fast.train`) validate the arguments, compute the per-step scalars
(from `PhaseBridge` and the multistep coefficients) and call these element-math functions, which
read storage tensors, compute in float64 and return new float64 tensors (the dispatch casts or
writes back). The hop is `PhaseBridge.estimate_x1`, already float64.

This is not the test oracle: tests check this backend, like "cpu" and "triton", against the
independent transcription in `psb_fast.reference` (reference/, imported by tests only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..bridge import PhaseBridge

Chol = tuple[float, float, float]


def _rows(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row [B] float64 coefficient broadcast against `like` = [B, C, ...]."""
    return a.to(like.device).reshape((-1,) + (1,) * (like.dim() - 1))


def bridge_sample(
    bridge: PhaseBridge,
    x1: torch.Tensor,
    t64: torch.Tensor,
    eps_x: torch.Tensor | None,
    eps_v: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """m_t = [x_t | v_t] ([B, 2C, ...]) and label ([B, C, ...]) for data x1 [B, C, ...] at t64 [B].

    x_t = cx x1 + Lxx eps_x;  v_t = cv x1 + Lxv eps_x + Lvv eps_v;  label = label_x1 x1 +
    label_eps_x eps_x + label_eps_v eps_v (docs/math.md §5.1). eps_x, eps_v: the noise (x1's
    shape); drawn when not given from `generator`, eps_x first, as float64 normals. Math in
    float64, outputs in x1's dtype. t64: validated float64 times.
    """
    if eps_x is None:
        eps_x = torch.randn(x1.shape, generator=generator, dtype=torch.float64, device=x1.device)
    if eps_v is None:
        eps_v = torch.randn(x1.shape, generator=generator, dtype=torch.float64, device=x1.device)
    co = bridge.coefficients(t64)
    x1d, ex, ev = x1.double(), eps_x.double(), eps_v.double()
    x_t = _rows(co.cx, x1d) * x1d + _rows(co.lxx, x1d) * ex
    v_t = _rows(co.cv, x1d) * x1d + _rows(co.lxv, x1d) * ex + _rows(co.lvv, x1d) * ev
    label = (
        _rows(co.label_x1, x1d) * x1d
        + _rows(co.label_eps_x, x1d) * ex
        + _rows(co.label_eps_v, x1d) * ev
    )
    return torch.cat([x_t, v_t], dim=1).to(x1.dtype), label.to(x1.dtype)


def phase_step(
    x: torch.Tensor, v: torch.Tensor, h: float | tuple[float, float, float, float],
    Cx: Sequence[float], Cv: Sequence[float], F_hist: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The multistep update (docs/math.md §7.1, §7.4) as new float64 (x', v'); F_hist newest first.

    h: a step size (x' = x + h v, v' = v: the F form) or a transition (p_xx, p_xv, p_vx, p_vv)
    (x' = p_xx x + p_xv v, v' = p_vx x + p_vv v); then x' += sum_j Cx_j F_j, v' += sum_j Cv_j F_j.
    """
    xd, vd = x.double(), v.double()
    if isinstance(h, tuple):
        p_xx, p_xv, p_vx, p_vv = h
        x_new, v_new = p_xx * xd + p_xv * vd, p_vx * xd + p_vv * vd
    else:
        x_new, v_new = xd + h * vd, vd.clone()
    for cx, cv, F in zip(Cx, Cv, F_hist, strict=True):
        x_new = x_new + cx * F.double()
        v_new = v_new + cv * F.double()
    return x_new, v_new


def add_noise(
    x: torch.Tensor, v: torch.Tensor, chol: Chol, xi_x: torch.Tensor, xi_v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + Lxx xi_x, v + Lxv xi_x + Lvv xi_v) in float64 (docs/math.md §9.1), chol = (Lxx, Lxv, Lvv)."""
    lxx, lxv, lvv = chol
    return x.double() + lxx * xi_x.double(), v.double() + lxv * xi_x.double() + lvv * xi_v.double()


def em_step(
    x: torch.Tensor, v: torch.Tensor, h: float, normalizer: float, g: float,
    F: torch.Tensor, xi_v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler-Maruyama (docs/math.md §9): x += h v;  v += h N F + g sqrt(h) xi_v, in float64."""
    x_new = x.double() + h * v.double()
    v_new = v.double() + h * normalizer * F.double() + g * math.sqrt(h) * xi_v.double()
    return x_new, v_new


def training_loss(F: torch.Tensor, label: torch.Tensor, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """mean((w(t) (F - label))^2) in float64 (docs/math.md §5.3): w = 1/sqrt(1 - t) for
    "reciprocal", 1 for "none". Arguments are validated by `psb_fast.train.training_loss`."""
    if weighting == "reciprocal":
        w = _rows(1.0 / torch.sqrt(1.0 - t.double()), F)
    else:
        w = torch.ones((), dtype=torch.float64, device=F.device)
    return ((w * (F.double() - label.double())) ** 2).mean()
