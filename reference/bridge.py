"""Plain-PyTorch reference of the training data path (SPEC §2) and the prior: the oracle."""

from __future__ import annotations

import torch

from psb_fast.bridge import PhaseBridge, check_t


def _rows(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row [B] float64 coefficient broadcast against `like` = [B, C, ...]."""
    return a.to(like.device).reshape((-1,) + (1,) * (like.dim() - 1))


def bridge_sample_reference(
    bridge: PhaseBridge,
    x1: torch.Tensor,
    t: torch.Tensor,
    eps_x: torch.Tensor | None = None,
    eps_v: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """m_t = [x_t | v_t] ([B, 2C, ...]) and label ([B, C, ...]) for data x1 [B, C, ...] at t [B].

    x_t = cx x1 + Lxx eps_x;  v_t = cv x1 + Lxv eps_x + Lvv eps_v;  label = f / N(t).
    eps_x, eps_v: the noise (x1's shape); drawn from `generator` when not given.
    Math in float64, outputs in x1's dtype.
    """
    if x1.dim() < 2:
        raise ValueError(f"x1 must be [B, C, ...], got shape {tuple(x1.shape)}")
    t = check_t(t)
    if t.shape != (x1.shape[0],):
        raise ValueError(f"t must have shape [{x1.shape[0]}], got {tuple(t.shape)}")
    if eps_x is None:
        eps_x = torch.randn(x1.shape, generator=generator, dtype=torch.float64, device=x1.device)
    if eps_v is None:
        eps_v = torch.randn(x1.shape, generator=generator, dtype=torch.float64, device=x1.device)
    for name, eps in (("eps_x", eps_x), ("eps_v", eps_v)):
        if eps.shape != x1.shape:
            raise ValueError(f"{name} must have x1's shape {tuple(x1.shape)}, got {tuple(eps.shape)}")
    co = bridge.coefficients(t)
    x1d, ex, ev = x1.double(), eps_x.double(), eps_v.double()
    x_t = _rows(co.cx, x1d) * x1d + _rows(co.lxx, x1d) * ex
    v_t = _rows(co.cv, x1d) * x1d + _rows(co.lxv, x1d) * ex + _rows(co.lvv, x1d) * ev
    label = (
        _rows(co.label_x1, x1d) * x1d
        + _rows(co.label_eps_x, x1d) * ex
        + _rows(co.label_eps_v, x1d) * ev
    )
    return torch.cat([x_t, v_t], dim=1).to(x1.dtype), label.to(x1.dtype)


def training_loss_reference(
    bridge: PhaseBridge, F: torch.Tensor, label: torch.Tensor, t: torch.Tensor,
    weighting: str = "reciprocal",
) -> torch.Tensor:
    """mean((w(t) (F - label))^2), w = 1/sqrt(tau) ("reciprocal") or 1 ("uniform")."""
    if weighting == "reciprocal":
        w = _rows(1.0 / torch.sqrt(1.0 - check_t(t)), F)
    elif weighting == "uniform":
        w = torch.ones((), dtype=torch.float64, device=F.device)
    else:
        raise ValueError(f"weighting must be 'reciprocal' or 'uniform', got {weighting!r}")
    return ((w * (F.double() - label.double())) ** 2).mean()
