"""PhaseBridge (docs/math.md §2, §3, §4, §8): coefficients vs 50-digit and ODE oracles, identities,
moments, hop."""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath as mp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import solve_ivp

from psb_fast.bridge import PhaseBridge
from psb_fast.reference.bridge_sample import bridge_sample_reference
from psb_fast.reference.high_precision import coefficients_mp

EPS = float(np.finfo(np.float64).eps)
#: Parameter sets (p, k, varx, varv): the default, then strong negative and positive correlation.
PARAMS = [
    {},
    {"p": 0.5, "k": -0.9, "varx": 4.0, "varv": 0.25},
    {"p": 10.0, "k": 0.95, "varx": 0.1, "varv": 3.0},
]
PARAM_IDS = ["default", "p0.5-k-0.9", "p10-k0.95"]
TAUS = [1.0, 0.5] + [10.0**-e for e in range(1, 8)]
MP_FIELDS = ("sxx", "sxv", "svv", "lxx", "lxv", "lvv", "ell", "AA", "normalizer")
N_SE = 5.0  # statistical checks: |estimate - truth| <= 5 standard errors


def _t_from_tau(taus: list[float]) -> torch.Tensor:
    """t = 1 - tau in float64; the oracles are fed this t exactly (tau is then nominal up to rounding)."""
    return 1.0 - torch.tensor(taus, dtype=torch.float64)


def _rel_err(got: float, ref: mp.mpf) -> float:
    """|got - ref| / |ref| with the 50-digit reference."""
    return float(abs(mp.mpf(got) - ref) / abs(ref))


# --- accuracy against independent oracles ----------------------------------------------------


@pytest.mark.parametrize("mode", ["probODE", "SDE"])
@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
def test_coefficients_match_50_digit_oracle(params: dict, mode: str) -> None:
    """Sigma, its Cholesky factor, ell, AA and N to 1e-9 relative for tau in [1e-7, 1]."""
    bridge = PhaseBridge(**params, mode=mode)
    t = _t_from_tau(TAUS)
    co = bridge.coefficients(t)
    for i, t_i in enumerate(t.tolist()):
        ref = coefficients_mp(mp.mpf(t_i), **params, mode=mode)
        for name in MP_FIELDS:
            err = _rel_err(getattr(co, name)[i].item(), ref[name])
            assert err <= 1e-9, f"{name} at tau={TAUS[i]}: rel err {err:.2e}"


def _lyapunov_rhs(p: float):
    """dSigma/dt = A Sigma + Sigma A^T + diag(0, g^2), A = [[0, 1], [-4/tau^2, -4/tau]], plus
    d(det)/dt = -(8/tau) det + g^2 Sxx; state (Sxx, Sxv, Svv, det)."""

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        sxx, sxv, svv, det = y
        tau = 1.0 - t
        a10, a11, g2 = -4.0 / tau**2, -4.0 / tau, (p * tau) ** 2
        return np.array([
            2 * sxv,
            svv + a10 * sxx + a11 * sxv,
            2 * (a10 * sxv + a11 * svv) + g2,
            -8.0 / tau * det + g2 * sxx,
        ])

    return rhs


@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
def test_closed_form_matches_lyapunov_ode(params: dict) -> None:
    """Closed forms vs a DOP853 solve (rtol 1e-12) of the Lyapunov ODE in t, up to t = 0.99."""
    bridge = PhaseBridge(**params)
    c = bridge.c
    y0 = [bridge.varx, -c, bridge.varv, bridge.varx * bridge.varv - c * c]
    t_eval = np.array([0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99])
    sol = solve_ivp(_lyapunov_rhs(bridge.p), (0.0, 0.99), y0, method="DOP853", t_eval=t_eval,
                    rtol=1e-12, atol=1e-30)
    assert sol.success, sol.message
    sxx, sxv, svv, det = sol.y
    co = bridge.coefficients(torch.from_numpy(t_eval))
    rtol = 1e-7
    np.testing.assert_allclose(co.sxx.numpy(), sxx, rtol=rtol, atol=0)
    np.testing.assert_allclose(co.svv.numpy(), svv, rtol=rtol, atol=0)
    # Sxv may cross zero: its natural scale is sqrt(Sxx Svv) (|Sxv| <= that).
    assert np.all(np.abs(co.sxv.numpy() - sxv) <= rtol * np.sqrt(sxx * svv))
    np.testing.assert_allclose(co.lvv.numpy(), np.sqrt(det / sxx), rtol=rtol, atol=0)


# --- identities ------------------------------------------------------------------------------


def test_mean_coefficients_identity() -> None:
    """1 - cx - tau cv = tau^4; (cx, cv) = (0, 0) at t = 0 and (17/48, 7/6) at t = 1/2 (docs/math.md §2.2)."""
    t = torch.linspace(0.0, 0.9999, 1001, dtype=torch.float64)
    co = PhaseBridge().coefficients(t)
    lhs = 1.0 - co.cx - co.tau * co.cv
    assert torch.all((lhs - co.tau**4).abs() <= 8 * EPS)
    assert co.cx[0].item() == 0.0 and co.cv[0].item() == 0.0
    half = PhaseBridge().coefficients(0.5)
    assert half.cx.item() == pytest.approx(17 / 48, rel=2 * EPS)
    assert half.cv.item() == pytest.approx(7 / 6, rel=2 * EPS)


@pytest.mark.parametrize("mode", ["probODE", "SDE"])
def test_label_times_normalizer_is_f(mode: str) -> None:
    """label N = a - 0.5 g^2 ell eps_v (probODE) or a (SDE), a = 4 (x1 - x_t - tau v_t)/tau^2."""
    bridge = PhaseBridge(mode=mode)
    gen = torch.Generator().manual_seed(11)
    t = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.8, 0.9, 0.99, 0.999], dtype=torch.float64)
    shape = (len(t), 3, 5)
    x1, eps_x, eps_v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    m_t, label = bridge_sample_reference(bridge, x1, t, eps_x=eps_x, eps_v=eps_v)
    x_t, v_t = m_t[:, :3], m_t[:, 3:]
    co = bridge.coefficients(t)
    tau, g, ell, N = (c.reshape(-1, 1, 1) for c in (co.tau, co.g, co.ell, co.normalizer))
    a = 4 * (x1 - x_t - tau * v_t) / tau**2
    score_term = -0.5 * g**2 * ell * eps_v if mode == "probODE" else torch.zeros_like(a)
    f = a + score_term
    # Rounding bound: a from O(1) values divided by tau^2, the label from its three terms.
    terms = (co.label_x1.reshape(-1, 1, 1) * x1).abs() + (co.label_eps_x.reshape(-1, 1, 1) * eps_x).abs() \
        + (co.label_eps_v.reshape(-1, 1, 1) * eps_v).abs()
    tol = 32 * EPS * ((x1.abs() + x_t.abs() + tau * v_t.abs()) * 4 / tau**2 + score_term.abs() + N * terms)
    assert torch.all((label * N - f).abs() <= tol)


# --- moments of the bridge and the prior ----------------------------------------------------


def _check_moments(x: torch.Tensor, v: torch.Tensor, mean: tuple[float, float],
                   cov: tuple[float, float, float]) -> None:
    """Sample mean and covariance of the pairs (x, v) (flat, float64) within N_SE standard errors."""
    n = x.numel()
    sxx, sxv, svv = cov
    for sample, mu, var in ((x, mean[0], sxx), (v, mean[1], svv)):
        assert abs(sample.mean().item() - mu) <= N_SE * math.sqrt(var / n)
    xc, vc = x - x.mean(), v - v.mean()
    # Var of a Gaussian sample covariance entry: (S_ii S_jj + S_ij^2) / n.
    for est, truth, se2 in (
        ((xc * xc).mean(), sxx, 2 * sxx * sxx),
        ((xc * vc).mean(), sxv, sxx * svv + sxv * sxv),
        ((vc * vc).mean(), svv, 2 * svv * svv),
    ):
        assert abs(est.item() - truth) <= N_SE * math.sqrt(se2 / n), (est.item(), truth)


@pytest.mark.parametrize("params", PARAMS[:2], ids=PARAM_IDS[:2])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 0.95])
def test_bridge_samples_have_the_right_moments(params: dict, t: float) -> None:
    """(x_t, v_t) from bridge_sample_reference ~ N((cx x1, cv x1), Sigma(t)), Sigma from mpmath."""
    bridge = PhaseBridge(**params)
    rows, cols, x1_value = 100, 1000, 0.7
    gen = torch.Generator().manual_seed(1234)
    x1 = torch.full((rows, cols), x1_value, dtype=torch.float64)
    t_rows = torch.full((rows,), t, dtype=torch.float64)
    m_t, _ = bridge_sample_reference(bridge, x1, t_rows, generator=gen)
    x_t, v_t = m_t[:, :cols].flatten(), m_t[:, cols:].flatten()
    ref = coefficients_mp(mp.mpf(t), **params)
    co = bridge.coefficients(t_rows[:1])
    cov = (float(ref["sxx"]), float(ref["sxv"]), float(ref["svv"]))
    _check_moments(x_t, v_t, (co.cx.item() * x1_value, co.cv.item() * x1_value), cov)
    if t == 0.0:  # compat: the prior's x-v correlation is minus k
        corr = torch.corrcoef(torch.stack([x_t, v_t]))[0, 1].item()
        assert math.copysign(1.0, corr) == -math.copysign(1.0, bridge.k)
        assert abs(corr + bridge.k) <= N_SE * (1 - bridge.k**2) / math.sqrt(x_t.numel())


@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
def test_sample_prior_covariance_and_layout(params: dict) -> None:
    """sample_prior: [B, 2C, H, W] = [x0 | v0], per coordinate N(0, [[varx, -c], [-c, varv]])."""
    bridge = PhaseBridge(**params)
    B, C, H, W = 5000, 3, 2, 2
    m0 = bridge.sample_prior((B, C, H, W), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert m0.shape == (B, 2 * C, H, W) and m0.dtype == torch.float64
    c = bridge.c
    _check_moments(m0[:, :C].flatten(), m0[:, C:].flatten(), (0.0, 0.0), (bridge.varx, -c, bridge.varv))
    corr = torch.corrcoef(torch.stack([m0[:, :C].flatten(), m0[:, C:].flatten()]))[0, 1].item()
    assert math.copysign(1.0, corr) == -math.copysign(1.0, bridge.k)


def test_sample_prior_dtype_and_generator() -> None:
    bridge = PhaseBridge()
    assert bridge.sample_prior((4, 3)).dtype == torch.get_default_dtype()
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert bridge.sample_prior((4, 3, 2), dtype=dtype).dtype == dtype
    draws = [bridge.sample_prior((8, 2, 3), generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])
    assert bridge.sample_prior((8, 2, 3), generator=torch.Generator().manual_seed(7)).shape == (8, 4, 3)
    with pytest.raises(ValueError, match="shape_of_x"):
        bridge.sample_prior((8,))
    with pytest.raises(TypeError, match="dtype"):
        bridge.sample_prior((8, 2), dtype=torch.int32)


# --- the hop ---------------------------------------------------------------------------------


@pytest.mark.parametrize("params", PARAMS, ids=PARAM_IDS)
@pytest.mark.parametrize("mode", ["probODE", "SDE"])
def test_estimate_x1_inverts_the_label(mode: str, params: dict) -> None:
    """estimate_x1(m_t, label, t) = x1 when label is the exact label of x1 (float64)."""
    bridge = PhaseBridge(**params, mode=mode)
    t = _t_from_tau([0.6, 0.3, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5])
    gen = torch.Generator().manual_seed(3)
    shape = (len(t), 2, 4, 4)
    x1, eps_x, eps_v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    m_t, label = bridge_sample_reference(bridge, x1, t, eps_x=eps_x, eps_v=eps_v)
    x1_hat = bridge.estimate_x1(m_t, label, t)
    assert x1_hat.dtype == torch.float64
    assert (x1_hat - x1).abs().max().item() <= 1e-10


# --- validation and shapes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"p": 0.0}, "p"),
        ({"p": -1.0}, "p"),
        ({"varx": -1.0}, "varx"),
        ({"varv": 0.0}, "varv"),
        ({"k": 1.0}, "k"),
        ({"k": -1.5}, "k"),
        ({"mode": "foo"}, "mode"),
        ({"p": float("nan")}, "p"),
        ({"k": float("nan")}, "k"),
        ({"varx": float("inf")}, "varx"),
        ({"varv": float("nan")}, "varv"),
    ],
)
def test_bridge_rejects_bad_parameters(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must") as info:
        PhaseBridge(**kwargs)
    assert str(next(iter(kwargs.values()))) in str(info.value)


@pytest.mark.parametrize(
    ("t", "shown"),
    [
        (1.0, "1.0"),
        (-0.1, "-0.1"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (torch.tensor([0.2, 0.5, 1.5]), "1.5"),
    ],
)
def test_coefficients_reject_bad_t(t, shown: str) -> None:
    with pytest.raises(ValueError, match=rf"^t must .* got {shown}"):
        PhaseBridge().coefficients(t)


@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
def test_coefficients_keep_the_shape_of_t(shape: tuple[int, ...]) -> None:
    """Any shape of t works; every field has t's shape, float64, and matches per-element calls."""
    bridge = PhaseBridge()
    t = torch.rand(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.999
    co = bridge.coefficients(t)
    for name in ("cx", "lvv", "ell", "AA", "normalizer", "hop_den"):
        field = getattr(co, name)
        assert field.shape == shape and field.dtype == torch.float64
        for i, t_i in enumerate(t.flatten()):
            one = getattr(bridge.coefficients(t_i.clone()), name)
            assert one.shape == ()
            assert field.flatten()[i].item() == pytest.approx(one.item(), rel=4 * EPS)


@pytest.mark.parametrize("t", [0.9, 1.0 - 1e-8])
def test_python_float_t_is_taken_in_float64(t: float) -> None:
    """coefficients(t) for a Python float equals coefficients of the float64 tensor of t."""
    bridge = PhaseBridge()
    co = bridge.coefficients(t)
    assert co.tau.item() == 1.0 - t
    assert co.lvv.item() == bridge.coefficients(torch.tensor(t, dtype=torch.float64)).lvv.item()


def test_extreme_parameters_lvv_at_t0() -> None:
    """docs/math.md §3.4 asks 1e-9 for tau in [1e-7, 1]; here p^2 / det Sigma0 ~ 5e7."""
    params = {"p": 20.0, "k": 0.99, "varx": 0.02, "varv": 0.02}
    lvv = PhaseBridge(**params).coefficients(torch.zeros((), dtype=torch.float64)).lvv.item()
    assert _rel_err(lvv, coefficients_mp(mp.mpf(0), **params)["lvv"]) <= 1e-9


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(
    p=st.floats(0.1, 10.0),
    k=st.floats(-0.95, 0.95),
    varx=st.floats(0.1, 10.0),
    varv=st.floats(0.1, 10.0),
    log10_tau=st.floats(-7.0, 0.0),
    mode=st.sampled_from(["probODE", "SDE"]),
)
@pytest.mark.slow
def test_random_parameters_accurate_and_consistent(p, k, varx, varv, log10_tau, mode) -> None:
    """Random parameters (the span of PARAMS) and tau in [1e-7, 1]: Lvv > 0, Lvv/ell/AA/N to 1e-9
    vs 50 digits, and Lvv^2 Sxx = Sxx Svv - Sxv^2 (tau >= 1e-2, where the right side is resolvable)."""
    bridge = PhaseBridge(p=p, k=k, varx=varx, varv=varv, mode=mode)
    t = 1.0 - 10.0**log10_tau
    co = bridge.coefficients(torch.tensor(t, dtype=torch.float64))
    assert co.lvv.item() > 0
    ref = coefficients_mp(mp.mpf(t), p=p, k=k, varx=varx, varv=varv, mode=mode)
    for name in ("lvv", "ell", "AA", "normalizer"):
        assert _rel_err(getattr(co, name).item(), ref[name]) <= 1e-9, name
    tau = 1.0 - t
    if tau >= 1e-2:
        sxx, sxv, svv = (Fraction(getattr(co, name).item()) for name in ("sxx", "sxv", "svv"))
        det = sxx * svv - sxv * sxv  # exact for the rounded entries
        lhs = Fraction(co.lvv.item()) ** 2 * sxx
        # Entries carry ~1e-16 relative error, which the difference amplifies by (Sxx Svv + Sxv^2)/det.
        tol = 1e-9 * abs(det) + 8 * EPS * float(sxx * svv + sxv * sxv)
        assert abs(float(lhs - det)) <= tol
