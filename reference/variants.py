"""Oracle of the solver variants (docs/math.md §7.4): the step tables of the F form and the data form,
with and without the corrector, each integrated here by its own method.

Every variant steps m = (x, v) per coordinate by

    m_{i+1} = Phi_i m_i + sum_{j<=q} C_{i,j} Y_{i-j}                 (predictor, q = min(i, order))
    m_{i+1} += D_{i,0} Y_{i+1} + sum_{j<=q} D_{i,j+1} Y_{i-j}         (corrector, after evaluation i+1)

with Y = F (F form) or Y = x1_hat (data form). Written out from docs/math.md, not taken from
production (psb_fast.variant_tables integrates all of it at once by RK4 in u = -log(1 - t) on the
rescaled state (x, tau v)):

- F form: dx/dt = v, dv/dt = N(t) F, so Phi = [[1, h], [0, 1]] and C_{i,j} = (int (t_b - s) N l_j ds,
  int N l_j ds), by composite Gauss-Legendre in u (the quadrature of `reference.multistep`) over
  any node set;
- data form: the hop of `reference.phase_step.hop_reference` read backwards, N F = den x1_hat -
  A x + B v (A, B, den from `reference.bridge_sample.bridge_terms`), so dx/dt = v, dv/dt = -A x +
  B v + den x1_hat; Phi and each C column are integrated on (x, v) itself (no rescaling) in u by
  the implicit 3-stage Gauss method (order 6).

The corrector's D is its own C over the nodes (t_{i+1}, t_i, ..., t_{i-q}) minus the predictor's C,
aligned by node. `sample_variant` (reference.sampler) runs the loop.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from psb_fast.bridge import PhaseBridge

from .bridge_sample import bridge_terms
from .multistep import GL_NODES, PANEL_WIDTH

#: (form, corrector) of each variant: what the multistep extrapolates, and whether the corrector runs.
VARIANT_FORMS = {
    "multistep": ("F", False),
    "data": ("data", False),
    "multistep-corrector": ("F", True),
    "data-corrector": ("data", True),
}


def _lagrange(s: np.ndarray | float, nodes: list[float], j: int):
    """l_j(s) = prod_{k != j} (s - nodes[k]) / (nodes[j] - nodes[k])."""
    out = np.ones_like(np.asarray(s, dtype=np.float64))
    for k, node in enumerate(nodes):
        if k != j:
            out = out * (s - node) / (nodes[j] - node)
    return out


def _f_form(
    bridge: PhaseBridge, a: float, b: float, node_sets: list[list[float]]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Phi [2, 2] and, per node set, C [2, len(nodes)] of the F form over [a, b]: Gauss-Legendre in u."""
    x_gl, w_gl = np.polynomial.legendre.leggauss(GL_NODES)
    u_a, u_b = -math.log1p(-a), -math.log1p(-b)
    panels = max(1, math.ceil((u_b - u_a) / PANEL_WIDTH))
    width = (u_b - u_a) / panels
    u = np.concatenate([u_a + width * (p + 0.5 * (x_gl + 1.0)) for p in range(panels)])
    w = np.concatenate([0.5 * width * w_gl for _ in range(panels)]) * np.exp(-u)  # ds = (1 - s) du
    s = -np.expm1(-u)
    N = bridge_terms(bridge, torch.from_numpy(s))["N"].numpy()
    out = []
    for nodes in node_sets:
        C = np.zeros((2, len(nodes)))
        for j in range(len(nodes)):
            weighted = w * N * _lagrange(s, nodes, j)
            C[0, j] = np.sum((b - s) * weighted)
            C[1, j] = np.sum(weighted)
        out.append(C)
    return np.array([[1.0, b - a], [0.0, 1.0]]), out


# The 3-stage Gauss-Legendre Runge-Kutta method (order 6, A-stable): nodes, matrix, weights.
_R15 = math.sqrt(15.0)
GAUSS_C = np.array([0.5 - _R15 / 10, 0.5, 0.5 + _R15 / 10])
GAUSS_A = np.array([[5 / 36, 2 / 9 - _R15 / 15, 5 / 36 - _R15 / 30],
                    [5 / 36 + _R15 / 24, 2 / 9, 5 / 36 - _R15 / 24],
                    [5 / 36 + _R15 / 30, 2 / 9 + _R15 / 15, 5 / 36]])
GAUSS_B = np.array([5 / 18, 4 / 9, 5 / 18])
#: Largest Gauss step in u = -log(1 - t).
GAUSS_DU = 0.02


def _data_form(
    bridge: PhaseBridge, a: float, b: float, node_sets: list[list[float]]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Phi [2, 2] and, per node set, C [2, len(nodes)] of the data form over [a, b].

    The linear system d(x, v)/du = tau [[0, 1], [-A, B]] (x, v) + tau (0, den l_j(t)) (u = -log(1 - t),
    d/du = tau d/dt) for Phi's two columns and one forcing column per Lagrange basis polynomial,
    integrated by the implicit 3-stage Gauss method: each step solves its 6 x 6 stage system."""
    u_a, u_b = -math.log1p(-a), -math.log1p(-b)
    K = max(1, math.ceil((u_b - u_a) / GAUSS_DU))
    du = (u_b - u_a) / K
    u = (u_a + du * (np.arange(K)[:, None] + GAUSS_C[None, :])).ravel()  # every stage point
    t = -np.expm1(-u)
    k = {name: value.numpy() for name, value in bridge_terms(bridge, torch.from_numpy(t)).items()}
    A = (k["P"] * k["AA"] + k["e_v"] * k["lxv"] / k["lvv"]) / k["lxx"]
    B = k["e_v"] / k["lvv"]
    den = 4.0 * k["tau"] ** 2 + A * k["cx"] - B * k["cv"]
    tau = k["tau"]
    M = np.zeros((len(u), 2, 2))
    M[:, 0, 1] = tau
    M[:, 1, 0] = -tau * A
    M[:, 1, 1] = tau * B
    bases = [np.stack([_lagrange(t, nodes, j) for j in range(len(nodes))], axis=1) for nodes in node_sets]
    widths = [2] + [len(nodes) for nodes in node_sets]
    forcing = np.zeros((len(u), 2, sum(widths)))
    col = 2
    for basis in bases:
        forcing[:, 1, col : col + basis.shape[1]] = (tau * den)[:, None] * basis
        col += basis.shape[1]
    y = np.zeros((2, sum(widths)))
    y[0, 0] = y[1, 1] = 1.0
    for step in range(K):
        Ms, Fs = M[3 * step : 3 * step + 3], forcing[3 * step : 3 * step + 3]
        # Z_r = y + du sum_s a_rs (M_s Z_s + F_s):  (I - du [a_rs M_s]) Z = [y; y; y] + du [sum_s a_rs F_s]
        lhs = np.eye(6)
        rhs = np.concatenate([y] * 3, axis=0)
        for r in range(3):
            for c in range(3):
                lhs[2 * r : 2 * r + 2, 2 * c : 2 * c + 2] -= du * GAUSS_A[r, c] * Ms[c]
                rhs[2 * r : 2 * r + 2] += du * GAUSS_A[r, c] * Fs[c]
        Z = np.linalg.solve(lhs, rhs)
        y = y + du * sum(GAUSS_B[r] * (Ms[r] @ Z[2 * r : 2 * r + 2] + Fs[r]) for r in range(3))
    out, col = [], 2
    for width in widths[1:]:
        out.append(y[:, col : col + width])
        col += width
    return y[:, :2], out


def variant_tables(
    bridge: PhaseBridge, grid: torch.Tensor, order: int, form: str, t_end: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Phi [S, 2, 2], C [S, 2, order + 1], D [S, 2, order + 2]) float64 for the steps between
    consecutive grid times, plus T -> t_end if given (no corrector for that step: no evaluation at
    its end). Column j of C multiplies Y_{i-j}; column 0 of D multiplies Y_{i+1}, column j + 1 Y_{i-j}."""
    if form not in ("F", "data"):
        raise ValueError(f"form must be 'F' or 'data', got {form!r}")
    step = _f_form if form == "F" else _data_form
    times = [float(t) for t in grid.tolist()]
    nodes_all = times + ([float(t_end)] if t_end is not None else [])
    S = len(nodes_all) - 1
    Phi = torch.zeros(S, 2, 2, dtype=torch.float64)
    C = torch.zeros(S, 2, order + 1, dtype=torch.float64)
    D = torch.zeros(S, 2, order + 2, dtype=torch.float64)
    for i in range(S):
        a, b = nodes_all[i], nodes_all[i + 1]
        q = min(i, order)
        predictor = [times[i - j] for j in range(q + 1)]
        corrected = i + 1 < len(times)  # an evaluation at the step's end: the corrector
        phi, cs = step(bridge, a, b, [predictor, [times[i + 1]] + predictor] if corrected else [predictor])
        c = cs[0]
        Phi[i] = torch.from_numpy(phi)
        C[i, :, : q + 1] = torch.from_numpy(c)
        if corrected:
            d = cs[1].copy()
            d[:, 1:] -= c
            D[i, :, : q + 2] = torch.from_numpy(d)
    return Phi, C, D
