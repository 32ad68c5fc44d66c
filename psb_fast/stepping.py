"""Sampler hot paths with backend dispatch: multistep ODE update, hop, SDE steps (docs/math.md §7, §8, §9).

The phase state is m = [x | v], [B, 2C, ...] (x = m[:, :C], v = m[:, C:]); model outputs F
have x's shape [B, C, ...] and m's dtype and device. Storage dtypes: float32, bfloat16,
float16; element math is float32 (float64 for "reference"); per-step scalars are float64
(docs/math.md §12).

Backends:
- "triton": the fused kernels of `psb_fast.kernels.step` / `psb_fast.kernels.noise` (CUDA
  tensors, or CPU tensors under TRITON_INTERPRET=1), imported on first use (so Triton is
  needed only for this backend);
- "cpu": in-place float32 torch ops (x.add_(v, alpha=h), x.add_(F, alpha=c), ...), source-
  major over chunks that stay in the last-level cache, each op parallelized by torch;
- "reference": plain float64 torch (`psb_fast.float64_backend`; the hop is
  `PhaseBridge.estimate_x1`), written back into m;
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
from typing import NamedTuple

import torch

from . import float64_backend as f64
from .backends import (
    as_rows,
    check_no_internal_overlap,
    check_storage,
    kernel_module,
    real_scalar,
    resolve_backend,
    row_view,
    unaliased,
)
from .bridge import PhaseBridge, check_t, split_phase
from .multistep import MAX_HISTORY, multistep_coefficients

SDE_KINDS = ("exact", "em", "sscs_half")
CPU_CHUNK = 1 << 20  # elements of x per chunk of the CPU path (x, v and one source: 12 MiB in float32)
SEED_LIMIT = 1 << 63

Chol = tuple[float, float, float]


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


def _real(name: str, value: object) -> float:
    """value as a finite float (Python/NumPy real number or a one-element real tensor)."""
    value = real_scalar(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _step_size(name: str, value: object) -> float:
    h = _real(name, value)
    if h < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {h}")
    return h


def _coefficients(name: str, values: object) -> list[float]:
    """A sequence (or 1-D tensor) of finite numbers as a list of floats."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        values = values.tolist()
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    return [_real(f"{name}[{j}]", c) for j, c in enumerate(values)]


def _seed(seed: object) -> int:
    """seed as an int in [0, 2^63); None draws one from torch's default generator."""
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2^63), got {seed}")
    return seed


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
    return xi[0], xi[1]


# ----------------------------------------------------------------------------- CPU fast path


def _cpu_affine(
    m: torch.Tensor, h: float, terms: Sequence[tuple[torch.Tensor | None, float, float]],
    views: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """In place: x <- x + h v + sum_k a_k S_k;  v <- v + sum_k b_k S_k, for terms (S_k, a_k, b_k).

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
        if h != 0.0:
            x.add_(v, alpha=h)
        for S, a, b in terms:
            if a != 0.0:
                x.add_(S, alpha=a)
            if b != 0.0:
                v.add_(S, alpha=b)
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
        if h != 0.0:
            x32.add_(v32, alpha=h)
        for S, a, b in terms:
            chunk = S[b0:b1, j0:j1]
            if a != 0.0:
                x32.add_(chunk, alpha=a)
            if b != 0.0:
                v32.add_(chunk, alpha=b)
        if widen:
            x.copy_(x32)
            v.copy_(v32)
    if view is None:
        m.copy_(rows.view_as(m))
    return m


def _draw_xi(
    x_shape: tuple[int, ...], seed: int, device: torch.device, need_x: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Host-drawn (xi_x, xi_v) for the cpu/reference backends: torch's generator seeded with
    `seed`, xi_v first; xi_x is None unless needed (Euler-Maruyama has Lxx = Lxv = 0)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    xi_v = torch.randn(x_shape, generator=generator, device=device)
    xi_x = torch.randn(x_shape, generator=generator, device=device) if need_x else None
    return xi_x, xi_v


def _write_back(m: torch.Tensor, x_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
    x, v = split_phase(m)
    x.copy_(x_new)
    v.copy_(v_new)
    return m


# ----------------------------------------------------------------------------- multistep ODE


def phase_step(
    m: torch.Tensor,
    F_hist: Sequence[torch.Tensor],
    h: float,
    Cx: Sequence[float],
    Cv: Sequence[float],
    backend: str = "auto",
) -> torch.Tensor:
    """One exponential multistep ODE update of m in place (docs/math.md §7); returns m.

        x <- x + h v + sum_j Cx[j] F_hist[j],    v <- v + sum_j Cv[j] F_hist[j]

    m: [B, 2C, ...] state [x | v]; F_hist: 1..4 model outputs [B, C, ...], newest first,
    m's dtype and device (non-contiguous ones are read through their strides or copied once);
    h: step size t_{i+1} - t_i (finite, >= 0); Cx, Cv: the step's coefficients (sequences or
    1-D tensors of len(F_hist) floats). The SSCS middle update v += h N F is
    phase_step(m, [F], 0.0, [0.0], [h * N]). F_hist entries that share memory with m (views
    of m) are copied first, so the result is that of the call on copies.
    """
    x_shape = _x_shape(m)
    check_no_internal_overlap("m", m)
    if isinstance(F_hist, torch.Tensor) or not isinstance(F_hist, Sequence):
        raise TypeError(f"F_hist must be a sequence of tensors, got {type(F_hist).__name__}")
    if not 1 <= len(F_hist) <= MAX_HISTORY:
        raise ValueError(f"F_hist must hold 1..{MAX_HISTORY} tensors, got {len(F_hist)}")
    for j, F in enumerate(F_hist):
        _check_like_x(f"F_hist[{j}]", F, m, x_shape)
    h = _step_size("h", h)
    Cx, Cv = _coefficients("Cx", Cx), _coefficients("Cv", Cv)
    for name, coeffs in (("Cx", Cx), ("Cv", Cv)):
        if len(coeffs) != len(F_hist):
            raise ValueError(f"{name} must have len(F_hist) = {len(F_hist)} entries, got {len(coeffs)}")
    backend = resolve_backend(backend, m)
    return _phase_step_unchecked(m, [unaliased(F, m) for F in F_hist], h, Cx, Cv, backend)


def _phase_step_unchecked(
    m: torch.Tensor, F_hist: Sequence[torch.Tensor], h: float, Cx: Sequence[float], Cv: Sequence[float],
    backend: str, views: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`phase_step` on arguments that are already valid, for loops that validate once per call
    (PhaseSampler): backend resolved ("triton", "cpu" or "reference"), F_hist not sharing memory
    with m, h, Cx, Cv floats; views: split_phase(m), kept by the loop ("cpu"). Nothing is checked."""
    if backend == "triton":
        return kernel_module("step").phase_step(m, F_hist, h, Cx, Cv)
    if backend == "cpu":
        return _cpu_affine(m, h, list(zip(F_hist, Cx, Cv, strict=True)), views)
    x, v = split_phase(m)
    return _write_back(m, *f64.ode_step(x, v, h, Cx, Cv, F_hist))


# ----------------------------------------------------------------------------- hop


def phase_hop(
    bridge: PhaseBridge, m: torch.Tensor, F: torch.Tensor, T: float, backend: str = "auto"
) -> torch.Tensor:
    """The sampling hop (docs/math.md §8): x1 estimated at t = T from m and the output F at T.

    probODE: x1_hat = (N F + P (aa x + bb v)) / den;  SDE: x1_hat = (N F / P + v) tau + x,
    all scalars from bridge.coefficients(T) in float64. m: [B, 2C, ...]; F: [B, C, ...] (m's
    dtype and device); T: a time in [0, 1) (float or one-element tensor). Returns a new
    [B, C, ...] tensor in m's dtype; m is not modified.
    """
    if not isinstance(bridge, PhaseBridge):
        raise TypeError(f"bridge must be a PhaseBridge, got {type(bridge).__name__}")
    x_shape = _x_shape(m)
    _check_like_x("F", F, m, x_shape)
    T = float(check_t(_real("T", T), "T"))
    backend = resolve_backend(backend, m)
    if backend == "reference":
        return bridge.estimate_x1(m, F, T)
    return _phase_hop_unchecked(m, F, bridge.hop_weights(T), backend)


def _phase_hop_unchecked(
    m: torch.Tensor, F: torch.Tensor, weights: tuple[float, float, float], backend: str,
    views: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`phase_hop` for the "cpu" and "triton" backends on valid arguments, with the weights
    (a_F, a_x, a_v) = bridge.hop_weights(T) given (loops compute them once); views: split_phase(m),
    kept by the loop ("cpu"). Nothing is checked."""
    a_f, a_x, a_v = weights
    if backend == "triton":
        return kernel_module("step").phase_hop_weighted(m, F, a_f, a_x, a_v)
    x, v = split_phase(m) if views is None else views
    out = x.mul(a_x) if x.dtype == torch.float32 else x.to(torch.float32).mul_(a_x)  # a new float32 tensor
    out.add_(v, alpha=a_v).add_(F, alpha=a_f)
    return out if out.dtype == m.dtype else out.to(m.dtype)


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
    prod(rest) reproduces the whole batch's numbers; "cpu" and "reference" draw from torch's
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
    t = float(check_t(_real("t", t)))
    h = _step_size("h", h)
    if t + h >= 1.0:
        raise ValueError(f"t + h must be < 1 (the step ends before t = 1), got t={t}, h={h}")
    if (cx is None) != (cv is None):
        raise ValueError(f"cx and cv must be given together, got cx={cx}, cv={cv}")
    if cx is not None:
        if kind != "exact":
            raise ValueError(f"cx, cv are only used by kind='exact', got kind={kind!r}")
        cx, cv = _real("cx", cx), _real("cv", cv)
    if xi is not None:
        xi = _check_xi(xi, m, x_shape)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    seed = _seed(seed)
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
        return kernel_module("noise").phase_noise_update(m, F, h, step.drift_x, step.drift_v, chol, seed,
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
        new = (x.double(), v.double()) if F is None else f64.ode_step(x, v, h, *drift)
    elif step.kind == "exact":
        new = f64.add_noise(*f64.ode_step(x, v, h, *drift), chol, *xi)
    elif step.kind == "em":
        new = f64.em_step(x, v, h, step.N, step.g, F, xi[1])
    else:  # sscs_half: x += h v, then the noise
        new = f64.add_noise(*f64.ode_step(x, v, h, [], [], []), chol, *xi)
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

