"""Plain-PyTorch reference of the multistep ODE update (docs/math.md §7) and the hop (§8): the oracle.

State is kept as separate x, v tensors ([B, C, ...]); all math in float64. The hop solves x1
from the target f by substituting eps_x, eps_v of §2.5, with the per-t scalars of
`reference.bridge_sample.bridge_terms`; no derived coefficient of `PhaseBridge` (hop_*) is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from psb_fast.bridge import PhaseBridge

from .bridge_sample import _rows, bridge_terms


def phase_step(
    x: torch.Tensor, v: torch.Tensor, h: float | Sequence[float],
    Cx: Sequence[float], Cv: Sequence[float], F_hist: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The multistep update; F_hist[j] = Y_{i-j} (newest first), len(Cx) == len(F_hist).

    h a step size (the F form, docs/math.md §7.1): x' = x + h v + sum_j Cx_j F_{i-j},
    v' = v + sum_j Cv_j F_{i-j}. h a transition (p_xx, p_xv, p_vx, p_vv) (§7.4): x' = p_xx x +
    p_xv v + sum_j Cx_j F_{i-j}, v' = p_vx x + p_vv v + sum_j Cv_j F_{i-j}.
    """
    if not len(Cx) == len(Cv) == len(F_hist):
        raise ValueError(f"Cx, Cv, F_hist must have equal lengths, got {len(Cx)}, {len(Cv)}, {len(F_hist)}")
    if isinstance(h, (int, float)):
        h = (1.0, h, 0.0, 1.0)
    p_xx, p_xv, p_vx, p_vv = (float(p) for p in h)
    x_new = p_xx * x.double() + p_xv * v.double()
    v_new = p_vx * x.double() + p_vv * v.double()
    for cx, cv, F in zip(Cx, Cv, F_hist, strict=True):
        x_new = x_new + cx * F.double()
        v_new = v_new + cv * F.double()
    return x_new, v_new


def hop_reference(
    bridge: PhaseBridge, x: torch.Tensor, v: torch.Tensor, F: torch.Tensor, t: torch.Tensor | float
) -> torch.Tensor:
    """The hop (docs/math.md §8): x1 estimated from (x, v) and the model output F at t, float64.

    f = N F is the un-normalized target. SDE (f = a = 4 (x1 - x - tau v) / tau^2):
    x1 = x + tau v + tau^2 f / 4. probODE: f = 4 tau^2 x1 - P AA eps_x + e_v eps_v with
    eps_x = (x - cx x1) / Lxx and eps_v = (v - cv x1 - Lxv eps_x) / Lvv is linear in x1:
    f = 4 tau^2 x1 - A (x - cx x1) + B (v - cv x1), A = (P AA + e_v Lxv / Lvv) / Lxx,
    B = e_v / Lvv, so x1 = (f + A x - B v) / (4 tau^2 + A cx - B cv).
    t: a scalar or one time per row of x.
    """
    k = {name: _rows(value, x) for name, value in bridge_terms(bridge, t).items()}
    x, v = x.double(), v.double()
    f = k["N"] * F.double()
    tau = k["tau"]
    if bridge.mode == "SDE":
        return x + tau * v + tau * tau * f / 4.0
    A = (k["P"] * k["AA"] + k["e_v"] * k["lxv"] / k["lvv"]) / k["lxx"]
    B = k["e_v"] / k["lvv"]
    return (f + A * x - B * v) / (4.0 * tau * tau + A * k["cx"] - B * k["cv"])
