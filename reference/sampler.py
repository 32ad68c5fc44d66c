"""Plain-PyTorch reference samplers (docs/math.md §10.3): slow, float64, obviously right. The oracle.

Each sampler is a flat loop over a time grid: `model(m, t) -> F` with m = [x | v]
([B, 2C, ...], in m0's dtype) and t a [B] tensor; the state is kept in float64.
With hop=True the grid ends at T and the output is the hop estimate of x1 at T; with
hop=False one more step runs from T to t_end and the output is x(t_end).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from psb_fast.bridge import PhaseBridge

from . import phase_step, sde_step
from .multistep import multistep_coefficients
from .phase_step import hop_reference
from .variants import VARIANT_FORMS, variant_tables

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
T_END = 0.999


def _evaluate(model: Model, x: torch.Tensor, v: torch.Tensor, t: float, dtype: torch.dtype):
    """F(m, t) for the float64 state (x, v), the model called in `dtype`."""
    m = torch.cat([x, v], dim=1).to(dtype)
    tt = torch.full((x.shape[0],), t, dtype=dtype, device=x.device)
    F = model(m, tt)
    if F.shape != x.shape:
        raise ValueError(f"model output at t={t} must have shape {tuple(x.shape)}, got {tuple(F.shape)}")
    return F.double()


def _split(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, v) of m = [x | v] along dim 1, as float64."""
    c = m.shape[1] // 2
    return m[:, :c].double(), m[:, c:].double()


def _finish(bridge: PhaseBridge, x, v, F, T: float, hop: bool, dtype: torch.dtype) -> torch.Tensor:
    if hop:
        return hop_reference(bridge, x, v, F, T).to(dtype)
    return x.to(dtype)


def sample_ode(
    model: Model, m0: torch.Tensor, bridge: PhaseBridge, grid: torch.Tensor, order: int = 2,
    hop: bool = True, t_end: float = T_END, progress: bool = False, callback=None,
) -> torch.Tensor:
    """Exponential multistep probability-flow ODE sampler of order `order` (0..3), NFE = len(grid)."""
    if bridge.mode != "probODE":
        raise ValueError(f"sample_ode needs a probODE bridge, got mode={bridge.mode!r}")
    co = multistep_coefficients(bridge, grid, order, None if hop else t_end)
    x, v = _split(m0)
    history: list[torch.Tensor] = []
    n = len(grid)
    for i in tqdm(range(n), disable=not progress, desc="sample_ode"):
        t = float(grid[i])
        F = _evaluate(model, x, v, t, m0.dtype)
        history = [F] + history[:order]
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "v": v, "F": F})
        if hop and i == n - 1:
            break
        q = min(i, order)
        # docs/math.md §7.1: x += h v + sum_j Cx_{i,j} F_{i-j};  v += sum_j Cv_{i,j} F_{i-j}.
        x, v = phase_step.phase_step(x, v, float(co.h[i]), co.Cx[i, : q + 1].tolist(),
                                   co.Cv[i, : q + 1].tolist(), history[: q + 1])
    return _finish(bridge, x, v, F, float(grid[-1]), hop, m0.dtype)


def sample_variant(
    model: Model, m0: torch.Tensor, bridge: PhaseBridge, grid: torch.Tensor, order: int = 2,
    variant: str = "data-corrector", hop: bool = True, t_end: float = T_END,
) -> torch.Tensor:
    """The probability-flow sampler of a solver variant (docs/math.md §7.4), NFE = len(grid).

    Y = F ("multistep", "multistep-corrector") or the hop's x1 estimate at each grid time ("data",
    "data-corrector"). Predictor: m_{i+1} = Phi_i m_i + sum_j C_{i,j} Y_{i-j}; with the corrector,
    evaluation i + 1 (at the predicted state) first adds D_{i,0} Y_{i+1} + sum_j D_{i,j+1} Y_{i-j};
    the history keeps Y_{i+1} of the predicted state, and the hop reads the corrected state.
    """
    if bridge.mode != "probODE":
        raise ValueError(f"sample_variant needs a probODE bridge, got mode={bridge.mode!r}")
    form, corrector = VARIANT_FORMS[variant]
    Phi, C, D = variant_tables(bridge, grid, order, form, None if hop else t_end)
    x, v = _split(m0)
    history: list[torch.Tensor] = []  # Y_i, Y_{i-1}, ... (newest first)
    n = len(grid)
    for i in range(n):
        t = float(grid[i])
        F = _evaluate(model, x, v, t, m0.dtype)
        Y = hop_reference(bridge, x, v, F, t) if form == "data" else F
        if corrector and i > 0:  # step i - 1 redone: m_i += D_{i-1,0} Y_i + sum_j D_{i-1,j+1} Y_{i-1-j}
            q = min(i - 1, order)
            sources = [Y] + history[: q + 1]
            d = D[i - 1, :, : q + 2]
            x, v = phase_step.phase_step(x, v, (1.0, 0.0, 0.0, 1.0), d[0].tolist(), d[1].tolist(), sources)
        history = [Y] + history[:order]
        if hop and i == n - 1:
            break
        q = min(i, order)
        phi = Phi[i].flatten().tolist()  # (p_xx, p_xv, p_vx, p_vv)
        x, v = phase_step.phase_step(x, v, phi, C[i, 0, : q + 1].tolist(), C[i, 1, : q + 1].tolist(),
                                     history[: q + 1])
    return _finish(bridge, x, v, F, float(grid[-1]), hop, m0.dtype)


def _sde_times(grid: torch.Tensor, hop: bool, t_end: float) -> list[tuple[float, float]]:
    times = grid.tolist()
    if not hop and not times[-1] < t_end < 1:
        raise ValueError(f"t_end must be in (T, 1) = ({times[-1]}, 1) without the hop, got {t_end}")
    ends = times[1:] + ([] if hop else [t_end])
    return list(zip(times[: len(ends)], ends, strict=True))


def _check_sde(bridge: PhaseBridge) -> None:
    if bridge.mode != "SDE":
        raise ValueError(f"SDE samplers need an SDE bridge, got mode={bridge.mode!r}")


def sample_sde_exact(
    model: Model, m0: torch.Tensor, bridge: PhaseBridge, grid: torch.Tensor, hop: bool = True,
    t_end: float = T_END, generator: torch.Generator | None = None, progress: bool = False,
) -> torch.Tensor:
    """Exact-noise exponential SDE step: m <- Phi(h) m + (Cx, Cv) F + chol(Q(t, h)) xi."""
    _check_sde(bridge)
    co = multistep_coefficients(bridge, grid, 0, None if hop else t_end)
    x, v = _split(m0)
    for i, (t, _) in enumerate(tqdm(_sde_times(grid, hop, t_end), disable=not progress)):
        F = _evaluate(model, x, v, t, m0.dtype)
        xi_x, xi_v = _noise(x, generator)
        x, v = sde_step.exact_noise_step(x, v, bridge.p, t, float(co.h[i]), float(co.Cx[i, 0]),
                                         float(co.Cv[i, 0]), F, xi_x, xi_v)
    F = _evaluate(model, x, v, float(grid[-1]), m0.dtype) if hop else None
    return _finish(bridge, x, v, F, float(grid[-1]), hop, m0.dtype)


def sample_em(
    model: Model, m0: torch.Tensor, bridge: PhaseBridge, grid: torch.Tensor, hop: bool = True,
    t_end: float = T_END, generator: torch.Generator | None = None, progress: bool = False,
) -> torch.Tensor:
    """Euler-Maruyama: x += h v; v += h N(t) F + g(t) sqrt(h) xi."""
    _check_sde(bridge)
    x, v = _split(m0)
    for t, t_next in tqdm(_sde_times(grid, hop, t_end), disable=not progress):
        F = _evaluate(model, x, v, t, m0.dtype)
        N = float(bridge.coefficients(t).normalizer)
        x, v = sde_step.em_step(x, v, bridge.p, t, t_next - t, N, F, _noise(x, generator)[1])
    F = _evaluate(model, x, v, float(grid[-1]), m0.dtype) if hop else None
    return _finish(bridge, x, v, F, float(grid[-1]), hop, m0.dtype)


def sample_sscs(
    model: Model, m0: torch.Tensor, bridge: PhaseBridge, grid: torch.Tensor, hop: bool = True,
    t_end: float = T_END, generator: torch.Generator | None = None, progress: bool = False,
) -> torch.Tensor:
    """Compat symmetric splitting: half step (s = h/2), v += h N F at the midpoint, half step."""
    _check_sde(bridge)
    x, v = _split(m0)
    for t, t_next in tqdm(_sde_times(grid, hop, t_end), disable=not progress):
        h = t_next - t
        s = 0.5 * h
        x, v = sde_step.sscs_half_step(x, v, bridge.p, t, s, *_noise(x, generator))
        F = _evaluate(model, x, v, t + s, m0.dtype)
        v = v + h * float(bridge.coefficients(t + s).normalizer) * F
        x, v = sde_step.sscs_half_step(x, v, bridge.p, t + s, s, *_noise(x, generator))
    F = _evaluate(model, x, v, float(grid[-1]), m0.dtype) if hop else None
    return _finish(bridge, x, v, F, float(grid[-1]), hop, m0.dtype)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    xi = torch.randn((2, *x.shape), generator=generator, dtype=torch.float64, device=x.device)
    return xi[0], xi[1]
