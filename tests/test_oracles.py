"""The Gaussian-mixture oracle: posterior mean, score, drift and the exact probability flow."""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from scipy.integrate import quad

from psb_fast.bridge import PhaseBridge
from psb_fast.oracles import (
    GaussianMixture,
    mixture_2d_grid,
    mixture_2d_ring,
    mixture_random,
    ode_solution,
)
from psb_fast.reference.high_precision import sigma_mp

N_SE = 5.0  # statistical checks: |estimate - truth| <= 5 standard errors
#: 1-D, two components of different weight and width.
MEANS_1D, STDS_1D, WEIGHTS_1D = [-1.0, 0.8], [0.3, 0.15], [0.3, 0.7]


def _mixture_1d() -> GaussianMixture:
    return GaussianMixture([[mu] for mu in MEANS_1D], STDS_1D, WEIGHTS_1D)


def _state(bridge: PhaseBridge, t: float, x1: float, eps_x: float, eps_v: float) -> tuple[float, float]:
    """A typical 1-D state m_t = (cx x1 + Lxx eps_x, cv x1 + Lxv eps_x + Lvv eps_v)."""
    co = bridge.coefficients(torch.tensor(t, dtype=torch.float64))
    x = co.cx.item() * x1 + co.lxx.item() * eps_x
    v = co.cv.item() * x1 + co.lxv.item() * eps_x + co.lvv.item() * eps_v
    return x, v


STATES = [(0.5, 0.3, -1.2), (0.85, -1.0, 0.5), (-2.0, 2.0, 2.0)]  # (x1, eps_x, eps_v)


# --- (a) the posterior mean and the drift against independent computations -----------------


def _quadrature_posterior_mean(co, m: np.ndarray) -> float:
    """int x1 p(x1) N(m; c x1, Sigma) dx1 / int p(x1) N(m; c x1, Sigma) dx1 by scipy quad (1-D mixture)."""
    c = np.array([co.cx.item(), co.cv.item()])
    sigma_inv = np.linalg.inv(np.array([[co.sxx.item(), co.sxv.item()], [co.sxv.item(), co.svv.item()]]))

    def log_integrand(x1: float) -> float:
        r = m - c * x1
        prior = sum(
            w * math.exp(-0.5 * ((x1 - mu) / s) ** 2) / s
            for mu, s, w in zip(MEANS_1D, STDS_1D, WEIGHTS_1D, strict=True)
        )
        return math.log(prior) - 0.5 * r @ sigma_inv @ r

    lo, hi = -4.0, 4.0
    shift = max(log_integrand(x) for x in np.linspace(lo, hi, 2001))
    peak = (c @ sigma_inv @ m) / (c @ sigma_inv @ c)  # the likelihood's maximum in x1
    opts = {"points": sorted(p for p in [*MEANS_1D, peak] if lo < p < hi), "epsabs": 0.0, "epsrel": 1e-12,
            "limit": 200}
    den = quad(lambda x: math.exp(log_integrand(x) - shift), lo, hi, **opts)[0]
    num = quad(lambda x: x * math.exp(log_integrand(x) - shift), lo, hi, **opts)[0]
    return num / den


@pytest.mark.parametrize("t", [0.05, 0.4, 0.8, 0.95])
def test_posterior_mean_matches_quadrature(t: float) -> None:
    """E[x1 | m] from the oracle vs brute-force integration over x1, at typical and atypical m."""
    bridge = PhaseBridge()
    mixture = _mixture_1d()
    co = bridge.coefficients(torch.tensor(t, dtype=torch.float64))
    for state in STATES:
        m = np.array(_state(bridge, t, *state))
        got = mixture.posterior_mean(bridge, torch.from_numpy(m)[None], t).item()
        assert got == pytest.approx(_quadrature_posterior_mean(co, m), rel=1e-9, abs=1e-12), state


#: 2-D, the same two components (log-evidences then sum over the coordinates).
MEANS_2D = [[-1.0, 0.5], [0.8, -0.3]]


def _log_p_component(sigma, c, mu, s, w, xs, vs):
    """log (pi_k prod_j N(m_j; c mu_kj, Sigma + s_k^2 c c^T)) up to a common constant (mpmath)."""
    cov = sigma + s**2 * c * c.T
    cov_inv = cov**-1
    out = mp.log(w) - len(xs) * mp.log(mp.det(cov)) / 2
    for x, v, mu_j in zip(xs, vs, mu, strict=True):
        r = mp.matrix([x, v]) - c * mu_j
        out -= (r.T * cov_inv * r)[0] / 2
    return out


def _reference_mp(bridge: PhaseBridge, t: float, xs: list[float], vs: list[float]) -> list[list[mp.mpf]]:
    """[E[x1 | m], grad_v log p_t(m), E[f | m]] (each [D]) at 50 digits for the 2-D mixture.

    p_t(m) = sum_k pi_k prod_j N(m_j; c mu_kj, Sigma + s_k^2 c c^T) with the full inverse; the
    score is the numerical derivative (mpmath) of log p_t in v_j, independent of the posterior mean.
    """
    tau, sxx, sxv, svv = sigma_mp(mp.mpf(t), bridge.p, bridge.k, bridge.varx, bridge.varv)
    tm = 1 - tau
    c = mp.matrix([tm**2 * (tm**2 - 4 * tm + 6) / 3, 4 * tm * (tm**2 - 3 * tm + 3) / 3])
    sigma = mp.matrix([[sxx, sxv], [sxv, svv]])
    comps = [([mp.mpf(a) for a in mu], mp.mpf(s), mp.mpf(w))
             for mu, s, w in zip(MEANS_2D, STDS_1D, WEIGHTS_1D, strict=True)]
    xs, vs = [mp.mpf(x) for x in xs], [mp.mpf(v) for v in vs]

    def log_p(vs_):
        terms = [_log_p_component(sigma, c, mu, s, w, xs, vs_) for mu, s, w in comps]
        top = max(terms)
        return top + mp.log(sum(mp.exp(term - top) for term in terms))

    scores = [mp.diff(lambda vj, j=j: log_p(vs[:j] + [vj] + vs[j + 1 :]), vs[j]) for j in range(len(xs))]
    sigma_inv = sigma**-1
    a = (c.T * sigma_inv * c)[0]
    resp = [mp.exp(_log_p_component(sigma, c, mu, s, w, xs, vs) - log_p(vs)) for mu, s, w in comps]
    out = [[], [], []]
    for j, (x, v) in enumerate(zip(xs, vs, strict=True)):
        b = (c.T * sigma_inv * mp.matrix([x, v]))[0]
        x1_hat = sum(r * (mu[j] / s**2 + b) / (1 / s**2 + a)
                     for r, (mu, s, _) in zip(resp, comps, strict=True))
        f = 4 * (x1_hat - x - tau * v) / tau**2
        if bridge.mode == "probODE":
            f -= (mp.mpf(bridge.p) * tau) ** 2 * scores[j] / 2
        for values, value in zip(out, (x1_hat, scores[j], f), strict=True):
            values.append(value)
    return out


@pytest.mark.parametrize("mode", ["probODE", "SDE"])
@pytest.mark.slow
def test_oracle_matches_50_digit_reference(mode: str) -> None:
    """Posterior mean, score and E[f | m] in 2-D to 1e-12 relative for tau from 1 down to 1e-5
    (where E[f | m] ~ tau^2 is a tiny difference of O(1) terms in the naive form)."""
    bridge = PhaseBridge(mode=mode)
    mixture = GaussianMixture(MEANS_2D, STDS_1D, WEIGHTS_1D)
    with mp.workdps(50):
        _check_against_mp(bridge, mixture)


def _check_against_mp(bridge: PhaseBridge, mixture: GaussianMixture) -> None:
    for tau in [1.0, 0.5, 1e-1, 1e-2, 1e-3, 1e-5]:
        t = 1.0 - tau
        for i in range(len(STATES)):
            (xa, va), (xb, vb) = (_state(bridge, t, *STATES[j % len(STATES)]) for j in (i, i + 1))
            m = torch.tensor([[xa, xb, va, vb]], dtype=torch.float64)
            got = (
                mixture.posterior_mean(bridge, m, t)[0],
                mixture.score(bridge, m, t)[0],
                mixture.expected_f(bridge, m, t)[0],
            )
            refs = _reference_mp(bridge, t, [xa, xb], [va, vb])
            for name, values, ref in zip(("x1_hat", "score", "f"), got, refs, strict=True):
                err = max(float(abs(mp.mpf(g.item()) - r) / abs(r)) for g, r in zip(values, ref, strict=True))
                assert err <= 1e-12, f"{name} at tau={tau}, state {i}: rel err {err:.1e}"


@pytest.mark.parametrize("mode", ["probODE", "SDE"])
def test_hop_of_the_oracle_output_is_the_posterior_mean(mode: str) -> None:
    """The hop inverts the label, which is linear in x1: estimate_x1(m, F_oracle) = E[x1 | m]."""
    bridge = PhaseBridge(mode=mode)
    mixture = mixture_random(dim=3, k=4, seed=0)
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0.1, 0.4, 0.7, 0.9, 0.99, 0.999], dtype=torch.float64)
    m = bridge.sample_prior((len(t), 3), generator=gen, dtype=torch.float64)
    F = mixture.drift(bridge, m, t)
    x1_hat = mixture.posterior_mean(bridge, m, t)
    torch.testing.assert_close(bridge.estimate_x1(m, F, t), x1_hat, rtol=1e-10, atol=1e-10)
    normalizer = bridge.coefficients(t).normalizer[:, None]
    torch.testing.assert_close(F * normalizer, mixture.expected_f(bridge, m, t), rtol=1e-14, atol=0)


def test_drift_rows_and_model_dtype() -> None:
    """Per-row t (including t = 0, where the posterior is the prior) equals one call per row;
    as_model returns m's dtype."""
    bridge = PhaseBridge()
    mixture = mixture_2d_grid()
    m = bridge.sample_prior((5, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 0.0, 0.9, 0.99], dtype=torch.float64)
    rows = torch.cat([mixture.drift(bridge, m[i : i + 1], t[i]) for i in range(5)])
    torch.testing.assert_close(mixture.drift(bridge, m, t), rows, rtol=1e-15, atol=0)
    prior_mean = mixture.weights @ mixture.means
    torch.testing.assert_close(mixture.posterior_mean(bridge, m[:1], 0.0)[0], prior_mean, rtol=0, atol=1e-15)
    model = mixture.as_model(bridge)
    out = model(m.float(), t.float())
    assert out.dtype == torch.float32 and out.shape == (5, 2)
    exact = mixture.drift(bridge, m.float(), t.float())
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-6)


# --- (b) the probability flow carries the prior to the data distribution ---------------------


@pytest.mark.slow
def test_probability_flow_transports_prior_to_mixture() -> None:
    """m0 ~ prior, exact flow from t0 = 1e-5 to 0.999: x ~ sum_k pi_k N(cx mu_k, (cx^2 s_k^2 + Sxx) I).

    Per component (nearest mode): its share vs pi_k, its mean and per-axis variance, each within
    5 standard errors for 2000 samples.
    """
    bridge = PhaseBridge()
    mixture = GaussianMixture(
        [[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]], [0.1, 0.2, 0.15, 0.25], [0.1, 0.2, 0.3, 0.4]
    )
    n = 2000
    m0 = bridge.sample_prior((n, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    m1 = ode_solution(mixture, bridge, m0, 1e-5, 0.999)
    x = m1[:, :2]
    co = bridge.coefficients(torch.tensor(0.999, dtype=torch.float64))
    centers = co.cx * mixture.means
    nearest = torch.cdist(x, centers).argmin(dim=1)
    for k in range(mixture.n_components):
        share, weight = (nearest == k).double().mean().item(), mixture.weights[k].item()
        assert abs(share - weight) <= N_SE * math.sqrt(weight * (1 - weight) / n), k
        xk = x[nearest == k]
        var = (co.cx**2 * mixture.stds[k] ** 2 + co.sxx).item()
        assert torch.all((xk.mean(0) - centers[k]).abs() <= N_SE * math.sqrt(var / len(xk))), k
        assert torch.all((xk.var(0) - var).abs() <= N_SE * var * math.sqrt(2 / (len(xk) - 1))), k


@pytest.mark.slow
def test_ode_solution_round_trip_and_validation() -> None:
    """Forward 0.3 -> 0.8 then back recovers m (the flow is deterministic and invertible)."""
    bridge = PhaseBridge()
    mixture = mixture_2d_ring()
    m0 = bridge.sample_prior((50, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    m1 = ode_solution(mixture, bridge, m0, 0.3, 0.8, rtol=1e-9, atol=1e-9)
    assert m1.shape == m0.shape and m1.dtype == torch.float64
    assert (m1 - m0).abs().max().item() > 0.1
    back = ode_solution(mixture, bridge, m1, 0.8, 0.3, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(back, m0, rtol=0, atol=1e-6)
    assert torch.equal(ode_solution(mixture, bridge, m0.float(), 0.5, 0.5), m0.float().double())
    with pytest.raises(ValueError, match="t1 must .* got 0.9999"):
        ode_solution(mixture, bridge, m0, 0.2, 0.9999)
    with pytest.raises(ValueError, match="t0 must .* got -0.1"):
        ode_solution(mixture, bridge, m0, -0.1, 0.5)
    with pytest.raises(ValueError, match=r"m0 must be a \[B, 4\]"):
        ode_solution(mixture, bridge, m0[:, :3], 0.2, 0.5)


# --- (c) the mixture itself ------------------------------------------------------------------


def test_sample_moments_and_named_mixtures() -> None:
    mixture = _mixture_1d()
    n = 40_000
    x = mixture.sample(n, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, 1) and x.dtype == torch.float64
    mean = sum(w * mu for mu, w in zip(MEANS_1D, WEIGHTS_1D, strict=True))
    second = sum(w * (mu * mu + s * s) for mu, s, w in zip(MEANS_1D, STDS_1D, WEIGHTS_1D, strict=True))
    assert abs(x.mean().item() - mean) <= N_SE * math.sqrt((second - mean**2) / n)
    share = (x < -0.1).double().mean().item()  # the modes are > 3 std from -0.1
    assert abs(share - 0.3) <= N_SE * math.sqrt(0.3 * 0.7 / n)
    same = [mixture.sample(5, generator=torch.Generator().manual_seed(4)) for _ in range(2)]
    assert torch.equal(*same)

    grid, ring = mixture_2d_grid(), mixture_2d_ring()
    assert (grid.n_components, grid.dim, ring.n_components, ring.dim) == (9, 2, 8, 2)
    for mix in (grid, ring, mixture_random(16, 5, seed=1)):
        assert 0.5 <= mix.means.abs().max().item() <= 1.5
        assert mix.weights.sum().item() == pytest.approx(1.0, abs=1e-15)
    torch.testing.assert_close(mixture_random(4, 3, seed=2).means, mixture_random(4, 3, seed=2).means)
    assert not torch.equal(mixture_random(4, 3, seed=2).means, mixture_random(4, 3, seed=3).means)


@pytest.mark.parametrize(
    ("args", "error", "pattern"),
    [
        (([1.0, 2.0], [0.1, 0.1]), ValueError, r"^means must be a non-empty 2-d tensor, got shape \(2,\)"),
        (([[1.0], [float("nan")]], [0.1, 0.1]), ValueError, "^means must be finite, got nan"),
        (("abc", [0.1]), TypeError, "^means must be a real"),
        (([[1.0], [2.0]], [0.1]), ValueError, r"^stds must have shape \[2\] .* got \(1,\)"),
        (([[1.0], [2.0]], [0.1, 0.0]), ValueError, "^stds must be > 0, got 0.0"),
        (([[1.0], [2.0]], [0.1, -1.0]), ValueError, "^stds must be > 0, got -1.0"),
        (([[1.0], [2.0]], [0.1, float("inf")]), ValueError, "^stds must be finite, got inf"),
        (([[1.0], [2.0]], [0.1, 0.1], [1.0, -0.5]), ValueError, "^weights must be >= 0, got -0.5"),
        (([[1.0], [2.0]], [0.1, 0.1], [0.0, 0.0]), ValueError, "^weights must have a positive sum, got 0.0"),
        (([[1.0], [2.0]], [0.1, 0.1], [1.0]), ValueError, r"^weights must have shape \[2\]"),
    ],
)
def test_mixture_rejects_bad_inputs(args: tuple, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        GaussianMixture(*args)


def test_oracle_rejects_bad_calls() -> None:
    bridge, mixture = PhaseBridge(), mixture_2d_grid()
    m = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^m must be a \[B, 4\] tensor .* got \(3, 6\)"):
        mixture.drift(bridge, torch.zeros(3, 6), 0.5)
    with pytest.raises(ValueError, match=r"^t must be a scalar or of shape \[3\], got \(2,\)"):
        mixture.drift(bridge, m, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="^t must be finite and in"):
        mixture.posterior_mean(bridge, m, 1.0)
    with pytest.raises(ValueError, match="^n must be a positive int, got 0"):
        mixture.sample(0)
    with pytest.raises(ValueError, match="^dim must be a positive int, got 0"):
        mixture_random(0, 3, seed=0)
    with pytest.raises(ValueError, match="^std_range must satisfy"):
        mixture_random(2, 3, seed=0, std_range=(0.0, 0.1))
