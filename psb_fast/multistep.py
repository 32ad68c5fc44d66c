"""Coefficients of the exponential multistep ("gDDIM") update (docs/math.md §7), to ~1e-14 relative.

For step i from t_i to t_{i+1} with q = min(i, order) history points:

    Cx_{i,j} = int_{t_i}^{t_{i+1}} (t_{i+1} - s) N(s) l_{i,j}(s) ds
    Cv_{i,j} = int_{t_i}^{t_{i+1}}               N(s) l_{i,j}(s) ds

evaluated by composite Gauss-Legendre quadrature in u = -log(1 - s), where N(s) ds =
N(s) (1 - s) du is smooth (N ~ tau^-1/2 near s = 1). All nodes of all steps go through one
`PhaseBridge.coefficients` call, so a grid costs milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .bridge import PhaseBridge

MAX_ORDER = 3
MAX_HISTORY = MAX_ORDER + 1  # model outputs one update reads (phase_step's F_hist, the kernel's slots)
GL_NODES = 24
PANEL_WIDTH = 0.5  # max width of one Gauss-Legendre panel in u = -log(1 - s)


@dataclass(frozen=True)
class MultistepCoefficients:
    """Per-step coefficients, float64 on the CPU.

    t: [S] step start times t_i; h: [S] step sizes; Cx, Cv: [S, order + 1], column j
    multiplies F_{i-j} (zero where j > min(i, order)).
    """

    t: torch.Tensor
    h: torch.Tensor
    Cx: torch.Tensor
    Cv: torch.Tensor


@lru_cache(maxsize=4)
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)
    return x, w


def _panels(u_a: float, u_b: float) -> list[tuple[float, float]]:
    count = max(1, math.ceil((u_b - u_a) / PANEL_WIDTH))
    edges = np.linspace(u_a, u_b, count + 1)
    return list(zip(edges[:-1], edges[1:], strict=True))


def multistep_coefficients(
    bridge: PhaseBridge, grid: torch.Tensor, order: int, t_end: float | None = None
) -> MultistepCoefficients:
    """Coefficients for the steps between consecutive grid times, plus T -> t_end if given.

    grid: increasing float64 [n] times (t_0 .. t_{n-1} = T); order: 0..3.
    Steps: i = 0..n-2 (t_i -> t_{i+1}), and i = n-1 (T -> t_end) when t_end is not None.
    """
    if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= MAX_ORDER:
        raise ValueError(f"order must be an int in 0..{MAX_ORDER}, got {order!r}")
    times = [float(v) for v in grid.tolist()]
    if any(b <= a for a, b in zip(times[:-1], times[1:], strict=False)):
        raise ValueError(f"grid must be strictly increasing, got {times}")
    ends = times[1:] + ([float(t_end)] if t_end is not None else [])
    if t_end is not None and not times[-1] < t_end < 1:
        raise ValueError(f"t_end must be in (T, 1) = ({times[-1]}, 1), got {t_end}")
    S = len(ends)
    if S == 0:  # a one-point grid with the hop: no step to take
        none = torch.zeros(0, dtype=torch.float64)
        empty = torch.zeros(0, order + 1, dtype=torch.float64)
        return MultistepCoefficients(t=none, h=none.clone(), Cx=empty, Cv=empty.clone())
    xg, wg = _gauss_legendre(GL_NODES)
    # Gather every quadrature node of every step, then one coefficients() call.
    step_u, step_w, owner = [], [], []
    for i, (a, b) in enumerate(zip(times, ends, strict=False)):
        for ua, ub in _panels(-math.log1p(-a), -math.log1p(-b)):
            half = 0.5 * (ub - ua)
            step_u.append(ua + half * (xg + 1.0))
            step_w.append(half * wg)
            owner.append(np.full(GL_NODES, i))
    u = torch.from_numpy(np.concatenate(step_u))
    w = torch.from_numpy(np.concatenate(step_w))
    idx = torch.from_numpy(np.concatenate(owner))
    s = -torch.expm1(-u)
    # ds = (1 - s) du; weight of the node for the integral of N(s) (.) ds.
    weight = w * bridge.coefficients(s).normalizer * torch.exp(-u)
    # Lagrange basis l_{i,j}(s) at every node, all steps at once: [nodes, order + 1].
    times_t = torch.tensor(times, dtype=torch.float64)
    q = torch.clamp(idx, max=order)  # history length per node's step
    basis = torch.zeros(len(s), order + 1, dtype=torch.float64)
    for j in range(order + 1):
        lj = torch.ones_like(s)
        for k in range(order + 1):
            if k == j:
                continue
            active = (j <= q) & (k <= q)
            tj, tk = times_t[(idx - j).clamp(min=0)], times_t[(idx - k).clamp(min=0)]
            lj = torch.where(active, lj * (s - tk) / torch.where(active, tj - tk, 1.0), lj)
        basis[:, j] = torch.where(j <= q, lj, 0.0)
    lw = basis * weight.unsqueeze(1)
    end = torch.tensor(ends, dtype=torch.float64)[idx]
    Cv = torch.zeros(S, order + 1, dtype=torch.float64).index_add_(0, idx, lw)
    Cx = torch.zeros(S, order + 1, dtype=torch.float64).index_add_(0, idx, (end - s).unsqueeze(1) * lw)
    t = torch.tensor(times[:S], dtype=torch.float64)
    h = torch.tensor(ends, dtype=torch.float64) - t
    return MultistepCoefficients(t=t, h=h, Cx=Cx, Cv=Cv)
