"""phase_step and phase_hop: the multistep ODE update and the sampling hop, with backend dispatch
(docs/math.md §7, §8).

Backends: "triton" runs the fused kernels of `psb_fast.kernels.phase_step` (imported on first
use), "cpu" the in-place float32 torch path, "reference" plain float64 torch
(`psb_fast.ops.float64`; the hop is `PhaseBridge.estimate_x1`). State layout, storage dtypes,
argument checks and aliasing: `psb_fast.ops._common`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backends import check_no_internal_overlap, kernel_module, resolve_backend, unaliased
from ..bridge import PhaseBridge, check_t, split_phase
from ..multistep import MAX_HISTORY
from . import float64 as f64
from ._common import _check_like_x, _cpu_affine, _real, _step_size, _write_back, _x_shape

# ----------------------------------------------------------------------------- validation


def _coefficients(name: str, values: object) -> list[float]:
    """A sequence (or 1-D tensor) of finite numbers as a list of floats."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        values = values.tolist()
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    return [_real(f"{name}[{j}]", c) for j, c in enumerate(values)]


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
        return kernel_module("phase_step").phase_step(m, F_hist, h, Cx, Cv)
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
        return kernel_module("phase_step").phase_hop_weighted(m, F, a_f, a_x, a_v)
    x, v = split_phase(m) if views is None else views
    out = x.mul(a_x) if x.dtype == torch.float32 else x.to(torch.float32).mul_(a_x)  # a new float32 tensor
    out.add_(v, alpha=a_v).add_(F, alpha=a_f)
    return out if out.dtype == m.dtype else out.to(m.dtype)
