"""Sampling time grids (docs/math.md §10.1): plain functions of (n, t0, T) returning float64 [n] tensors."""

from __future__ import annotations

import math

import torch


def _check_grid_args(n: int, t0: float, T: float) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (the NFE) must be an int >= 1, got {n!r}")
    if not (math.isfinite(t0) and math.isfinite(T) and 0 <= t0 < 1 and 0 <= T < 1):
        raise ValueError(f"t0 and T must be finite and in [0, 1), got t0={t0}, T={T}")
    if n > 1 and not t0 < T:
        raise ValueError(f"T must be greater than t0 for n > 1, got t0={t0}, T={T}")


def rev_quad_grid(n: int, t0: float = 1e-5, T: float = 0.999, q: float = 2.0) -> torch.Tensor:
    """t_i = (t0^(1/q) + i/(n-1) (T^(1/q) - t0^(1/q)))^q, i = 0..n-1 (the published grid for q = 2)."""
    _check_grid_args(n, t0, T)
    if not (math.isfinite(q) and q > 0):
        raise ValueError(f"q (the grid order) must be finite and > 0, got {q}")
    if n == 1:
        return torch.tensor([t0], dtype=torch.float64)
    return power_grid(t0, T, q, torch.arange(n, dtype=torch.float64) / (n - 1))


def power_grid(t0: float, T: float, q: float, r: torch.Tensor) -> torch.Tensor:
    """t = (t0^(1/q) + r (T^(1/q) - t0^(1/q)))^q for fractions r (float64, 0 = r_0 < ... < r_{-1} = 1),
    with the end points set exactly to t0 and T. Arguments are not checked (callers do)."""
    a, b = t0 ** (1.0 / q), T ** (1.0 / q)
    grid = (a + r * (b - a)) ** q
    grid[0], grid[-1] = t0, T
    return grid


def uniform_grid(n: int, t0: float = 1e-5, T: float = 0.999) -> torch.Tensor:
    """n equally spaced times from t0 to T."""
    _check_grid_args(n, t0, T)
    if n == 1:
        return torch.tensor([t0], dtype=torch.float64)
    return torch.linspace(t0, T, n, dtype=torch.float64)
