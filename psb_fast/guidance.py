"""Stroke-guided generation and inpainting with a PhaseSampler (AGM's conditional generation).

A stroke s ([C, ...] or [B, C, ...], data units) is a rough picture of the wanted output.

- "dyn-v": before each of the first `strength * NFE` evaluations, v is redrawn from its
  bridge conditional given the current x and x1 = s:
      v | x, x1 = s  ~  N(cv s + (Lxv / Lxx) (x - cx s), Lvv^2)
  (the Gaussian conditional of m_t | x1, docs/math.md §11.1; Lxv/Lxx = Sxv/Sxx and Lvv^2 = Svv - Sxv^2/Sxx).
- "init-v": the initial velocity is mixed with the stroke once, v0 <- (1 - w) v0 + w s.
- "inpaint": "dyn-v" over all steps where entries of s equal to -1 are unknown and are filled,
  at each step, from the running x1 estimate (the hop of the previous evaluation; before the
  first evaluation the unknown entries are 0, which is immaterial at t0 ~ 0 where cx, cv ~ 0).

The published sampler draws the dyn-v velocity with standard deviation Svv - Sxv^2/Sxx (a
variance); here it is its square root Lvv, the exact conditional.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .backends import real_scalar, unaliased
from .bridge import Coefficients, split_phase

MODES = ("dyn-v", "init-v", "inpaint")
DEFAULT_STRENGTH = {"dyn-v": 0.25, "init-v": 0.0, "inpaint": 1.0}
UNKNOWN = -1.0


@dataclass(frozen=True)
class StrokeGuide:
    """Conditioning of a PhaseSampler run on a stroke (see the module docstring).

    stroke: [C, ...] (broadcast over the batch) or [B, C, ...] in data units; with
    mode="inpaint", entries equal to -1 are unknown. mode: "dyn-v", "init-v" or "inpaint".
    strength: fraction of the evaluations preceded by a velocity redraw (None: 0.25 for
    dyn-v, 1.0 for inpaint; unused by init-v). init_weight: w of init-v, in [0, 1].
    """

    stroke: torch.Tensor
    mode: str = "dyn-v"
    strength: float | None = None
    init_weight: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.stroke, torch.Tensor) or not self.stroke.dtype.is_floating_point:
            got = self.stroke.dtype if isinstance(self.stroke, torch.Tensor) else type(self.stroke).__name__
            raise TypeError(f"stroke must be a floating torch.Tensor, got {got}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not bool(torch.isfinite(self.stroke).all()):
            raise ValueError("stroke contains NaN or Inf")
        for name in ("strength", "init_weight"):  # one-element tensors count as numbers
            if isinstance(getattr(self, name), torch.Tensor):
                object.__setattr__(self, name, real_scalar(name, getattr(self, name)))
        s = self.strength
        if s is not None and not (isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s <= 1):
            raise ValueError(f"strength must be in [0, 1] or None, got {s!r}")
        w = self.init_weight
        if not (isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w <= 1):
            raise ValueError(f"init_weight must be in [0, 1], got {w!r}")

    def redraw_steps(self, nfe: int) -> int:
        """How many of the nfe evaluations are preceded by a velocity redraw."""
        if self.mode == "init-v":
            return 0
        strength = DEFAULT_STRENGTH[self.mode] if self.strength is None else float(self.strength)
        return int(math.floor(strength * nfe + 1e-9))

    def bind(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(stroke, known mask) broadcast to x's shape [B, C, ...], on x's device in float32.

        The mask is None unless mode="inpaint"."""
        s = self.stroke
        if s.shape != x.shape and s.shape != x.shape[1:]:
            raise ValueError(
                f"stroke must have shape {tuple(x.shape[1:])} or {tuple(x.shape)} (x's), got {tuple(s.shape)}"
            )
        s = s.to(device=x.device, dtype=torch.float32).expand_as(x).contiguous()
        return s, ((s != UNKNOWN) if self.mode == "inpaint" else None)


def mix_initial_velocity(m: torch.Tensor, stroke: torch.Tensor, weight: float) -> None:
    """init-v, in place on m = [x | v]: v <- (1 - weight) v + weight * stroke.

    A stroke that shares memory with m (e.g. a view of x or v) is copied first."""
    stroke = unaliased(stroke, m)
    v = split_phase(m)[1]
    v.mul_(1.0 - weight).add_(stroke, alpha=weight)


def redraw_velocity(
    m: torch.Tensor, stroke: torch.Tensor, co: Coefficients, generator: torch.Generator
) -> None:
    """dyn-v, in place on m = [x | v] at one time t (co = bridge.coefficients(t)):
    v ~ N(cv s + (Lxv/Lxx)(x - cx s), Lvv^2) (the conditional of v_t given x_t and x1 = s)."""
    x, v = split_phase(m)
    cx, cv = float(co.cx), float(co.cv)
    slope, lvv = float(co.lxv) / float(co.lxx), float(co.lvv)
    eps = torch.randn(v.shape, generator=generator, device=v.device, dtype=torch.float32)
    mean = (x.to(torch.float32) - cx * stroke).mul_(slope).add_(stroke, alpha=cv)
    v.copy_(mean.add_(eps, alpha=lvv))


def fill_unknown(stroke: torch.Tensor, known: torch.Tensor, x1_hat: torch.Tensor) -> torch.Tensor:
    """The stroke with its unknown entries (known == False) taken from the x1 estimate."""
    return torch.where(known, stroke, x1_hat.to(stroke.dtype))
