"""Peer samplers on exact drifts (psb_fast.benchmarks.peers) and the quality study's plumbing."""

import json
import math

import pytest
import torch
from scipy.integrate import solve_ivp

from psb_fast.benchmarks import bench_quality, peers
from psb_fast.oracles import GaussianMixture, mixture_2d_grid

torch.set_num_threads(1)

TWO = GaussianMixture([[0.5, -0.3], [-0.7, 0.4]], [0.3, 0.2], [0.6, 0.4])
SMOOTH = GaussianMixture([[0.3, -0.2]], [0.6])  # one wide component: a smooth flow for rate checks


def _log_density(mix: GaussianMixture, y: torch.Tensor, a: float, sigma: float) -> torch.Tensor:
    """log p(y) for y = a x + sigma z, x ~ mix, summed Gaussian log-pdfs (independent of peers)."""
    var = a * a * mix.stds**2 + sigma * sigma  # [K]
    sq = ((y[:, None, :] - a * mix.means[None]) ** 2).sum(-1)  # [B, K]
    logp = torch.log(mix.weights) - 0.5 * mix.dim * torch.log(2 * math.pi * var) - 0.5 * sq / var
    return torch.logsumexp(logp, dim=1)


def _fd_grad(fn, y: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    grad = torch.zeros_like(y)
    for j in range(y.shape[1]):
        e = torch.zeros_like(y)
        e[:, j] = h
        grad[:, j] = (fn(y + e) - fn(y - e)) / (2 * h)
    return grad


@pytest.mark.parametrize("a, sigma", [(0.9, 0.4), (0.2, 1.0), (1.0, 0.05)])
def test_posterior_mean_is_tweedie(a, sigma):
    # Tweedie: E[x | y] = (y + sigma^2 grad log p(y)) / a, the gradient by finite differences.
    y = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grad = _fd_grad(lambda yy: _log_density(TWO, yy, a, sigma), y)
    expected = (y + sigma**2 * grad) / a
    torch.testing.assert_close(peers.mixture_posterior_mean(TWO, y, a, sigma), expected, rtol=0, atol=1e-7)


def test_vp_model_and_schedule():
    sch = peers.VPSchedule()
    for t in (1e-3, 0.3, 1.0):
        assert sch.t_of_lam(sch.lam(t)) == pytest.approx(t, rel=1e-12)
        alpha, sigma = sch.alpha_sigma(t)
        assert alpha**2 + sigma**2 == pytest.approx(1.0, rel=1e-14)
    grid = sch.grid(4)
    lams = [sch.lam(t) for t in grid]
    assert grid[0] == 1.0 and grid[-1] == sch.eps
    assert max(lams[i + 1] - lams[i] for i in range(4)) == pytest.approx(
        min(lams[i + 1] - lams[i] for i in range(4))
    )
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alpha, sigma = sch.alpha_sigma(0.5)
    grad = _fd_grad(lambda yy: _log_density(TWO, yy, alpha, sigma), x)
    torch.testing.assert_close(
        peers.vp_model(TWO, sch)(x, 0.5), (x + sigma**2 * grad) / alpha, rtol=0, atol=1e-7
    )


@pytest.mark.parametrize("t", [0.0, 0.3, 0.9, 1.0 - 1e-9, 1.0])
def test_fm_velocity(t):
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = peers.fm_model(TWO)(x, t)
    if t == 0.0:
        expected = (TWO.weights @ TWO.means).expand_as(x) - x
    elif t == 1.0:
        expected = x  # E[x1 - z | x1] = x1
    else:
        expected = (peers.mixture_posterior_mean(TWO, x, t, 1 - t) - x) / (1 - t)
    tol = 1e-6 if t > 0.99 else 1e-12
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)


def test_cld_covariance_solves_lyapunov():
    cld = peers.CLD()
    A = torch.tensor([[0.0, cld.m_inv], [-1.0, -cld.Gamma * cld.m_inv]], dtype=torch.float64)
    Q = torch.tensor([[0.0, 0.0], [0.0, 2 * cld.Gamma]], dtype=torch.float64)

    def rhs(s, y):
        S = torch.from_numpy(y).view(2, 2)
        return (A @ S + S @ A.T + Q).reshape(-1).numpy()

    S0 = torch.diag(torch.tensor([0.0, cld.gamma * cld.M], dtype=torch.float64))
    for t in (1e-3, 0.1, 1.0):
        sol = solve_ivp(
            rhs, (0, cld.beta * t), S0.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-14
        )
        S = sol.y[:, -1]
        sxx, sxv, svv = cld.covariance(t)
        assert sxx == pytest.approx(S[0], rel=1e-7) and sxv == pytest.approx(S[1], rel=1e-7)
        assert svv == pytest.approx(S[3], rel=1e-7)
        cx, cv = cld.mean_map(t)
        phi = torch.linalg.matrix_exp(A * cld.beta * t)
        assert (cx, cv) == pytest.approx((phi[0, 0].item(), phi[1, 0].item()), rel=1e-12)


@pytest.mark.parametrize("t", [1e-3, 0.05, 0.5, 1.0])
def test_cld_score_is_gradient_of_log_density(t):
    cld = peers.CLD()
    cx, cv = cld.mean_map(t)
    sxx, sxv, svv = cld.covariance(t)
    c = torch.tensor([cx, cv], dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x0 = TWO.sample(6, gen)
    u = torch.cat([cx * x0, cv * x0], 1) + 0.5 * torch.randn(
        6, 4, generator=gen, dtype=torch.float64
    ) * math.sqrt(sxx + svv)

    def log_p(uu):  # per component, each coordinate's (x, v) ~ N(c mu, s^2 c c^T + Sigma)
        terms = []
        for k in range(TWO.n_components):
            S = TWO.stds[k] ** 2 * torch.outer(c, c) + torch.tensor(
                [[sxx, sxv], [sxv, svv]], dtype=torch.float64
            )
            pairs = torch.stack([uu[:, :2], uu[:, 2:]], -1) - TWO.means[k][:, None] * c  # [B, D, 2]
            quad = torch.einsum("bdi,ij,bdj->b", pairs, torch.linalg.inv(S), pairs)
            terms.append(torch.log(TWO.weights[k]) - 0.5 * quad - torch.logdet(2 * math.pi * S))
        return torch.logsumexp(torch.stack(terms, 1), 1)

    h = 1e-6 * math.sqrt(svv)
    grad_v = _fd_grad(log_p, u, h)[:, 2:]
    torch.testing.assert_close(
        peers.cld_model(TWO, cld)(u, t), grad_v, rtol=1e-5, atol=1e-5 * grad_v.abs().max()
    )


def _rates(errors: list[float]) -> list[float]:
    return [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]


def test_samplers_converge_to_their_odes_at_their_order():
    gen = torch.Generator().manual_seed(4)
    x1 = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    sch = peers.VPSchedule()
    vp = peers.vp_model(SMOOTH, sch)
    ref = peers.vp_ode_solution(vp, sch, x1, 1e-11, 1e-11)
    fm = peers.fm_model(SMOOTH)
    ref_fm = peers.fm_ode_solution(fm, x1, 1e-11, 1e-11)
    nfes = (16, 32, 64)

    def err(fn, target):
        return [float((fn(n) - target).pow(2).mean().sqrt()) for n in nfes]

    ddim = _rates(err(lambda n: peers.ddim(vp, sch, x1, n), ref))
    dpm = _rates(err(lambda n: peers.dpm_solver_pp_2m(vp, sch, x1, n), ref))
    euler = _rates(err(lambda n: peers.fm_euler(fm, x1, n), ref_fm))
    heun = _rates(err(lambda n: peers.fm_heun(fm, x1, n + 1)[0], ref_fm))  # n/2 + 1 steps
    assert all(0.8 < r < 1.3 for r in ddim + euler), (ddim, euler)
    assert all(1.7 < r < 2.5 for r in dpm + heun), (dpm, heun)


def test_dpm_solver_pp_beats_ddim_on_the_oracle():
    mix = mixture_2d_grid()
    sch = peers.VPSchedule()
    model = peers.vp_model(mix, sch)
    x1 = torch.randn(128, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = peers.vp_ode_solution(model, sch, x1)
    for nfe in (5, 10):
        e_ddim = float((peers.ddim(model, sch, x1, nfe) - ref).pow(2).mean().sqrt())
        e_dpm = float((peers.dpm_solver_pp_2m(model, sch, x1, nfe) - ref).pow(2).mean().sqrt())
        assert e_dpm < 0.7 * e_ddim, (nfe, e_dpm, e_ddim)


def test_heun_counts_nfe():
    calls = []

    def model(x, t):
        calls.append(t)
        return -x

    z = torch.ones(2, 1, dtype=torch.float64)
    for budget, used in ((3, 3), (4, 3), (10, 9)):
        calls.clear()
        _, n = peers.fm_heun(model, z, budget)
        assert n == used == len(calls) and max(calls) < 1.0


def test_sscs_samples_the_data_distribution():
    mix = GaussianMixture([[0.4]], [0.3])
    cld = peers.CLD()
    gen = torch.Generator().manual_seed(6)
    n = 4000
    x = peers.cld_sscs(peers.cld_model(mix, cld), cld, cld.prior(n, 1, gen), 100, gen)
    se_mean, se_var = 0.3 / math.sqrt(n), 0.09 * math.sqrt(2 / n)
    assert abs(x.mean().item() - 0.4) < 5 * se_mean + 0.01
    assert abs(x.var().item() - 0.09) < 5 * se_var + 0.005
    x_bad = peers.cld_sscs(lambda u, t: torch.zeros_like(u[:, :1]), cld, cld.prior(n, 1, gen), 100, gen)
    assert abs(x_bad.var().item() - 0.09) > 0.1  # a wrong score is detected


def test_bad_arguments():
    with pytest.raises(ValueError, match="nfe"):
        peers.ddim(peers.vp_model(TWO, peers.VPSchedule()), peers.VPSchedule(), torch.zeros(2, 2), 0)
    with pytest.raises(ValueError, match="y must be"):
        peers.mixture_posterior_mean(TWO, torch.zeros(2, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="mixtures"):
        bench_quality.run_quality(True, "unused", mixtures=("nope",))


@pytest.mark.slow
def test_quick_study_writes_its_files(tmp_path):
    report = bench_quality.run_quality(
        True, tmp_path, seeds=(0,), progress=False, nfes=(3, 5), batch=32, mixtures=("grid4x4",)
    )
    for name in ("quality_table.md", "quality.json", "quality_vs_nfe.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "quality.json").read_text())
    methods = saved["mixtures"]["grid4x4"]["methods"]
    assert set(methods) == {m.name for m in bench_quality.METHODS}
    assert methods["CLD SSCS"]["by_nfe"]["3"]["rmse"] is None
    assert methods["AGM-SDE published"]["by_nfe"]["5"]["rmse"] is None
    entry = methods["VP DDIM"]["by_nfe"]["5"]
    assert len(entry["rmse"]["values"]) == 1 and entry["rmse"]["mean"] > 0
    assert methods["FM Heun"]["by_nfe"]["5"]["nfe_used"] == 5
    assert saved["mixtures"]["grid4x4"]["sw_floor"]["mean"] > 0
    table = (tmp_path / "quality_table.md").read_text()
    assert "| grid4x4 | VP DPM-Solver++(2M) | RMSE |" in table and "floor" in table
    assert report["mixtures"]["grid4x4"]["methods"]["AGM-ODE published"]["by_nfe"]["3"]["sw"]["mean"] > 0
