"""Oracle of the exponential multistep coefficients (docs/math.md §7), by its own quadrature.

For the step t_i -> t_{i+1} with q = min(i, order) history points t_i, t_{i-1}, .., t_{i-q}:

    Cx_{i,j} = int_{t_i}^{t_{i+1}} (t_{i+1} - s) N(s) l_j(s) ds
    Cv_{i,j} = int_{t_i}^{t_{i+1}} N(s) l_j(s) ds

with l_j the Lagrange basis polynomial of node t_{i-j}. N(s) ~ (1 - s)^(-1/2) near s = 1, so the
integrals are taken in u = -log(1 - s) (ds = (1 - s) du, a smooth integrand), by composite
Gauss-Legendre: panels of width at most PANEL_WIDTH in u, GL_NODES nodes each, written out
step by step here (the production `psb_fast.multistep` uses other panels and node counts and a
vectorized basis). N(s) is `PhaseBridge.coefficients(s).normalizer`, checked against the
50-digit solve in tests/test_bridge.py; the quadrature and the Lagrange weights are what the
comparison with production checks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from psb_fast.bridge import PhaseBridge

GL_NODES = 20
PANEL_WIDTH = 0.25


class StepCoefficients(NamedTuple):
    """h: [S] step sizes; Cx, Cv: [S, order + 1] float64, column j multiplies F_{i-j} (0 past q)."""

    h: torch.Tensor
    Cx: torch.Tensor
    Cv: torch.Tensor


def _lagrange(s: np.ndarray, nodes: list[float], j: int) -> np.ndarray:
    """l_j(s) = prod_{k != j} (s - nodes[k]) / (nodes[j] - nodes[k])."""
    out = np.ones_like(s)
    for k, node in enumerate(nodes):
        if k != j:
            out = out * (s - node) / (nodes[j] - node)
    return out


def multistep_coefficients(
    bridge: PhaseBridge, grid: torch.Tensor, order: int, t_end: float | None = None
) -> StepCoefficients:
    """Coefficients of the steps between consecutive grid times, plus T -> t_end if given."""
    if not 0 <= order <= 3:
        raise ValueError(f"order must be in 0..3, got {order}")
    times = [float(v) for v in grid.tolist()]
    if any(not a < b for a, b in zip(times[:-1], times[1:], strict=False)):
        raise ValueError(f"grid must be strictly increasing, got {times}")
    if t_end is not None and not times[-1] < t_end < 1:
        raise ValueError(f"t_end must be in (T, 1) = ({times[-1]}, 1), got {t_end}")
    ends = times[1:] + ([float(t_end)] if t_end is not None else [])
    x_gl, w_gl = np.polynomial.legendre.leggauss(GL_NODES)
    # Nodes s and weights w (of int (.) ds) of every step, then one N(s) evaluation for all.
    per_step = []
    for a, b in zip(times, ends, strict=False):
        u_a, u_b = -math.log1p(-a), -math.log1p(-b)
        panels = max(1, math.ceil((u_b - u_a) / PANEL_WIDTH))
        width = (u_b - u_a) / panels
        u = np.concatenate([u_a + width * (p + 0.5 * (x_gl + 1.0)) for p in range(panels)])
        w = np.concatenate([0.5 * width * w_gl for _ in range(panels)])
        s = -np.expm1(-u)
        per_step.append((s, w * np.exp(-u)))
    S = len(ends)
    Cx = torch.zeros(S, order + 1, dtype=torch.float64)
    Cv = torch.zeros(S, order + 1, dtype=torch.float64)
    if S == 0:
        return StepCoefficients(torch.zeros(0, dtype=torch.float64), Cx, Cv)
    all_s = np.concatenate([s for s, _ in per_step])
    N_all = bridge.coefficients(torch.from_numpy(all_s)).normalizer.numpy()
    start = 0
    for i, (s, w) in enumerate(per_step):
        N = N_all[start : start + len(s)]
        start += len(s)
        q = min(i, order)
        nodes = [times[i - j] for j in range(q + 1)]
        for j in range(q + 1):
            weighted = w * N * _lagrange(s, nodes, j)
            Cv[i, j] = float(np.sum(weighted))
            Cx[i, j] = float(np.sum((ends[i] - s) * weighted))
    h = torch.tensor(ends, dtype=torch.float64) - torch.tensor(times[:S], dtype=torch.float64)
    return StepCoefficients(h, Cx, Cv)
