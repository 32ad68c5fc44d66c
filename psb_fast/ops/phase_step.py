"""phase_step and phase_hop: the multistep update of every solver variant (a 2x2 transition of
(x, v) plus weighted sources) and the sampling hop, with backend dispatch (docs/math.md §7, §8).

Backends: "triton" runs the fused kernels of `psb_fast.kernels.phase_step` (imported on first
use), "cpu" the in-place float32 torch path, "float64" plain float64 torch
(`psb_fast.ops.float64`; the hop is `PhaseBridge.estimate_x1`). State layout, storage dtypes,
argument checks and aliasing: `psb_fast.ops._common`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import checks
from ..backends import check_no_internal_overlap, kernel_module, resolve_backend, unaliased
from ..bridge import PhaseBridge, check_t, split_phase
from ..multistep import MAX_HISTORY
from . import float64 as f64
from ._common import Transition, _check_like_x, _cpu_affine, _write_back, _x_shape

# ----------------------------------------------------------------------------- validation


def _transition(value: object) -> Transition:
    """A step size h >= 0 (the F form [[1, h], [0, 1]]) as a float, or a transition of 4 finite
    numbers (p_xx, p_xv, p_vx, p_vv) as a tuple of floats."""
    is_tensor = isinstance(value, torch.Tensor)
    sequence = not is_tensor and isinstance(value, Sequence) and not isinstance(value, str)
    if is_tensor and value.numel() != 1 or sequence:
        values = checks.finite_list("h", value)
        if len(values) != 4:
            raise ValueError(f"h must be a step size or a transition (p_xx, p_xv, p_vx, p_vv), got "
                             f"{len(values)} numbers")
        return tuple(values)
    return checks.step_size("h", value)


# ----------------------------------------------------------------------------- the multistep update


def phase_step(
    m: torch.Tensor,
    F_hist: Sequence[torch.Tensor],
    h: float | Sequence[float],
    Cx: Sequence[float],
    Cv: Sequence[float],
    backend: str = "auto",
) -> torch.Tensor:
    """One affine multistep update of m in place (docs/math.md §7.1, §7.4); returns m.

        x <- p_xx x + p_xv v + sum_j Cx[j] F_hist[j],    v <- p_vx x + p_vv v + sum_j Cv[j] F_hist[j]

    m: [B, 2C, ...] state [x | v]; F_hist: 1..4 sources [B, C, ...] (model outputs, or the data
    form's estimates x1_hat), newest first, m's dtype and device (non-contiguous ones are read
    through their strides or copied once); h: the step size t_{i+1} - t_i (finite, >= 0) for the
    F form's transition [[1, h], [0, 1]], or the transition itself, four finite numbers (p_xx,
    p_xv, p_vx, p_vv) (a sequence or a 4-element tensor; the data form's Phi_i); Cx, Cv: the
    step's coefficients (sequences or 1-D tensors of len(F_hist) floats). The SSCS middle update
    v += h N F is phase_step(m, [F], 0.0, [0.0], [h * N]). F_hist entries that share memory with
    m (views of m) are copied first, so the result is that of the call on copies.
    """
    x_shape = _x_shape(m)
    check_no_internal_overlap("m", m)
    if isinstance(F_hist, torch.Tensor) or not isinstance(F_hist, Sequence):
        raise TypeError(f"F_hist must be a sequence of tensors, got {type(F_hist).__name__}")
    if not 1 <= len(F_hist) <= MAX_HISTORY:
        raise ValueError(f"F_hist must hold 1..{MAX_HISTORY} tensors, got {len(F_hist)}")
    for j, F in enumerate(F_hist):
        _check_like_x(f"F_hist[{j}]", F, m, x_shape)
    h = _transition(h)
    Cx, Cv = checks.finite_list("Cx", Cx), checks.finite_list("Cv", Cv)
    for name, coeffs in (("Cx", Cx), ("Cv", Cv)):
        if len(coeffs) != len(F_hist):
            raise ValueError(f"{name} must have len(F_hist) = {len(F_hist)} entries, got {len(coeffs)}")
    backend = resolve_backend(backend, m)
    return _phase_step_unchecked(m, [unaliased(F, m) for F in F_hist], h, Cx, Cv, backend)


def _phase_step_unchecked(
    m: torch.Tensor, F_hist: Sequence[torch.Tensor], h: Transition, Cx: Sequence[float], Cv: Sequence[float],
    backend: str, views: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`phase_step` on arguments that are already valid, for loops that validate once per call
    (PhaseSampler): backend resolved ("triton", "cpu" or "float64"), F_hist not sharing memory
    with m (any number of sources: the kernel takes them MAX_HISTORY at a time), h a float or a
    4-tuple of floats, Cx, Cv floats; views: split_phase(m), kept by the loop ("cpu"). Nothing
    is checked."""
    if backend == "triton":
        kernel = kernel_module("phase_step").phase_step
        for lo in range(0, max(len(F_hist), 1), MAX_HISTORY):  # later parts: identity transition
            hi = lo + MAX_HISTORY
            kernel(m, F_hist[lo:hi], h if lo == 0 else 0.0, Cx[lo:hi], Cv[lo:hi])
        return m
    if backend == "cpu":
        return _cpu_affine(m, h, list(zip(F_hist, Cx, Cv, strict=True)), views)
    x, v = split_phase(m)
    return _write_back(m, *f64.phase_step(x, v, h, Cx, Cv, F_hist))


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
    T = float(check_t(checks.finite("T", T), "T"))
    backend = resolve_backend(backend, m)
    if backend == "float64":
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
        return kernel_module("phase_step").phase_hop_weighted(m, F, a_f, a_x, a_v)
    x, v = split_phase(m) if views is None else views
    out = x.mul(a_x) if x.dtype == torch.float32 else x.to(torch.float32).mul_(a_x)  # a new float32 tensor
    out.add_(v, alpha=a_v).add_(F, alpha=a_f)
    return out if out.dtype == m.dtype else out.to(m.dtype)


def _scaled_hop_unchecked(
    m: torch.Tensor, F: torch.Tensor, r_x: float, r_v: float, backend: str,
    views: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Y = F + r_x x + r_v v, a new tensor: the hop estimate divided by its weight a_F (r_x = a_x /
    a_F, r_v = a_v / a_F), the data form's source (docs/math.md §7.4; the a_F is folded into the
    coefficients that multiply Y). m's dtype ("cpu", "triton") or float64 ("float64"). Unchecked."""
    if backend == "triton":
        return kernel_module("phase_step").phase_hop_weighted(m, F, 1.0, r_x, r_v)
    x, v = split_phase(m) if views is None else views
    if backend == "float64":
        return F.double() + x.double() * r_x + v.double() * r_v
    if F.dtype == torch.float32 and x.dtype == torch.float32:
        return torch.add(F, x, alpha=r_x).add_(v, alpha=r_v)
    return _phase_hop_unchecked(m, F, (1.0, r_x, r_v), backend, views)
