"""Library samplers (diffusers, k-diffusion) on exact mixture denoisers (psb_fast.benchmarks.real_peers)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from psb_fast.benchmarks import real_peers as rp
from psb_fast.benchmarks.problems import Problem
from psb_fast.oracles import GaussianMixture

torch.set_num_threads(1)

TWO = GaussianMixture([[0.5, -0.3], [-0.7, 0.4]], [0.4, 0.3], [0.6, 0.4])
PROBLEM = Problem("two", "test", "test", 0, TWO)
ANISO = GaussianMixture([[0.3, -0.2]], [[0.5, 0.1]], rotation=[[0.6, -0.8], [0.8, 0.6]])


def _euler_config(name: str = "own:euler") -> rp.PeerConfig:
    """A VE Euler sampler written here (sigma_max 20, geometric grid, last step to 0)."""

    def run(den: rp.CountingDenoiser, noise: torch.Tensor, steps: int) -> rp.PeerRun:
        sigmas = [20.0 * 0.01 ** (i / max(steps - 1, 1)) for i in range(steps)] + [0.0]
        u = noise * sigmas[0]
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            d = den(u, s)
            u = d + (s_next / s) * (u - d)
        return rp.PeerRun(u, sigmas[0], sigmas[0], 0.0, 1.0, steps, steps)

    return rp.PeerConfig(name, "own", run)


def _all_configs() -> list[rp.PeerConfig]:
    pytest.importorskip("diffusers")
    configs, missing = rp.peer_configs()
    assert not any(line.startswith("diffusers") for line in missing)
    return configs


def test_exact_flow_of_a_gaussian() -> None:
    """u(sigma) = mu + R diag(sqrt((s^2 + sigma^2) / (s^2 + sigma0^2))) R^T (u0 - mu), also at sigma 0."""
    u0 = 5.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = rp.exact_flow(ANISO, u0, 5.0, [0.0, 0.05, 1.0])
    rot, mu, s2 = ANISO.rotation, ANISO.means[0], ANISO.axis_stds[0] ** 2
    for sigma, u in got.items():
        factor = torch.sqrt((s2 + sigma**2) / (s2 + 25.0))
        expected = mu + ((u0 - mu) @ rot * factor) @ rot.T
        torch.testing.assert_close(u, expected, rtol=0, atol=1e-8)


def test_counting_and_budget() -> None:
    config = _euler_config()
    for budget in (1, 5, 10):
        assert rp.steps_for_budget(config, budget) == budget
    den = rp.CountingDenoiser(TWO)
    out = config.run(den, torch.zeros(4, 2, dtype=torch.float64), 7)
    assert den.calls == out.nfe == 7
    with pytest.raises(ValueError, match="budget"):
        rp.steps_for_budget(config, 0)


def test_missing_library_message(monkeypatch, capsys) -> None:
    def missing() -> list[rp.PeerConfig]:
        raise ImportError("No module named 'diffusers'")

    libraries = dict(rp._LIBRARIES)
    libraries["diffusers"] = (missing, 32, "pip install diffusers")
    libraries["k-diffusion"] = (lambda: [_euler_config()], 1, "")
    monkeypatch.setattr(rp, "_LIBRARIES", libraries)
    configs, lines = rp.peer_configs()
    assert [c.name for c in configs] == ["own:euler"]
    assert len(lines) == 1 and lines[0].startswith("diffusers is not installed") and "\n" not in lines[0]
    results = rp.run_real_peers([PROBLEM], nfes=(5,), draws=8)
    assert "diffusers is not installed" in capsys.readouterr().err
    assert results["two"]["nfe"]["5"]["best"]["name"] == "own:euler"


@pytest.fixture(scope="module")
def all_results() -> tuple[list[rp.PeerConfig], dict]:
    """Every configuration on the 2-D problem, 32 draws, at NFE 5, 10 and 60 (one run shared by the tests)."""
    configs = _all_configs()
    return configs, rp.run_problem(PROBLEM, configs, nfes=(5, 10, 60), draws=32)


@pytest.mark.slow
def test_every_configuration_runs_and_counts(all_results) -> None:
    configs, result = all_results
    names = [c.name for c in configs]
    assert len(names) == len(set(names)) and sum(n.startswith("diffusers:") for n in names) == 32
    for budget in (5, 10, 60):
        table = result["nfe"][str(budget)]["configs"]
        assert set(table) == set(names)
        for name, row in table.items():
            two_per_step = any(k in name for k in ("heun", "dpm_2"))
            assert row["nfe"] == (2 * row["steps"] - 1 if two_per_step else row["steps"]), name
            assert budget - 1 <= row["nfe"] <= budget, name
            assert math.isfinite(row["error"]), name
            expected_end = {"linear": 1e-2, "scaled_linear": 0.0292}  # DEIS stops at sigma(t = 0)
            beta = name.split("/")[1].split("+")[0] if name.startswith("diffusers:deis") else None
            assert row["sigma_end"] == pytest.approx(expected_end[beta] if beta else 0.0, abs=2e-4), name
        best = result["nfe"][str(budget)]["best"]
        assert best["error"] == min(row["error"] for row in table.values())


@pytest.mark.slow
def test_large_nfe_converges_to_own_exact_flow(all_results) -> None:
    """At NFE 60 every configuration is within 1e-3 of its own exact flow or 3x closer than at NFE 10
    (the floor of several: a first-order last step into sigma 0 from sigma(t_last) or sigma_min)."""
    configs, result = all_results
    for config in configs:
        coarse = result["nfe"]["10"]["configs"][config.name]["error"]
        fine = result["nfe"]["60"]["configs"][config.name]["error"]
        assert fine < 1e-3 or fine <= coarse / 3, (config.name, coarse, fine)


def test_ddim_alignment() -> None:
    """First-order DPM-Solver++ and Euler (diffusers) equal DDIM in VE form, u' = D + sigma'/sigma (u - D),
    on the scheduler's own sigmas: the denoiser sees the noise level and scale each step assumes."""
    diffusers = pytest.importorskip("diffusers")
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for cls, extra in ((diffusers.DPMSolverMultistepScheduler, {"solver_order": 1}),
                       (diffusers.EulerDiscreteScheduler, {})):
        for karras in (False, True):
            config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                      "prediction_type": "sample", "use_karras_sigmas": karras, **extra}
            run = rp._diffusers_runner(cls, config)(rp.CountingDenoiser(TWO), noise, 8)
            sched = cls(**config)
            sched.set_timesteps(8)
            sigmas = [float(s) for s in sched.sigmas]
            u = noise * run.start_scale
            for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
                d = TWO.denoise(u, 1 / s**2)
                u = d + (s_next / s) * (u - d)
            torch.testing.assert_close(run.x, u * run.out_scale, rtol=1e-5, atol=1e-5)


def test_k_diffusion_sampling_loads() -> None:
    pytest.importorskip("torchsde")
    try:
        kds = rp.import_k_diffusion_sampling()
    except ImportError:
        pytest.skip("k-diffusion is not installed")
    sigmas = kds.get_sigmas_karras(4, rp.KD_SIGMA_MIN, rp.KD_SIGMA_MAX)
    assert float(sigmas[0]) == pytest.approx(rp.KD_SIGMA_MAX) and float(sigmas[-1]) == 0.0
    x = torch.ones(3, 1)
    assert rp._append_dims(x[:, 0], 3).shape == (3, 1, 1)


def test_cli_writes_and_resumes(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(rp, "peer_configs", lambda: ([_euler_config()], []))
    out = tmp_path / "peers.json"
    argv = ["--split", "test", "--count", "2", "--draws", "8", "--nfe", "3", "5", "--out", str(out),
            "--no-progress"]
    data = rp.main(argv)
    saved = json.loads(out.read_text())
    assert list(saved["problems"]) == list(data["problems"]) and len(saved["problems"]) == 2
    assert set(saved["summary"]) == {"3", "5"}
    calls = []
    monkeypatch.setattr(rp, "run_problem", lambda *a, **k: calls.append(a) or {})
    rp.main(argv)
    assert calls == []  # both problems were already done
    with pytest.raises(SystemExit):  # other settings: refuse to mix them into the file
        rp.main([*argv[:-2], "--draws", "16", "--no-progress"])


def _bare_numbers(obj: object) -> list[object]:
    """int / float leaves not in a dict with a "unit" key (the suite's results convention)."""
    if isinstance(obj, dict):
        return [v for v in obj.values() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and "unit" not in obj] + [b for v in obj.values() for b in _bare_numbers(v)]
    if isinstance(obj, list):
        return [v for v in obj if isinstance(v, (int, float)) and not isinstance(v, bool)] + [
            b for v in obj for b in _bare_numbers(v)]
    return []


def test_suite_part(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(rp, "peer_configs", lambda: ([_euler_config()], ["k-diffusion is not installed (x)"]))
    monkeypatch.setitem(rp.SUITE_SETTINGS, "quick", {"count": 2, "draws": 8})
    result = rp.suite_part(True, tmp_path)
    assert _bare_numbers(result) == []
    assert set(result["summary"]) == {str(n) for n in rp.NFES}
    saved = json.loads((tmp_path / "real_peers.json").read_text())
    assert len(saved["problems"]) == 2
    table = rp.render_table(result)
    assert "| 5 |" in table and "own:euler" in table and "k-diffusion is not installed" in table
