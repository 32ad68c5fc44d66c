"""Plain-PyTorch reference of one SDE step of each kind (docs/math.md §9): the oracle.

State is kept as separate x, v tensors ([B, C, ...]); all math in float64. The drift part of
the exact-noise step is the multistep update of `reference.phase_step`.
"""

from __future__ import annotations

import math

import torch

from .phase_step import phase_step


def transition_covariance(p: float, t: float, h: float) -> tuple[float, float, float]:
    """Exact covariance (Qxx, Qxv, Qvv) of the free double integrator, g(s) = p (1 - s), over [t, t+h]."""
    u = 1.0 - t - h
    p2 = p * p
    qxx = p2 * (u * u * h**3 / 3 + u * h**4 / 2 + h**5 / 5)
    qxv = p2 * (u * u * h**2 / 2 + 2 * u * h**3 / 3 + h**4 / 4)
    qvv = p2 * ((u + h) ** 3 - u**3) / 3
    return qxx, qxv, qvv


def cholesky2(sxx: float, sxv: float, svv: float) -> tuple[float, float, float]:
    """Lower Cholesky (lxx, lxv, lvv) of [[sxx, sxv], [sxv, svv]]; lvv via det/sxx."""
    lxx = math.sqrt(sxx)
    lxv = sxv / lxx
    lvv = math.sqrt(max(sxx * svv - sxv * sxv, 0.0) / sxx)
    return lxx, lxv, lvv


def add_noise(
    x: torch.Tensor, v: torch.Tensor, chol: tuple[float, float, float],
    xi_x: torch.Tensor, xi_v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + Lxx xi_x, v + Lxv xi_x + Lvv xi_v): noise with the 2x2 factor `chol`."""
    lxx, lxv, lvv = chol
    return x.double() + lxx * xi_x.double(), v.double() + lxv * xi_x.double() + lvv * xi_v.double()


def exact_noise_step(
    x: torch.Tensor, v: torch.Tensor, p: float, t: float, h: float,
    cx: float, cv: float, F: torch.Tensor, xi_x: torch.Tensor, xi_v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """m <- Phi(h) m + (cx, cv) F + chol(Q(t, h)) xi, Phi(h) = [[1, h], [0, 1]]."""
    x_new, v_new = phase_step(x, v, h, [cx], [cv], [F])
    return add_noise(x_new, v_new, cholesky2(*transition_covariance(p, t, h)), xi_x, xi_v)


def em_step(
    x: torch.Tensor, v: torch.Tensor, p: float, t: float, h: float,
    normalizer: float, F: torch.Tensor, xi_v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler-Maruyama: x += h v; v += h N F + g(t) sqrt(h) xi_v, g(t) = p (1 - t)."""
    g = p * (1.0 - t)
    x_new = x.double() + h * v.double()
    v_new = v.double() + h * normalizer * F.double() + g * math.sqrt(h) * xi_v.double()
    return x_new, v_new


def sscs_half_covariance(p: float, t: float, s: float) -> tuple[float, float, float]:
    """Compat SSCS half-step noise covariance G^2 [s^3(s^2-5s+10)/30, s^2(s^2-4s+6)/12, s(s^2-3s+3)/3]."""
    G2 = (p * (1.0 - t)) ** 2
    return (
        G2 * s**3 * (s * s - 5 * s + 10) / 30,
        G2 * s**2 * (s * s - 4 * s + 6) / 12,
        G2 * s * (s * s - 3 * s + 3) / 3,
    )


def sscs_half_step(
    x: torch.Tensor, v: torch.Tensor, p: float, t: float, s: float,
    xi_x: torch.Tensor, xi_v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compat SSCS half step: x += s v, plus noise with `sscs_half_covariance(p, t, s)`."""
    x_new = x.double() + s * v.double()
    return add_noise(x_new, v.double(), cholesky2(*sscs_half_covariance(p, t, s)), xi_x, xi_v)
