"""Coefficient tables of the solver variants (docs/math.md §7.4): the data-prediction form and the
UniPC-style corrector, for the F form and the data form.

Every variant takes steps of one affine form on the phase state m = (x, v), per coordinate:

    m_{i+1} = Phi_i m_i + sum_{j<=q} C_{i,j} Y_{i-j}                     (predictor, q = min(i, order))
    m_{i+1} += D_{i,0} Y_{i+1} + sum_{j<=q} D_{i,j+1} Y_{i-j}             (corrector, after evaluation i+1)

with Y the network output F (F form: dx/dt = v, dv/dt = N F) or the hop's estimate of the data
x1_hat = a_F F + a_x x + a_v v (data form: dv/dt = N F = den x1_hat - P (aa x + bb v), docs/math.md
§8.1, so dm/dt = A(t) m + B(t) x1_hat with A = [[0, 1], [-P aa, -P bb]], B = (0, den)). Y is
interpolated in t by the Lagrange polynomial through the step's nodes: t_i, ..., t_{i-q} for the
predictor, and t_{i+1}, t_i, ..., t_{i-q} for the corrector (one order higher, at no extra
evaluation: Y_{i+1} is the next step's input anyway). Then

    Phi_i = Phi(t_{i+1}, t_i),   C_{i,j} = int Phi(t_{i+1}, s) B(s) l_j(s) ds  (a 2-vector),

and D is the corrector's C minus the predictor's (Phi m_i cancels), so the corrector is a pure
linear combination added to the predicted state.

Both are computed together by integrating the linear system for Phi and every forcing column at
once with classical RK4 in u = -log(1 - t) on the rescaled state (x, tau v), tau = 1 - t, where it
reads d(x, w)/du = [[0, 1], [-4 tau aa, -(1 + 4 bb)]] (x, w) + (0, tau^2 den) Y (data form) or
[[0, 1], [0, -1]] (x, w) + (0, tau^2 N) F (F form): all coefficients stay bounded up to t = 1 (tau aa
-> 5/8, bb -> 5/8, tau^2 den -> 5/2 for every bridge), so a fixed u-step of 0.0125 gives ~1e-8 relative
accuracy (tests/test_variants.py checks the F form against the Gauss-Legendre tables of
psb_fast.multistep and the data form against scipy's DOP853).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .bridge import Coefficients, PhaseBridge, probode_hop_weights

#: Largest RK4 step in u = -log(1 - t).
RK4_DU = 0.0125
_FIELDS = tuple(f.name for f in fields(Coefficients))
FORMS = ("F", "data")


@dataclass(frozen=True)
class VariantTables:
    """Per-step tables of a solver variant, float64 on the CPU, in the (x, v) coordinates.

    form: "F" or "data" (what Y is). t, h: [S] step starts and sizes. Phi: [S, 2, 2] transition of
    (x, v) over step i. C: [S, 2, order + 1], column j multiplies Y_{i-j} (rows: x, v; zero where
    j > min(i, order)). D: [S, 2, order + 2] corrector increments, column 0 multiplies Y_{i+1} and
    column j + 1 multiplies Y_{i-j}; zero for a step that ends at t_end (no evaluation there).
    hop: [n, 3] the probODE hop weights (a_F, a_x, a_v) at the n grid times (the data form's
    estimates; the hop at T), from the same `PhaseBridge.coefficients` call as the integration.
    """

    form: str
    t: torch.Tensor
    h: torch.Tensor
    Phi: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor
    hop: torch.Tensor


def variant_tables(
    bridge: PhaseBridge, grid: torch.Tensor, order: int, form: str, t_end: float | None = None
) -> VariantTables:
    """Tables for the steps between consecutive grid times, plus T -> t_end if given.

    grid: increasing float64 [n] times in [0, 1); order: 0..3; form: "F" or "data" (module doc).
    Arguments are checked by the caller (psb_fast.settings.Setting, PhaseSampler).
    """
    return variant_tables_many(bridge, [grid], [order], form, t_end)[0]


def variant_tables_many(
    bridge: PhaseBridge, grids: Sequence[torch.Tensor], orders: Sequence[int], form: str,
    t_end: float | None = None,
) -> list[VariantTables]:
    """`variant_tables` of many settings (grid k with orders[k]) in one vectorized integration."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    P = max(orders) + 1  # predictor columns; the corrector has P + 1
    starts, ends, node_sets, owner = [], [], [], []
    for k, (grid, order) in enumerate(zip(grids, orders, strict=True)):
        times = [float(v) for v in grid.tolist()]
        nodes = times + ([float(t_end)] if t_end is not None else [])
        for i in range(len(nodes) - 1):
            q = min(i, order)
            predictor = [nodes[i - j] for j in range(q + 1)]
            corrector = [nodes[i + 1]] + predictor if i + 1 < len(times) else []
            starts.append(nodes[i])
            ends.append(nodes[i + 1])
            node_sets.append((predictor, corrector))
            owner.append(k)
    grid_times = torch.cat([g.to(torch.float64).reshape(-1) for g in grids])
    Phi, C, D, co = _integrate(bridge, starts, ends, node_sets, P, form, grid_times)
    hop = torch.stack(probode_hop_weights(co.normalizer, co.P, co.hop_aa, co.hop_bb, co.hop_den), 1)
    out, first = [], 0
    for k, order in enumerate(orders):
        rows = [i for i, o in enumerate(owner) if o == k]
        t = torch.tensor([starts[i] for i in rows], dtype=torch.float64)
        h = torch.tensor([ends[i] for i in rows], dtype=torch.float64) - t
        n = grids[k].numel()
        out.append(VariantTables(form, t, h, Phi[rows].clone(), C[rows, :, : order + 1].contiguous(),
                                 D[rows, :, : order + 2].contiguous(), hop[first : first + n]))
        first += n
    return out


def _integrate(
    bridge: PhaseBridge, starts: list[float], ends: list[float], node_sets: list[tuple[list, list]],
    P: int, form: str, extra: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
    """Phi [S, 2, 2], C [S, 2, P], D [S, 2, P + 1] of S steps (module docstring) by RK4 in u, and
    `bridge.coefficients(extra)` (the same call as the integration's: one call per build)."""
    S = len(starts)
    if S == 0:
        return (torch.zeros(0, 2, 2, dtype=torch.float64), torch.zeros(0, 2, P, dtype=torch.float64),
                torch.zeros(0, 2, P + 1, dtype=torch.float64), bridge.coefficients(extra))
    # Node times per step: predictor (t_i, ..., t_{i-q}) in columns 0..P-1, corrector (t_{i+1},
    # t_i, ..., t_{i-q}) in columns P..2P; unused columns masked.
    node_t = torch.zeros(S, 2 * P + 1, dtype=torch.float64)
    active = torch.zeros(S, 2 * P + 1, dtype=torch.bool)
    for i, (predictor, corrector) in enumerate(node_sets):
        for c, tv in enumerate(predictor):
            node_t[i, c], active[i, c] = tv, True
        for c, tv in enumerate(corrector):
            node_t[i, P + c], active[i, P + c] = tv, True
    u_a = -torch.log1p(-torch.tensor(starts, dtype=torch.float64))
    u_b = -torch.log1p(-torch.tensor(ends, dtype=torch.float64))
    K = max(4, math.ceil(float((u_b - u_a).max()) / RK4_DU))
    du = (u_b - u_a) / K  # [S]
    # Coefficients at every RK4 stage point: u_a + k du / 2, k = 0..2K.
    u_pts = u_a[:, None] + du[:, None] * torch.arange(2 * K + 1, dtype=torch.float64) / 2  # [S, 2K+1]
    tau = torch.exp(-u_pts)
    s = -torch.expm1(-u_pts)
    co_all = bridge.coefficients(torch.cat([s.reshape(-1), extra]))
    co = type(co_all)(**{f: getattr(co_all, f)[: s.numel()].reshape(s.shape) for f in _FIELDS})
    co_extra = type(co_all)(**{f: getattr(co_all, f)[s.numel() :] for f in _FIELDS})
    if form == "data":
        a_xw = (-4 * tau * co.hop_aa, -(1 + 4 * co.hop_bb))
        forcing = tau * tau * co.hop_den
    else:
        a_xw = (torch.zeros_like(s), torch.full_like(s, -1.0))
        forcing = tau * tau * co.normalizer
    basis = _lagrange(node_t, active, P, s)  # [S, 2K+1, 2P+1]
    # State per step: rows (x, w), columns: 2 for Phi, 2P + 1 forcing columns.
    Y = torch.zeros(S, 2, 2 + 2 * P + 1, dtype=torch.float64)
    Y[:, 0, 0] = 1.0
    Y[:, 1, 1] = 1.0

    a_x, a_w = a_xw[0].T[:, :, None].contiguous(), a_xw[1].T[:, :, None].contiguous()  # [2K+1, S, 1]
    push = (forcing[:, :, None] * basis).transpose(0, 1).contiguous()  # [2K+1, S, 2P+1]

    def rhs(k: int, state: torch.Tensor) -> torch.Tensor:
        w = state[:, 1]
        dw = torch.addcmul(a_w[k] * w, a_x[k], state[:, 0])
        dw[:, 2:] += push[k]
        return torch.stack((w, dw), 1)

    h = du[:, None, None]
    for step in range(K):
        k = 2 * step
        k1 = rhs(k, Y)
        k2 = rhs(k + 1, Y + 0.5 * h * k1)
        k3 = rhs(k + 1, Y + 0.5 * h * k2)
        k4 = rhs(k + 2, Y + h * k3)
        Y = Y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    # Back to (x, v): x = x, v = w / tau; Phi(x, v) = diag(1, 1/tau_b) Phi_u diag(1, tau_a).
    tau_a, tau_b = torch.exp(-u_a), torch.exp(-u_b)
    Y[:, 1] /= tau_b[:, None]
    Y[:, :, 1] *= tau_a[:, None]
    C = Y[:, :, 2 : 2 + P] * active[:, None, :P]
    D = Y[:, :, 2 + P :] * active[:, None, P:]
    D[:, :, 1:] -= C  # corrector minus predictor: column j + 1 <-> Y_{i-j}
    has_corrector = active[:, P][:, None, None]
    return Y[:, :, :2].clone(), C, torch.where(has_corrector, D, torch.zeros_like(D)), co_extra


def _lagrange(node_t: torch.Tensor, active: torch.Tensor, P: int, s: torch.Tensor) -> torch.Tensor:
    """Lagrange basis values [S, M, 2P + 1] at s [S, M]: columns 0..P-1 the predictor's basis over
    its active nodes, columns P..2P the corrector's (inactive columns zero)."""
    S, M = s.shape
    out = torch.zeros(S, M, 2 * P + 1, dtype=torch.float64)
    for lo, width in ((0, P), (P, P + 1)):
        t_nodes, on = node_t[:, lo : lo + width], active[:, lo : lo + width]
        for j in range(width):
            lj = torch.ones(S, M, dtype=torch.float64)
            for k in range(width):
                if k == j:
                    continue
                both = (on[:, j] & on[:, k])[:, None]
                denom = torch.where(both, t_nodes[:, j : j + 1] - t_nodes[:, k : k + 1], 1.0)
                lj = torch.where(both, lj * (s - t_nodes[:, k : k + 1]) / denom, lj)
            out[:, :, lo + j] = torch.where(on[:, j : j + 1], lj, 0.0)
    return out
