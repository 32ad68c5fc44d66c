"""Plain-PyTorch reference of the training data path (docs/math.md §5) and the prior (§1.2): the oracle.

Written out here from docs/math.md, not taken from production: the means cx, cv (§2.2), the
label (§5.2, f / N with f from AA, Lvv, g and P) and the loss (§5.3); `bridge_terms` also gives
the hop of `reference.phase_step` (§8) its per-t scalars. From `PhaseBridge` the oracle reads
only Sigma's Cholesky factor (Lxx, Lxv, Lvv), AA and the normalizer N, which tests/test_bridge.py
checks against the 50-digit solve of `reference.high_precision`; no derived coefficient (label_*,
hop_*) and no production op is used.
"""

from __future__ import annotations

import torch

from psb_fast.bridge import PhaseBridge


def check_times(t: torch.Tensor | float) -> torch.Tensor:
    """t as a float64 tensor after checking it is finite and in [0, 1)."""
    t64 = torch.as_tensor(t, dtype=torch.float64)
    if not bool((torch.isfinite(t64) & (t64 >= 0) & (t64 < 1)).all()):
        raise ValueError(f"t must be finite and in [0, 1), got {t}")
    return t64


def bridge_terms(bridge: PhaseBridge, t: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """Per-t float64 scalars of the oracle: tau, cx, cv, lxx, lxv, lvv, AA, N, g, P and e_v,
    the eps_v coefficient of the target f (e_v = -P Lvv + g^2 / (2 Lvv) for probODE, since
    ell = -1/Lvv; -P Lvv for SDE)."""
    t = check_times(t)
    co = bridge.coefficients(t)
    tau = 1.0 - t
    g = bridge.p * tau
    P = 4.0 / tau
    lvv = co.lvv
    e_v = -P * lvv + (g * g / (2.0 * lvv) if bridge.mode == "probODE" else 0.0)
    return {
        "tau": tau,
        "cx": t * t * (t * t - 4.0 * t + 6.0) / 3.0,
        "cv": 4.0 * t * (t * t - 3.0 * t + 3.0) / 3.0,
        "lxx": co.lxx, "lxv": co.lxv, "lvv": lvv, "AA": co.AA, "N": co.normalizer,
        "g": g, "P": P, "e_v": e_v,
    }


def _rows(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row [B] (or scalar) float64 coefficient broadcast against `like` = [B, C, ...]."""
    a = a.to(like.device)
    return a if a.dim() == 0 else a.reshape((-1,) + (1,) * (like.dim() - 1))


def bridge_sample_reference(
    bridge: PhaseBridge,
    x1: torch.Tensor,
    t: torch.Tensor,
    eps_x: torch.Tensor | None = None,
    eps_v: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """m_t = [x_t | v_t] ([B, 2C, ...]) and label ([B, C, ...]) for data x1 [B, C, ...] at t [B].

    x_t = cx x1 + Lxx eps_x;  v_t = cv x1 + Lxv eps_x + Lvv eps_v;
    label = f / N,  f = 4 tau^2 x1 - P AA eps_x + e_v eps_v.
    eps_x, eps_v: the noise (x1's shape); drawn from `generator` when not given.
    Math in float64, outputs in x1's dtype.
    """
    if x1.dim() < 2:
        raise ValueError(f"x1 must be [B, C, ...], got shape {tuple(x1.shape)}")
    t = check_times(t)
    if t.shape != (x1.shape[0],):
        raise ValueError(f"t must have shape [{x1.shape[0]}], got {tuple(t.shape)}")
    if eps_x is None:
        eps_x = torch.randn(x1.shape, generator=generator, dtype=torch.float64, device=x1.device)
    if eps_v is None:
        eps_v = torch.randn(x1.shape, generator=generator, dtype=torch.float64, device=x1.device)
    for name, eps in (("eps_x", eps_x), ("eps_v", eps_v)):
        if eps.shape != x1.shape:
            raise ValueError(f"{name} must have x1's shape {tuple(x1.shape)}, got {tuple(eps.shape)}")
    k = {name: _rows(value, x1) for name, value in bridge_terms(bridge, t).items()}
    x1d, ex, ev = x1.double(), eps_x.double(), eps_v.double()
    x_t = k["cx"] * x1d + k["lxx"] * ex
    v_t = k["cv"] * x1d + k["lxv"] * ex + k["lvv"] * ev
    f = 4.0 * k["tau"] ** 2 * x1d - k["P"] * k["AA"] * ex + k["e_v"] * ev
    label = f / k["N"]
    return torch.cat([x_t, v_t], dim=1).to(x1.dtype), label.to(x1.dtype)


def training_loss_reference(
    F: torch.Tensor, label: torch.Tensor, t: torch.Tensor, weighting: str = "reciprocal",
) -> torch.Tensor:
    """mean((w(t) (F - label))^2) (docs/math.md §5.3), w = 1/sqrt(1 - t) ("reciprocal") or 1
    ("none"), in float64."""
    if weighting == "reciprocal":
        w = _rows(1.0 / torch.sqrt(1.0 - check_times(t)), F)
    elif weighting == "none":
        w = torch.ones((), dtype=torch.float64, device=F.device)
    else:
        raise ValueError(f"weighting must be 'reciprocal' or 'none', got {weighting!r}")
    return ((w * (F.double() - label.double())) ** 2).mean()
