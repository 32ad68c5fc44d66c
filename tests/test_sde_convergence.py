"""Convergence order of PhaseSampler's SDE solvers ("sde", "em", "sscs") on the exact-drift oracle.

Strong convergence along one Brownian path. The SDE of an SDE-mode model (docs/math.md §6.2) is

    dx = v dt,   dv = N(t) F(m, t) dt + g(t) dW,   g(t) = p (1 - t),

and the Gaussian-mixture oracle's F (E[a | m] / N in mode "SDE") is the exact network output,
so the SDE carries the prior to the bridge marginal at every t. One Brownian path per sample is
drawn on a fine uniform grid of M_FINE intervals as the exact Gaussian triples
(dW, I_v, I_x) = (int dW, int g dW, int (b - s) g dW) over each interval [a, b] (their 3 x 3
covariance by Gauss-Legendre quadrature, exact for these polynomials). Summing them gives the
same triples over any coarser interval, so every solver at every NFE sees the same path:
PhaseSampler's noise source (`seeded_noise`, which gives each SDE step (kind, t, h) its draw)
is replaced by one that gives the step xi, as `sde_step`'s `xi` argument would, built from the
path as the standard normals the step expects:
- "exact" over [t, t+h]: (I_x, I_v) = chol(Q) xi, Q the exact transition covariance (so the
  step injects exactly the path's noise when its Q is right);
- "em": xi_v = dW / sqrt(h) (the step injects g(t) dW);
- "sscs_half" over [t, t+s]: xi = chol(Q(t, s))^-1 (I_x, I_v), standard normal; the compat
  covariance (g frozen at p (1 - t), docs/math.md §9.4) then injects the path's noise up to O(s).
The "truth" is an exponential-Euler solve on the fine grid in float64, written here: the drift
integrals int N and int (b - s) N by quadrature of PhaseBridge's N(s), the noise the path's
exact (I_x, I_v). Its error is O(1/M_FINE), 1/16 of the finest solver's.

Expected strong order 1 for all three solvers. The noise is additive (g depends on t only), so
no Ito-Taylor double integrals appear and the Euler-type schemes gain half an order over 0.5:
- "exact": noise exact, drift N(s) F(m_t, t) frozen over the step; F moves by O(h^1/2) inside a
  step (v is rough), a local error O(h^3/2) of zero mean -> global O(h);
- "em": in addition g(t) dW instead of int g dW (O(h^3/2) per step) and no x-noise or drift in
  x within the step (O(h^3/2), O(h^2)) -> O(h);
- "sscs": the midpoint drift is second order, but the compat noise covariance differs from the
  exact one by O(s^2) per half step (g frozen at the step start) -> O(h).
Measured (B = 256, seed 0, T = 0.7, NFE - 1 = 4, 8, 16, 32 steps): RMSE of the output x1 estimate
sde 4.11e-01 .. 4.08e-02 (slope 1.11), em 2.56e-01 .. 2.99e-02 (1.03), sscs 2.21e-01 .. 2.00e-02
(1.16); with SEED = 1, 2, 3 every slope stays in 1.00 .. 1.17. A wrong leading noise term
or drift coefficient makes the error stop at O(that error) (the slope falls toward 0). An
O(h^2)-per-step error (in Cx, say) keeps order 1 and only changes the constant, so the exact step
is also checked on its own: with a state-independent model it is exact, path by path, at any NFE.

Run with `python -m pytest -q -s tests/test_sde_convergence.py` to see the error tables.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from psb_fast import PhaseBridge, PhaseSampler
from psb_fast.bridge import split_phase
from psb_fast.oracles import GaussianMixture, mixture_2d_grid
from psb_fast.reference.grids import rev_quad_grid
from psb_fast.reference.sampler import sample_em, sample_sde_exact, sample_sscs

torch.set_num_threads(1)

sampler_module = importlib.import_module("psb_fast.sampler")

T_HOP = 0.7  # grid end and hop time (the drift stays mildly stiff: rate 4 / tau <= 13.3)
B, SEED = 256, 0
M_FINE = 512  # fine intervals of the Brownian path and the truth solve
STEPS = (4, 8, 16, 32)  # solver steps; NFE = steps + 1 (the last evaluation feeds the hop)
MIN_SLOPE, MAX_SLOPE = 0.85, 1.4
MIN_LAST_RATIO = 1.6  # err(16 steps) / err(32 steps): no plateau at the fine end (order >= 0.68)
N_SE = 4.5  # moment checks: within 4.5 standard errors
GAUSS_NODES, GAUSS_WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(8))
SOLVERS = ("sde", "em", "sscs")


def _quadrature(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes s and weights w on each interval [a_k, b_k], both [K, 8]."""
    half = 0.5 * (b - a)[:, None]
    return 0.5 * (a + b)[:, None] + half * GAUSS_NODES, half * GAUSS_WEIGHTS


def _noise_cov(p: float, t: float, h: float) -> tuple[float, float, float]:
    """(Q_xx, Q_xv, Q_vv) = int_t^{t+h} g(s)^2 ((t+h-s)^2, t+h-s, 1) ds, g = p (1 - s)."""
    s, w = _quadrature(torch.tensor([t], dtype=torch.float64), torch.tensor([t + h], dtype=torch.float64))
    g2, r = (p * (1 - s)) ** 2, t + h - s
    return tuple((w * g2 * r**j).sum().item() for j in (2, 1, 0))


class BrownianPath:
    """Exact Brownian triples (dW, I_v, I_x), each [M, B, D], on the uniform grid k T / M of [0, T]."""

    def __init__(self, p: float, T: float, M: int, x_shape: tuple[int, int], generator: torch.Generator):
        self.p, self.T, self.M, self.hf = p, T, M, T / M
        self.edges = torch.arange(M + 1, dtype=torch.float64) * self.hf
        a, b = self.edges[:-1], self.edges[1:]
        s, w = _quadrature(a, b)
        g, r = p * (1 - s), b[:, None] - s
        cov = torch.empty(M, 3, 3, dtype=torch.float64)
        entries = {(0, 0): w, (0, 1): w * g, (0, 2): w * r * g, (1, 1): w * g * g,
                   (1, 2): w * r * g * g, (2, 2): w * r * r * g * g}
        for (i, j), integrand in entries.items():
            cov[:, i, j] = cov[:, j, i] = integrand.sum(1)
        z = torch.randn((M, *x_shape, 3), generator=generator, dtype=torch.float64)
        triples = torch.einsum("kij,kbdj->kbdi", torch.linalg.cholesky(cov), z)
        self.dW, self.Iv, self.Ix = triples.unbind(-1)
        zero = torch.zeros((1, *x_shape), dtype=torch.float64)
        parts = {"W": self.dW, "V": self.Iv, "X": self.Ix, "bV": b[:, None, None] * self.Iv}
        self._cum = {name: torch.cat([zero, values.cumsum(0)]) for name, values in parts.items()}

    def _index(self, t: float) -> int:
        k = round(t / self.hf)
        assert abs(k * self.hf - t) <= 1e-9 * self.hf + 1e-12, f"t={t} is not on the fine grid"
        return k

    def increments(self, t: float, h: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dW, I_v, I_x) over [t, t + h]: I_x = sum_k (I_x,k + (t + h - b_k) I_v,k)."""
        k0, k1 = self._index(t), self._index(t + h)
        W, V, X, bV = (self._cum[n][k1] - self._cum[n][k0] for n in ("W", "V", "X", "bV"))
        return W, V, X + self.edges[k1].item() * V - bV

    def xi(self, kind: str, t: float, h: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The standard normals (xi_x, xi_v) that sde_step(kind, ..., t, h) needs for this path."""
        W, V, X = self.increments(t, h)
        if kind == "em":
            return torch.zeros_like(W), W / math.sqrt(h)
        qxx, qxv, qvv = _noise_cov(self.p, t, h)
        lxx = math.sqrt(qxx)
        lxv = qxv / lxx
        lvv = math.sqrt(qvv - lxv * lxv)
        xi_x = X / lxx
        return xi_x, (V - lxv * xi_x) / lvv

    def truth(self, bridge: PhaseBridge, drift, m0: torch.Tensor) -> torch.Tensor:
        """m(T) [B, 2D] float64 of the fine exponential-Euler solve: x += h v + cx F + I_x, v += cv F + I_v,
        cx = int (b - s) N(s) ds, cv = int N(s) ds, F = drift(m, t) (float64)."""
        a, b = self.edges[:-1], self.edges[1:]
        s, w = _quadrature(a, b)
        N = bridge.coefficients(s).normalizer
        cv, cx = (w * N).sum(1), (w * (b[:, None] - s) * N).sum(1)
        x, v = (part.double().clone() for part in split_phase(m0))
        for k in range(self.M):
            F = drift(torch.cat([x, v], 1), a[k].item())
            x = x + self.hf * v + cx[k] * F + self.Ix[k]
            v = v + cv[k] * F + self.Iv[k]
        return torch.cat([x, v], 1)


def _drive_with(monkeypatch: pytest.MonkeyPatch, noise) -> None:
    """Make PhaseSampler's SDE steps take xi = noise(kind, t, h) instead of their seeded draws."""

    def source(seed):
        return lambda m, k, kind, t, h: (0, noise(kind, t, h))

    monkeypatch.setattr(sampler_module, "seeded_noise", source)


def _run(bridge, model, m0, n_steps: int, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PhaseSampler on the uniform grid of [0, T_HOP] with n_steps steps, hop at T_HOP:
    (x1 estimate, state m at T_HOP), both float64."""
    final = {}

    def keep_last(info: dict) -> None:
        final["m"] = info["m"].double().clone()

    sampler = PhaseSampler(bridge, n_steps + 1, T=T_HOP, t0=0.0, grid="uniform", hop=True, solver=solver)
    out = sampler.sample(model, m0, seed=SEED, callback=keep_last)
    return out.double(), final["m"]


@pytest.fixture(scope="module")
def sde_bridge() -> PhaseBridge:
    return PhaseBridge(mode="SDE")


@pytest.fixture(scope="module")
def mix() -> GaussianMixture:
    return mixture_2d_grid(std=0.4)  # 3 x 3 modes 1.2 apart, overlapping: a smooth posterior mean


@pytest.fixture(scope="module")
def path_setup(sde_bridge, mix):
    """m0 (float32, as samplers take it), the Brownian path and the truth m(T_HOP)."""
    gen = torch.Generator().manual_seed(SEED)
    m0 = sde_bridge.sample_prior((B, mix.dim), generator=gen, dtype=torch.float64)
    path = BrownianPath(sde_bridge.p, T_HOP, M_FINE, (B, mix.dim), gen)
    m0 = m0.float()
    truth = path.truth(sde_bridge, lambda m, t: mix.drift(sde_bridge, m, t), m0)
    return m0, path, truth


def test_oracle_drift_is_the_sde_target(sde_bridge, mix):
    """In mode "SDE" the oracle outputs E[a | m] / N with a = 4 (x1 - x - tau v) / tau^2 and the SDE
    normalizer N = sqrt((P AA)^2 + (P Lvv)^2) / tau (docs/math.md §5.2), not the probODE target."""
    gen = torch.Generator().manual_seed(1)
    m = sde_bridge.sample_prior((64, mix.dim), generator=gen, dtype=torch.float64)
    for t in (0.0, 0.3, 0.9):
        co = sde_bridge.coefficients(t)
        x, v = split_phase(m)
        x1_hat = mix.posterior_mean(sde_bridge, m, t)
        N = torch.sqrt((co.P * co.AA) ** 2 + (co.P * co.lvv) ** 2) / co.tau
        want = 4 * (x1_hat - x - co.tau * v) / co.tau**2 / N
        torch.testing.assert_close(mix.drift(sde_bridge, m, t), want, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(mix.drift(PhaseBridge(), m, t), want)


@pytest.mark.slow
def test_truth_has_the_bridge_marginal(sde_bridge, mix, path_setup):
    """The fine solve with the exact drift reproduces the bridge marginal at T_HOP: per coordinate
    E[x] = cx E[x1], E[x^2] = cx^2 E[x1^2] + Sxx, E[x v] = cx cv E[x1^2] + Sxv, E[v^2] = cv^2 E[x1^2] + Svv.
    Checks the path's noise law and the oracle's SDE drift the convergence tests rely on."""
    _, _, truth = path_setup
    co = sde_bridge.coefficients(T_HOP)
    x, v = (part.flatten() for part in split_phase(truth))
    mean_x1 = (mix.weights[:, None] * mix.means).sum(0).mean().item()
    second_x1 = (mix.weights[:, None] * (mix.means**2 + mix.stds[:, None] ** 2)).sum(0).mean().item()
    checks = {
        "x": (x, co.cx.item() * mean_x1),
        "xx": (x * x, co.cx.item() ** 2 * second_x1 + co.sxx.item()),
        "xv": (x * v, (co.cx * co.cv).item() * second_x1 + co.sxv.item()),
        "vv": (v * v, co.cv.item() ** 2 * second_x1 + co.svv.item()),
    }
    for name, (values, want) in checks.items():
        se = values.std().item() / math.sqrt(values.numel())
        assert abs(values.mean().item() - want) <= N_SE * se, (name, values.mean().item(), want, se)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.slow
def test_strong_order_one(monkeypatch, sde_bridge, mix, path_setup, solver):
    """RMSE of the output (hop at T_HOP) and of the state m(T_HOP) against the truth on the same
    Brownian path falls like 1/NFE (module docstring: strong order 1 for all three solvers)."""
    m0, path, truth = path_setup
    _drive_with(monkeypatch, path.xi)
    x1_truth = mix.posterior_mean(sde_bridge, truth, T_HOP)
    model = mix.as_model(sde_bridge)
    out_err, state_err = [], []
    for n in STEPS:
        out, m_T = _run(sde_bridge, model, m0, n, solver)
        out_err.append((out - x1_truth).pow(2).mean().sqrt().item())
        state_err.append((m_T - truth).pow(2).mean().sqrt().item())
    for name, errs in (("output", out_err), ("state", state_err)):
        slope = -np.polyfit(np.log(STEPS), np.log(errs), 1)[0]
        print(f"\n[strong] {solver:4} {name:6} " + " ".join(f"{e:.3e}" for e in errs) + f" slope {slope:.2f}")
        assert all(b < a for a, b in zip(errs[:-1], errs[1:], strict=False)), (name, errs)
        assert MIN_SLOPE <= slope <= MAX_SLOPE, (name, slope, errs)
        assert errs[-2] / errs[-1] >= MIN_LAST_RATIO, (name, errs)


@pytest.mark.parametrize("n_steps", [1, 8])
@pytest.mark.slow
def test_exact_step_is_exact_for_state_independent_model(monkeypatch, sde_bridge, path_setup, n_steps):
    """With F = c (no state dependence) the SDE is linear with exact solution
    x(T) = x0 + T v0 + c int (T - s) N ds + I_x, v(T) = v0 + c int N ds + I_v; the exact-noise step
    (exact Q, exact Cx, Cv) reproduces it path by path at any NFE. This pins the parts the order
    tests cannot see: Q_xx, Q_xv and Cx, each an O(h^2)-per-step term."""
    m0, path, _ = path_setup
    c = 0.3
    _drive_with(monkeypatch, path.xi)

    def constant(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(split_phase(m)[0], c)

    want = path.truth(sde_bridge, lambda m, t: torch.full_like(split_phase(m)[0], c), m0)
    _, m_T = _run(sde_bridge, constant, m0, n_steps, "sde")
    torch.testing.assert_close(m_T, want, rtol=2e-5, atol=2e-5)


REFERENCE = {"sde": sample_sde_exact, "em": sample_em, "sscs": sample_sscs}


@pytest.mark.parametrize("hop", [True, False], ids=["hop", "no_hop"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_sampler_matches_reference_sampler_same_noise(monkeypatch, sde_bridge, mix, solver, hop):
    """PhaseSampler(solver) and the plain float64 reference sampler, fed the same xi in the same order
    (the reference draws xi = randn(2, *x.shape) per noise injection: xi_x, xi_v), agree to float32
    rounding on the published rev-quad grid, with the hop at T or the last step to 0.999."""
    nfe, T = 8, (0.7 if hop else 0.9)
    m0 = sde_bridge.sample_prior((32, mix.dim), generator=torch.Generator().manual_seed(3))
    sampler_gen = torch.Generator().manual_seed(4)

    def shared(kind, t, h):
        xi = torch.randn((2, *m0[:, : mix.dim].shape), generator=sampler_gen, dtype=torch.float64)
        return xi[0], xi[1]

    _drive_with(monkeypatch, shared)
    model = mix.as_model(sde_bridge)
    got = PhaseSampler(sde_bridge, nfe, T=T, hop=hop, solver=solver).sample(model, m0, seed=0)
    grid = rev_quad_grid(nfe, 1e-5, T)
    reference_gen = torch.Generator().manual_seed(4)
    want = REFERENCE[solver](model, m0.double(), sde_bridge, grid, hop, generator=reference_gen)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
