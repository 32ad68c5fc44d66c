"""sde_step: one stochastic step of m = [x | v] in place, with backend dispatch (docs/math.md §9), and
its float64 scalars (`SDEScalars`: drift coefficients, noise covariance and its Cholesky factor).

Backends: "triton" runs the fused kernel of `psb_fast.kernels.sde_step` (imported on first use;
Philox noise drawn in the kernel), "cpu" the in-place float32 torch path, "float64" plain
float64 torch (`psb_fast.ops.float64`); "cpu" and "float64" draw the noise from torch's
generator. State layout, storage dtypes, argument checks and aliasing: `psb_fast.ops._common`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import checks
from ..backends import check_no_grad, check_no_internal_overlap, kernel_module, resolve_backend, unaliased
from ..bridge import PhaseBridge, check_t, split_phase
from ..multistep import multistep_coefficients
from ..seeds import check_seed
from . import float64 as f64
from ._common import _check_like_x, _cpu_affine, _write_back, _x_shape

SDE_KINDS = ("exact", "em", "sscs_half")

Chol = tuple[float, float, float]


# ----------------------------------------------------------------------------- validation


def _check_xi(xi: object, m: torch.Tensor, x_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(xi, (tuple, list)) and len(xi) == 2):
        raise TypeError(f"xi must be a pair (xi_x, xi_v) of tensors, got {type(xi).__name__}")
    for name, t in zip(("xi[0]", "xi[1]"), xi, strict=True):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
        if tuple(t.shape) != x_shape:
            raise ValueError(f"{name} must have m's x-shape {x_shape}, got {tuple(t.shape)}")
        if t.device != m.device:
            raise ValueError(f"{name} must be on m's device {m.device}, got {t.device}")
        check_no_grad(name, t)
    return xi[0], xi[1]


# ----------------------------------------------------------------------------- noise


def _draw_xi(
    x_shape: tuple[int, ...], seed: int, device: torch.device, need_x: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Host-drawn (xi_x, xi_v) for the cpu/float64 backends: torch's generator seeded with
    `seed`, xi_v first; xi_x is None unless needed (Euler-Maruyama has Lxx = Lxv = 0)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    xi_v = torch.randn(x_shape, generator=generator, device=device)
    xi_x = torch.randn(x_shape, generator=generator, device=device) if need_x else None
    return xi_x, xi_v


# ----------------------------------------------------------------------------- SDE steps


def transition_covariance(p: float, t: float, h: float) -> tuple[float, float, float]:
    """Exact covariance (Qxx, Qxv, Qvv) of the free double integrator driven by g(s) = p (1 - s)
    over [t, t + h] (docs/math.md §9.2): Q = int g(s)^2 [[r^2, r], [r, 1]] ds, r = t + h - s."""
    u = 1.0 - t - h
    p2 = p * p
    qxx = p2 * (u * u * h**3 / 3 + u * h**4 / 2 + h**5 / 5)
    qxv = p2 * (u * u * h**2 / 2 + 2 * u * h**3 / 3 + h**4 / 4)
    qvv = p2 * ((u + h) ** 3 - u**3) / 3
    return qxx, qxv, qvv


def sscs_half_covariance(p: float, t: float, s: float) -> tuple[float, float, float]:
    """Compat SSCS half-step noise covariance (docs/math.md §9),
    G^2 [s^3 (s^2 - 5s + 10) / 30, s^2 (s^2 - 4s + 6) / 12, s (s^2 - 3s + 3) / 3], G = p (1 - t)."""
    G2 = (p * (1.0 - t)) ** 2
    return (
        G2 * s**3 * (s * s - 5 * s + 10) / 30,
        G2 * s**2 * (s * s - 4 * s + 6) / 12,
        G2 * s * (s * s - 3 * s + 3) / 3,
    )


def noise_cholesky(cov: tuple[float, float, float]) -> Chol | None:
    """Lower Cholesky factor (Lxx, Lxv, Lvv) of [[Sxx, Sxv], [Sxv, Svv]] (docs/math.md §9.1):
    Lvv = sqrt(det / Sxx), det clamped at 0; (0, 0, sqrt(Svv)) if Sxx = 0; None if cov is zero."""
    sxx, sxv, svv = cov
    if sxx > 0:
        lxx = math.sqrt(sxx)
        return lxx, sxv / lxx, math.sqrt(max(sxx * svv - sxv * sxv, 0.0) / sxx)
    return (0.0, 0.0, math.sqrt(svv)) if svv > 0 else None


def sde_step(
    kind: str,
    m: torch.Tensor,
    F: torch.Tensor | None,
    bridge: PhaseBridge,
    t: float,
    h: float,
    *,
    cx: float | None = None,
    cv: float | None = None,
    seed: int | None = None,
    offset: int = 0,
    xi: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One stochastic step of m = [x | v] in place (docs/math.md §9, SDE models); returns m.

    kind:
      "exact":     m <- Phi(h) m + (cx, cv) F + chol(Q(t, h)) xi, Q the exact transition
                   covariance over [t, t + h]; cx, cv default to the exact order-0 integrals
                   int (t+h-s) N(s) ds and int N(s) ds (Gauss-Legendre; pass them, e.g. from
                   a cached `multistep_coefficients(..., order=0)`, to skip the quadrature);
      "em":        Euler-Maruyama, x += h v; v += h N(t) F + g(t) sqrt(h) xi_v;
      "sscs_half": compat SSCS half step with s = h: x += s v plus noise with covariance
                   sscs_half_covariance(p, t, s); F must be None (the middle update
                   v += h N F is `phase_step(m, [F], 0.0, [0.0], [h * N])`).
    m: [B, 2C, ...]; F: [B, C, ...] model output at t (m's dtype and device); bridge: the
    model's PhaseBridge (mode "SDE" for SDE-trained models; N is its normalizer); t in [0, 1)
    and h >= 0 with t + h < 1.
    Noise: xi = (xi_x, xi_v) tensors of x's shape to supply it (debug/oracle), else drawn from
    `seed` (None: drawn from torch's default generator). "triton" draws Philox numbers keyed
    by (seed, offset + element index), so a chunk of rows [b0, b1) run with offset = b0 * C *
    prod(rest) reproduces the whole batch's numbers; "cpu" and "float64" draw from torch's
    generator seeded with `seed` (other numbers, same law; offset must be 0).
    F and xi may be views of m: they are copied first (the result is that of the call on copies).
    """
    if not isinstance(kind, str) or kind not in SDE_KINDS:
        raise ValueError(f"kind must be one of {SDE_KINDS}, got {kind!r}")
    if not isinstance(bridge, PhaseBridge):
        raise TypeError(f"bridge must be a PhaseBridge, got {type(bridge).__name__}")
    x_shape = _x_shape(m)
    check_no_internal_overlap("m", m)
    if kind == "sscs_half":
        if F is not None:
            raise ValueError("F must be None for kind='sscs_half' (the half step has no drift term)")
    elif F is None:
        raise ValueError(f"F (the model output at t) is required for kind={kind!r}")
    else:
        _check_like_x("F", F, m, x_shape)
    t = float(check_t(checks.finite("t", t)))
    h = checks.step_size("h", h)
    if t + h >= 1.0:
        raise ValueError(f"t + h must be < 1 (the step ends before t = 1), got t={t}, h={h}")
    if (cx is None) != (cv is None):
        raise ValueError(f"cx and cv must be given together, got cx={cx}, cv={cv}")
    if cx is not None:
        if kind != "exact":
            raise ValueError(f"cx, cv are only used by kind='exact', got kind={kind!r}")
        cx, cv = checks.finite("cx", cx), checks.finite("cv", cv)
    if xi is not None:
        xi = _check_xi(xi, m, x_shape)
    offset = checks.count("offset", offset, 0)
    seed = check_seed(seed, draw_below=2**62)
    backend = resolve_backend(backend, m)
    if backend != "triton" and offset != 0 and xi is None:
        raise ValueError(f"offset must be 0 for backend={backend!r} (only 'triton' keys noise by index)")
    if F is not None:
        F = unaliased(F, m)
    if xi is not None:
        xi = (unaliased(xi[0], m), unaliased(xi[1], m))

    step = _sde_scalars(kind, bridge, t, h, cx, cv)
    return _sde_step_unchecked(m, F, step, seed, offset, xi, backend)


class SDEScalars(NamedTuple):
    """The float64 scalars of one SDE step (docs/math.md §9): x += h v + drift_x F, v += drift_v F,
    plus noise with the Cholesky factor chol (None: no noise, h = 0); N, g: N(t) and g(t) ("em")."""

    kind: str
    h: float
    drift_x: float
    drift_v: float
    chol: Chol | None
    N: float = 0.0
    g: float = 0.0


def _sde_scalars(
    kind: str, bridge: PhaseBridge, t: float, h: float, cx: float | None = None, cv: float | None = None,
    N: float | None = None,
) -> SDEScalars:
    """The scalars of `sde_step(kind, ..., t, h, cx=cx, cv=cv)` for valid t, h; N: N(t) for "em"
    when already known (else bridge.coefficients(t).normalizer)."""
    p, g = bridge.p, bridge.p * (1.0 - t)
    if kind == "exact":
        if cx is None:
            cx, cv = _order0_coefficients(bridge, t, h)
        chol = noise_cholesky(transition_covariance(p, t, h)) if h > 0 else None
        return SDEScalars(kind, h, cx, cv, chol)
    if kind == "em":
        N = bridge.coefficients(t).normalizer.item() if N is None else N
        chol = (0.0, 0.0, g * math.sqrt(h)) if h > 0 else None
        return SDEScalars(kind, h, 0.0, h * N, chol, N, g)
    chol = noise_cholesky(sscs_half_covariance(p, t, h)) if h > 0 else None
    return SDEScalars(kind, h, 0.0, 0.0, chol)


def _sde_step_unchecked(
    m: torch.Tensor, F: torch.Tensor | None, step: SDEScalars, seed: int, offset: int,
    xi: tuple[torch.Tensor, torch.Tensor] | None, backend: str,
    views: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`sde_step` on arguments that are already valid, for loops that validate once per call
    (PhaseSampler): step from `_sde_scalars`, backend resolved, F and xi not sharing memory with
    m, seed an int in [0, 2^63); views: split_phase(m), kept by the loop ("cpu"). Nothing is
    checked here."""
    h, chol = step.h, step.chol
    if backend == "triton":
        return kernel_module("sde_step").sde_step(m, F, h, step.drift_x, step.drift_v, chol, seed,
                                                             offset, xi)
    if chol is not None and xi is None:
        x_shape = (m.shape[0], m.shape[1] // 2, *m.shape[2:])
        xi = _draw_xi(x_shape, seed, m.device, need_x=step.kind != "em")
    if backend == "cpu":
        terms = [] if F is None else [(F, step.drift_x, step.drift_v)]
        if chol is not None:
            lxx, lxv, lvv = chol
            terms += [(xi[0], lxx, lxv), (xi[1], 0.0, lvv)]
        return _cpu_affine(m, h, terms, views)
    x, v = split_phase(m)
    drift = ([step.drift_x], [step.drift_v], [F]) if F is not None else ([], [], [])
    if chol is None:  # h = 0: no noise
        new = (x.double(), v.double()) if F is None else f64.phase_step(x, v, h, *drift)
    elif step.kind == "exact":
        new = f64.add_noise(*f64.phase_step(x, v, h, *drift), chol, *xi)
    elif step.kind == "em":
        new = f64.em_step(x, v, h, step.N, step.g, F, xi[1])
    else:  # sscs_half: x += h v, then the noise
        new = f64.add_noise(*f64.phase_step(x, v, h, [], [], []), chol, *xi)
    return _write_back(m, *new)


def _order0_coefficients(bridge: PhaseBridge, t: float, h: float) -> tuple[float, float]:
    """(int_t^{t+h} (t+h-s) N(s) ds, int_t^{t+h} N(s) ds) in float64; zeros for h = 0.

    A step below float64's resolution at t (t + h == t, so no quadrature grid exists) takes
    N as constant over it: (h^2 N(t) / 2, h N(t)).
    """
    if h == 0.0:
        return 0.0, 0.0
    if t + h == t:
        N = bridge.coefficients(t).normalizer.item()
        return 0.5 * h * h * N, h * N
    co = multistep_coefficients(bridge, torch.tensor([t, t + h], dtype=torch.float64), order=0)
    return co.Cx[0, 0].item(), co.Cv[0, 0].item()
