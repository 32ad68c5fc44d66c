"""Anisotropic (per-axis, rotated) Gaussian mixtures: the exact denoiser, sampling and the AGM posterior."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from psb_fast.bridge import PhaseBridge
from psb_fast.oracles import GaussianMixture

N_SE = 5.0


def _rotation(dim: int, seed: int) -> torch.Tensor:
    """A random orthogonal [dim, dim] matrix (QR of a Gaussian matrix)."""
    gauss = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    return q * torch.sign(torch.diagonal(r))


ROT3 = _rotation(3, 0)
MIX = GaussianMixture(
    [[0.5, -0.3, 0.2], [-0.7, 0.4, -0.1]], [[0.3, 0.05, 0.6], [0.1, 0.4, 0.2]], [0.35, 0.65], rotation=ROT3
)


def _full_cov(mix: GaussianMixture) -> torch.Tensor:
    """R diag(s_k^2) R^T built by hand, [K, D, D]."""
    rot = torch.eye(mix.dim, dtype=torch.float64) if mix.rotation is None else mix.rotation
    return torch.stack([rot @ torch.diag(s**2) @ rot.T for s in mix.axis_stds])


def _brute_denoise(mix: GaussianMixture, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """E[x | y] with full covariance matrices: r_k ∝ pi_k N(y; mu_k, S_k + I/a), E[x | y, k] =
    mu_k + S_k (S_k + I/a)^-1 (y - mu_k); a per row [B]."""
    eye = torch.eye(mix.dim, dtype=torch.float64)
    out = []
    for yb, ab in zip(y, a, strict=True):
        logs, means = [], []
        for mu, cov, w in zip(mix.means, _full_cov(mix), mix.weights, strict=True):
            total = cov + eye / ab
            logs.append(torch.log(w) + MultivariateNormal(mu, total).log_prob(yb))
            means.append(mu + cov @ torch.linalg.solve(total, yb - mu))
        r = torch.softmax(torch.stack(logs), 0)
        out.append((r[:, None] * torch.stack(means)).sum(0))
    return torch.stack(out)


def test_single_gaussian_closed_form() -> None:
    mix = GaussianMixture([[0.4, -1.0, 0.3]], [[0.2, 0.7, 0.05]], rotation=ROT3)
    cov = _full_cov(mix)[0]
    y = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for a in (1e-3, 0.7, 30.0, 1e6):
        expected = mix.means[0] + (cov @ torch.linalg.solve(cov + torch.eye(3, dtype=torch.float64) / a,
                                                             (y - mix.means[0]).T)).T
        torch.testing.assert_close(mix.denoise(y, a), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(mix.denoise(y, 0.0), mix.means[0].expand(6, 3), rtol=0, atol=1e-15)


@pytest.mark.parametrize("mix", [MIX, GaussianMixture(MIX.means, MIX.axis_stds, MIX.weights)],
                         ids=["rotated", "axis-aligned"])
def test_two_components_against_full_covariances(mix: GaussianMixture) -> None:
    gen = torch.Generator().manual_seed(2)
    y = 1.5 * torch.randn(8, 3, generator=gen, dtype=torch.float64)
    rows = torch.tensor([0.0, 1e-2, 0.3, 1.0, 4.0, 25.0, 400.0, 1e5], dtype=torch.float64)
    expected = _brute_denoise(mix, y, rows.clamp_min(1e-300))
    torch.testing.assert_close(mix.denoise(y, rows), expected, rtol=0, atol=1e-10)  # per-row path
    torch.testing.assert_close(mix.denoise(y, rows[:, None]), expected, rtol=0, atol=1e-10)
    for i, a in enumerate(rows.tolist()):  # one precision for the batch: the matrix-product path
        torch.testing.assert_close(mix.denoise(y[i : i + 1], a), expected[i : i + 1], rtol=0, atol=1e-10)
        shared = mix.denoise(y, a)
        torch.testing.assert_close(mix.denoise(y, a, residual=True), shared - y, rtol=0, atol=1e-12)


def test_isotropic_special_case() -> None:
    """stds [K, D] with equal columns, any rotation, gives the isotropic mixture's denoiser."""
    iso = GaussianMixture(MIX.means, [0.3, 0.1], MIX.weights)
    aniso = GaussianMixture(MIX.means, [[0.3] * 3, [0.1] * 3], MIX.weights, rotation=ROT3)
    y = torch.randn(16, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = torch.rand(16, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 50
    torch.testing.assert_close(aniso.denoise(y, a), iso.denoise(y, a), rtol=0, atol=1e-12)
    torch.testing.assert_close(aniso.denoise(y, 3.0), iso.denoise(y, 3.0), rtol=0, atol=1e-12)
    assert iso.isotropic and not aniso.isotropic
    torch.testing.assert_close(aniso.covariances(), iso.covariances(), rtol=0, atol=1e-15)


def test_sample_covariance() -> None:
    n = 40_000
    single = GaussianMixture([[1.0, -2.0, 0.5]], [[0.2, 1.0, 0.5]], rotation=ROT3)
    x = single.sample(n, torch.Generator().manual_seed(5))
    cov = _full_cov(single)[0]
    diag = torch.diagonal(cov)
    se_mean = torch.sqrt(diag / n)
    assert ((x.mean(0) - single.means[0]).abs() <= N_SE * se_mean).all()
    se_cov = torch.sqrt((torch.outer(diag, diag) + cov**2) / n)
    assert ((torch.cov(x.T) - cov).abs() <= N_SE * se_cov).all()
    # The mixture: total mean and covariance sum_k pi_k (S_k + mu_k mu_k^T) - mbar mbar^T.
    x = MIX.sample(n, torch.Generator().manual_seed(6))
    mbar = MIX.weights @ MIX.means
    second = _full_cov(MIX) + MIX.means[:, :, None] * MIX.means[:, None, :]
    total = (MIX.weights[:, None, None] * second).sum(0) - torch.outer(mbar, mbar)
    assert ((x.mean(0) - mbar).abs() <= N_SE * torch.sqrt(torch.diagonal(total) / n)).all()
    # 4th moments of a mixture exceed the Gaussian's; 3x the Gaussian standard error is ample here.
    d = torch.diagonal(total)
    assert ((torch.cov(x.T) - total).abs() <= 3 * N_SE * torch.sqrt((torch.outer(d, d) + total**2) / n)).all()


def _full_log_density(bridge: PhaseBridge, mix: GaussianMixture, m: torch.Tensor, t: float) -> torch.Tensor:
    """log p_t(m) for m = [x | v] [B, 2D]: m = C x1 + noise, C = [cx I; cv I], noise ~ N(0, Sigma ⊗ I),
    so p_t = sum_k pi_k N(m; C mu_k, C S_k C^T + Sigma ⊗ I) with explicit 2D x 2D matrices."""
    co = bridge.coefficients(torch.tensor(t, dtype=torch.float64))
    d = mix.dim
    eye = torch.eye(d, dtype=torch.float64)
    big_c = torch.cat([co.cx * eye, co.cv * eye])
    noise = torch.cat([torch.cat([co.sxx * eye, co.sxv * eye], 1),
                       torch.cat([co.sxv * eye, co.svv * eye], 1)])
    logs = [
        torch.log(w) + MultivariateNormal(big_c @ mu, big_c @ cov @ big_c.T + noise).log_prob(m)
        for mu, cov, w in zip(mix.means, _full_cov(mix), mix.weights, strict=True)
    ]
    return torch.logsumexp(torch.stack(logs), 0)


@pytest.mark.parametrize("t", [0.2, 0.6, 0.9])
def test_agm_posterior_and_score_against_full_model(t: float) -> None:
    bridge = PhaseBridge()
    gen = torch.Generator().manual_seed(7)
    x1 = MIX.sample(6, gen)
    co = bridge.coefficients(torch.tensor(t, dtype=torch.float64))
    x = co.cx * x1 + co.lxx * torch.randn(6, 3, generator=gen, dtype=torch.float64)
    v = co.cv * x1 + co.lxv * (x - co.cx * x1) / co.lxx + co.lvv * torch.randn(6, 3, generator=gen,
                                                                              dtype=torch.float64)
    m = torch.cat([x, v], 1).requires_grad_(True)
    logp = _full_log_density(bridge, MIX, m, t)
    (grad,) = torch.autograd.grad(logp.sum(), m)
    m = m.detach()
    torch.testing.assert_close(MIX.score(bridge, m, t), grad[:, 3:], rtol=1e-8, atol=1e-8)
    # E[x1 | m] by Tweedie in x: grad_m log p = -(Sigma ⊗ I)^-1 (m - C E[x1 | m]) on each coordinate pair.
    sig = torch.tensor([[co.sxx.item(), co.sxv.item()], [co.sxv.item(), co.svv.item()]], dtype=torch.float64)
    resid = torch.einsum("ij,bjd->bid", sig, torch.stack([grad[:, :3], grad[:, 3:]], 1))  # Sigma grad
    c = torch.tensor([co.cx.item(), co.cv.item()], dtype=torch.float64)
    x1_hat = ((torch.stack([x, v], 1) + resid) * c[None, :, None]).sum(1) / (c @ c)
    torch.testing.assert_close(MIX.posterior_mean(bridge, m, t), x1_hat, rtol=1e-8, atol=1e-8)


def test_per_row_times_match_scalar_times() -> None:
    bridge = PhaseBridge()
    m = torch.randn(5, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ts = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999], dtype=torch.float64)
    batched = MIX.drift(bridge, m, ts)
    for i, t in enumerate(ts.tolist()):
        single = MIX.drift(bridge, m[i : i + 1], t)
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-12, atol=1e-12)
    assert bool(torch.isfinite(batched).all())


def test_validation() -> None:
    means = [[0.0, 0.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture(means, [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture(means, [[0.1, 0.0], [0.1, 0.2]])
    with pytest.raises(ValueError, match="rotation"):
        GaussianMixture(means, [0.1, 0.2], rotation=[[1.0, 0.0], [0.0, 1.0 + 1e-6]])
    with pytest.raises(ValueError, match="rotation"):
        GaussianMixture(means, [0.1, 0.2], rotation=torch.eye(3))
    c, s = math.cos(0.3), math.sin(0.3)
    mix = GaussianMixture(means, [[0.1, 0.3], [0.2, 0.1]], rotation=[[c, -s], [s, c]])
    assert "anisotropic" in repr(mix)
    y = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="a must"):
        mix.denoise(y, -1.0)
    with pytest.raises(ValueError, match="a must"):
        mix.denoise(y, torch.ones(3))
    with pytest.raises(ValueError, match="a must"):
        mix.denoise(y, float("inf"))
    with pytest.raises(TypeError, match="a must"):
        mix.denoise(y, "1")
    with pytest.raises(ValueError, match="y must"):
        mix.denoise(torch.zeros(4, 3), 1.0)
    out = mix.denoise(y.float(), torch.tensor(2.0))
    assert out.dtype == torch.float64 and out.shape == (4, 2)
