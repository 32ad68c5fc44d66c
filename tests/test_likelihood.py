"""psb_fast.likelihood against closed forms computed here, with this file's own code.

The reference: Sigma(T) from the 50-digit log-time solve of the Lyapunov ODE
(reference/high_precision.py), the mean coefficients of the bridge written out again, and the
phase-space marginal of an isotropic Gaussian mixture at T as a mixture of per-coordinate 2-D
Gaussians: mode k gives (x_j, v_j) ~ N(c mu_kj, Sigma(T) + s_k^2 c c^T), c = (cx, cv)
(docs/math.md §13.6). Nothing below calls the density code under test for its expected values.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss

from psb_fast import PhaseBridge, likelihood
from psb_fast.likelihood import EvalPlan, evaluate_bpd, phase_log_density
from psb_fast.oracles import GaussianMixture, mixture_2d_grid, mixture_random
from psb_fast.reference.high_precision import sigma_mp

torch.set_num_threads(1)
BRIDGE = PhaseBridge()


def _sigma_and_c(T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigma(T) [2, 2] at 50 digits (rounded to float64) and c = (cx, cv) of docs/math.md §2.2."""
    _, sxx, sxv, svv = (float(v) for v in sigma_mp(T))
    cx = T**2 * (T**2 - 4 * T + 6) / 3
    cv = 4 * T * (T**2 - 3 * T + 3) / 3
    sigma = torch.tensor([[sxx, sxv], [sxv, svv]], dtype=torch.float64)
    return sigma, torch.tensor([cx, cv], dtype=torch.float64)


def _phase_mixture_logpdf(mix: GaussianMixture, m: torch.Tensor, T: float) -> torch.Tensor:
    """log p_T(m) of the mixture's phase-space marginal at T, [B] (closed form, this file's code)."""
    sigma, c = _sigma_and_c(T)
    d = mix.dim
    xv = torch.stack([m[:, :d], m[:, d:]], dim=-1).double()  # [B, D, 2]
    terms = []
    for k in range(mix.n_components):
        cov = sigma + mix.stds[k] ** 2 * torch.outer(c, c)
        r = xv - mix.means[k][:, None] * c
        quad = torch.einsum("bdi,ij,bdj->bd", r, torch.linalg.inv(cov), r)
        log_norm = torch.logdet(cov) + 2 * math.log(2 * math.pi)
        terms.append(math.log(mix.weights[k]) - 0.5 * (quad + log_norm).sum(1))
    return torch.logsumexp(torch.stack(terms, 1), 1)


def _mixture_logpdf(mix: GaussianMixture, x: torch.Tensor, extra_var: float = 0.0) -> torch.Tensor:
    """log of the mixture density convolved with N(0, extra_var I) at x [B, D], [B]."""
    var = mix.stds**2 + extra_var
    sq = ((x[:, None, :] - mix.means[None]) ** 2).sum(-1)
    d = mix.dim
    logits = torch.log(mix.weights) - 0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)
    return torch.logsumexp(logits, 1)


def _phase_draws(mix: GaussianMixture, T: float, n: int, seed: int) -> torch.Tensor:
    """m ~ the mixture's phase marginal at T, [n, 2D], drawn with this file's own Sigma."""
    sigma, c = _sigma_and_c(T)
    gen = torch.Generator().manual_seed(seed)
    x1 = mix.sample(n, gen)
    noise = torch.randn((n, mix.dim, 2), generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T
    xv = x1[..., None] * c + noise
    return torch.cat([xv[..., 0], xv[..., 1]], dim=1)


@pytest.mark.parametrize("T", [0.5, 0.99])
@pytest.mark.slow
def test_log_density_matches_the_closed_form_phase_mixture_2d(T):
    mix = mixture_2d_grid()
    m = _phase_draws(mix, T, 6, seed=1)
    got = phase_log_density(mix.as_model(BRIDGE), BRIDGE, m, T, rtol=1e-8, atol=1e-8)
    assert got.exact_trace and got.nfe > 10
    assert torch.equal(got.stderr, torch.zeros(6, dtype=torch.float64))
    err = ((got.logp - _phase_mixture_logpdf(mix, m, T)) / mix.dim).abs().max().item()
    assert err < 1e-3, err


@pytest.mark.slow
@pytest.mark.parametrize("T", [0.9, 0.999])
def test_log_density_matches_the_closed_form_phase_mixture_16d(T):
    mix = mixture_random(16, 4, seed=3)
    m = _phase_draws(mix, T, 4, seed=2)
    got = phase_log_density(mix.as_model(BRIDGE), BRIDGE, m, T, rtol=1e-8, atol=1e-8, exact_dims=16)
    err = ((got.logp - _phase_mixture_logpdf(mix, m, T)) / mix.dim).abs().max().item()
    assert got.exact_trace and err < 1e-3, err


@pytest.mark.slow
def test_nll_bound_of_the_exact_drift_is_the_data_density():
    """With the exact drift the bound is log p_{1/a}(xhat), xhat ~ N(x1, 1/a): at T_end = 0.99
    (1/a ~ 3e-10) it equals -log p(x1) to far below 1e-3 nats per dimension (docs/math.md §13.2)."""
    mix = mixture_2d_grid()
    x1 = mix.sample(8, torch.Generator().manual_seed(0))
    result = likelihood(mix.as_model(BRIDGE), BRIDGE, x1, T_end=0.99, rtol=1e-8, atol=1e-8)
    err = ((result.nll + _mixture_logpdf(mix, x1)) / 2).abs().max().item()
    assert err < 1e-3, err
    assert torch.allclose(result.bpd, result.nll / (2 * math.log(2)))
    assert result.m.shape == (8, 4) and result.dims == 2 and result.nfe > 10


def test_variational_gap_at_an_early_end_time():
    """At T_end = 0.7 the decoder's variance 1/a is ~1e-3. With the exact drift the bound's integrand
    is log p_{1/a}(xhat), xhat ~ N(x1, 1/a) (p_s: the data density convolved with N(0, s I)), so
    E[nll] = -E log p_{1/a}(xhat) (Gauss-Hermite here), and it lies above -log p_theta(x1) =
    -log p_{2/a}(x1) by the variational gap (docs/math.md §13.3)."""
    mix = GaussianMixture([[0.0, 0.0], [0.8, -0.4]], [0.3, 0.25])
    T = 0.7
    sigma, c = _sigma_and_c(T)
    a = (c @ torch.linalg.solve(sigma, c)).item()
    points = torch.tensor([[0.1, 0.2], [0.7, -0.3]], dtype=torch.float64)
    x1 = points.repeat_interleave(64, 0)
    result = likelihood(mix.as_model(BRIDGE), BRIDGE, x1, T_end=T, rtol=1e-7, atol=1e-7, seed=5)
    nodes, weights = (torch.from_numpy(v) for v in hermegauss(24))
    weights = weights / weights.sum()
    grid = torch.stack(torch.meshgrid(nodes, nodes, indexing="ij"), -1).reshape(-1, 2) / math.sqrt(a)
    w2 = torch.outer(weights, weights).reshape(-1)
    for i, rows in enumerate((slice(0, 64), slice(64, 128))):
        expected = -(w2 * _mixture_logpdf(mix, points[i] + grid, extra_var=1 / a)).sum()
        gap = (expected + _mixture_logpdf(mix, points[i : i + 1], extra_var=2 / a)).item()
        mean, se = result.nll[rows].mean().item(), result.nll[rows].std().item() / 8
        assert abs(mean - expected.item()) < 3 * se + 1e-6, (mean, expected.item(), se)
        assert 0 < gap < 0.05, gap  # Jensen: the bound is below log p_theta, by a small margin here


@pytest.mark.slow
def test_hutchinson_is_within_its_standard_error_of_the_exact_trace():
    mix = mixture_random(16, 3, seed=4)
    m = _phase_draws(mix, 0.95, 4, seed=3)
    model = mix.as_model(BRIDGE)
    exact = phase_log_density(model, BRIDGE, m, 0.95, rtol=1e-5, atol=1e-5, exact_dims=16)
    hutch = phase_log_density(model, BRIDGE, m, 0.95, rtol=1e-5, atol=1e-5, exact_dims=15, probes=8, seed=7)
    assert exact.exact_trace and not hutch.exact_trace
    assert bool((hutch.stderr > 0).all()) and bool((hutch.stderr < 5).all()), hutch.stderr
    z = (hutch.logp - exact.logp).sum() / hutch.stderr.pow(2).sum().sqrt()
    assert abs(z.item()) < 3, z.item()


@pytest.mark.slow
def test_dequantized_bound_is_above_the_discrete_nll():
    """17 levels (bin 1/8): E[nll] over dequantization and phase draws bounds -log P(bin) from above."""
    mix = GaussianMixture([[0.0, 0.25], [-0.5, 0.5]], [0.2, 0.15])
    x1 = torch.tensor([[0.0, 0.25], [-0.5, 0.375]], dtype=torch.float64).repeat_interleave(48, 0)
    result = likelihood(mix.as_model(BRIDGE), BRIDGE, x1, levels=17, rtol=1e-6, atol=1e-6, seed=3)
    half = 1 / 16
    normal = torch.distributions.Normal(0.0, 1.0)
    upper = (x1[:, None, :] + half - mix.means[None]) / mix.stds[None, :, None]
    lower = (x1[:, None, :] - half - mix.means[None]) / mix.stds[None, :, None]
    prob = (mix.weights * (normal.cdf(upper) - normal.cdf(lower)).prod(-1)).sum(1)
    for rows in (slice(0, 48), slice(48, 96)):
        excess = (result.nll[rows] + prob[rows].log()).mean().item()
        se = result.nll[rows].std().item() / math.sqrt(48)
        assert -3 * se < excess < 0.1, (excess, se)


@pytest.mark.slow
def test_float32_state_agrees_with_float64():
    mix = mixture_2d_grid()
    x1 = mix.sample(4, torch.Generator().manual_seed(2))
    r64 = likelihood(mix.as_model(BRIDGE), BRIDGE, x1, rtol=1e-5, atol=1e-5)
    r32 = likelihood(mix.as_model(BRIDGE), BRIDGE, x1.float(), rtol=1e-5, atol=1e-5, dtype=torch.float32)
    assert r32.nll.dtype == torch.float64
    assert (r32.nll - r64.nll).abs().max().item() < 0.05 * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    mix = mixture_2d_grid()
    x1 = mix.sample(4, torch.Generator().manual_seed(2))
    cpu = likelihood(mix.as_model(BRIDGE), BRIDGE, x1, rtol=1e-6, atol=1e-6)
    gpu = likelihood(mix.as_model(BRIDGE), BRIDGE, x1.cuda(), rtol=1e-6, atol=1e-6)
    assert gpu.nll.device.type == "cuda"
    assert torch.allclose(gpu.nll.cpu(), cpu.nll, atol=1e-6)


def _zero_model(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0 * m[:, : m.shape[1] // 2]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"x1": torch.zeros(3, 2, dtype=torch.long)}, TypeError, "x1 must be a floating tensor"),
        ({"x1": torch.zeros(3)}, ValueError, "x1 must be [B, C, ...]"),
        ({"x1": torch.tensor([[0.0, float("nan")]])}, ValueError, "x1 must be finite, got nan"),
        ({"x1": [[0.0, 1.0]]}, TypeError, "x1 must be a torch.Tensor"),
        ({"bridge": PhaseBridge(mode="SDE")}, ValueError, "mode 'SDE'"),
        ({"bridge": "probODE"}, TypeError, "bridge must be a PhaseBridge"),
        ({"model": 3}, TypeError, "model must be callable"),
        ({"T_end": 1.0}, ValueError, "T_end must be in (0, 1)"),
        ({"rtol": -1e-5}, ValueError, "rtol must be in (0, 1)"),
        ({"probes": 1, "exact_dims": 0}, ValueError, "probes must be an int >= 2"),
        ({"levels": 17, "x1": torch.tensor([[0.01, 0.0]])}, ValueError, "must lie on the 17 levels"),
        ({"dtype": torch.float16}, TypeError, "dtype must be torch.float32 or torch.float64"),
        ({"model": lambda m, t: m}, ValueError, "model output must have x's shape (2, 2)"),
        ({"cond": torch.zeros(3, dtype=torch.long)}, ValueError, "cond must be a long tensor [2]"),
    ],
)
def test_bad_input_is_refused_with_a_one_line_error(kwargs, error, message):
    args = {"model": _zero_model, "bridge": BRIDGE, "x1": torch.zeros(2, 2), "rtol": 1e-3, "atol": 1e-3}
    args.update(kwargs)
    with pytest.raises(error) as info:
        likelihood(args.pop("model"), args.pop("bridge"), args.pop("x1"), **args)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_zero_drift_model_gives_the_prior_flow_density():
    """F = 0: the flow is free motion x(t) = x + (t - T) v, divergence 0, so log p_T(m) is the prior
    density at (x - T v, v): a closed form independent of the solver."""
    m = torch.tensor([[0.3, -0.2, 0.5, 1.0]], dtype=torch.float64)
    T = 0.6
    got = phase_log_density(_zero_model, BRIDGE, m, T, rtol=1e-9, atol=1e-9)
    x0, v0 = m[:, :2] - T * m[:, 2:], m[:, 2:]
    cov = torch.tensor([[1.0, -0.2], [-0.2, 1.0]], dtype=torch.float64)
    xv = torch.stack([x0, v0], -1)
    expected = (-0.5 * torch.einsum("bdi,ij,bdj->bd", xv, torch.linalg.inv(cov), xv)
                - 0.5 * torch.logdet(cov) - math.log(2 * math.pi)).sum(1)
    assert torch.allclose(got.logp, expected, atol=1e-7), (got.logp, expected)


@pytest.mark.slow
def test_evaluation_resumes_per_batch_and_refuses_another_plan(tmp_path):
    mix = mixture_2d_grid()
    x = mix.sample(10, torch.Generator().manual_seed(0))
    calls = [0]
    base = mix.as_model(BRIDGE)

    def model(m, t):
        calls[0] += 1
        return base(m, t)

    plan = EvalPlan(source="gmm", n=10, batch=4, seed=0, T_end=0.99, rtol=1e-4, atol=1e-4, exact_dims=16,
                    probes=4, levels=None, model_step=0)
    first = evaluate_bpd(model, BRIDGE, x, plan, tmp_path, progress=False)
    files = sorted((tmp_path / "batches").glob("batch-*.json"))
    assert [f.name for f in files] == ["batch-000000.json", "batch-000001.json", "batch-000002.json"]
    assert json.loads((tmp_path / "bpd.json").read_text())["n"] == 10
    files[1].unlink()  # an interrupted run: the second batch is missing
    files[2].write_text("{truncated")  # and the third was cut short
    done = calls[0]
    calls[0] = 0
    again = evaluate_bpd(model, BRIDGE, x, plan, tmp_path, progress=False)
    assert 0 < calls[0] < done  # only two batches recomputed
    assert again["bpd"] == pytest.approx(first["bpd"], abs=1e-12)
    calls[0] = 0
    assert evaluate_bpd(model, BRIDGE, x, plan, tmp_path, progress=False)["bpd"] == again["bpd"]
    assert calls[0] == 0  # all done: nothing recomputed
    other = EvalPlan(**{**plan.__dict__, "rtol": 1e-5})
    with pytest.raises(ValueError, match="rtol"):
        evaluate_bpd(model, BRIDGE, x, other, tmp_path, progress=False)


@pytest.mark.slow
def test_cli_eval_bpd_writes_a_summary_and_resumes(tmp_path, capsys):
    from psb_fast.cli import main

    run = tmp_path / "run"
    assert main(["train", "--set", f"out_dir={run}", "--set", "steps=4", "--set", "batch_size=32", "--set",
                 "model=mlp", "--set", "eval_samples=0", "--set", "ckpt_every=0", "--set", "device=cpu",
                 "--set", "warmup_steps=1", "--no-progress"]) == 0
    argv = ["eval", str(run), "--bpd", "-n", "12", "--batch", "5", "--rtol", "1e-3", "--atol", "1e-3",
            "--no-progress", "--out", str(tmp_path / "eval")]
    capsys.readouterr()
    assert main(argv) == 0
    summary = json.loads((tmp_path / "eval" / "bpd.json").read_text())
    assert summary["n"] == 12 and summary["plan"]["source"].endswith(":test")
    assert math.isfinite(summary["bpd"]) and summary["nfe_mean"] >= 1
    assert "bits/dim" in capsys.readouterr().out
    (tmp_path / "eval" / "batches" / "batch-000001.json").unlink()
    assert main(argv) == 0
    assert json.loads((tmp_path / "eval" / "bpd.json").read_text())["bpd"] == pytest.approx(summary["bpd"])
    assert main([*argv[:-1], str(tmp_path / "eval"), "--seed", "3"]) == 2
    assert "seed" in capsys.readouterr().err
