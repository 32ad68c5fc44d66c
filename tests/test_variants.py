"""Solver variants (psb_fast.variants, psb_fast.variant_tables; docs/math.md §7.3).

Tables: the F form against the Gauss-Legendre tables of psb_fast.multistep, the data form against
scipy's DOP853 on the original (t, x, v) system. Solver: exact on a drift whose data estimate is
constant, convergence orders r + 1 (predictor) and r + 2 (corrector) on an exact mixture drift,
and the variant through PhaseSampler, Setting and the tuning loop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from psb_fast import PhaseSampler
from psb_fast.bridge import PhaseBridge, probode_hop_weights, split_phase
from psb_fast.grids import power_grid
from psb_fast.multistep import multistep_coefficients
from psb_fast.oracles import GaussianMixture, ode_solution
from psb_fast.settings import VARIANTS, Setting
from psb_fast.tuning import run_settings
from psb_fast.variant_tables import variant_tables

BRIDGE = PhaseBridge()


@pytest.mark.parametrize(("T", "order", "t_end"),
                         [(0.9, 2, None), (0.7, 3, 0.999), (0.4, 1, None), (0.95, 0, None)])
def test_F_form_tables_match_gauss_legendre(T: float, order: int, t_end: float | None) -> None:
    grid = power_grid(9, 1e-5, T, 2.0)
    tab = variant_tables(BRIDGE, grid, order, "F", t_end)
    co = multistep_coefficients(BRIDGE, grid, order, t_end)
    scale = co.Cv.abs().max()
    assert torch.allclose(tab.C[:, 0], co.Cx, atol=1e-7 * scale, rtol=0)
    assert torch.allclose(tab.C[:, 1], co.Cv, atol=1e-7 * scale, rtol=0)
    expected_phi = torch.stack([torch.stack([torch.ones_like(co.h), co.h], -1),
                                torch.stack([torch.zeros_like(co.h), torch.ones_like(co.h)], -1)], 1)
    assert torch.allclose(tab.Phi, expected_phi, atol=1e-8, rtol=0)


def _lagrange(nodes: list[float], j: int, s: float) -> float:
    out = 1.0
    for k, tk in enumerate(nodes):
        if k != j:
            out *= (s - tk) / (nodes[j] - tk)
    return out


@pytest.mark.parametrize("step", [0, 3, 7])
@pytest.mark.slow
def test_data_form_tables_match_dop853(step: int) -> None:
    """Phi and C, D of one step by DOP853 on dv/dt = den Y - P (aa x + bb v) in (t, x, v)."""
    order = 2
    grid = power_grid(9, 1e-5, 0.9, 1.5)
    tab = variant_tables(BRIDGE, grid, order, "data")
    times = grid.tolist()
    a, b = times[step], times[step + 1]
    q = min(step, order)
    predictor = [times[step - j] for j in range(q + 1)]
    corrector = [times[step + 1]] + predictor

    def system(forcing):
        def f(t, y):
            co = BRIDGE.coefficients(torch.tensor(t, dtype=torch.float64))
            P, aa, bb, den = co.P.item(), co.hop_aa.item(), co.hop_bb.item(), co.hop_den.item()
            x, v = y
            return [v, den * forcing(t) - P * (aa * x + bb * v)]
        return f

    def solve(y0, forcing):
        sol = solve_ivp(system(forcing), (a, b), y0, method="DOP853", rtol=1e-12, atol=1e-13)
        return np.array(sol.y[:, -1])

    for col, y0 in enumerate(([1.0, 0.0], [0.0, 1.0])):
        got = tab.Phi[step, :, col].numpy()
        assert np.allclose(got, solve(y0, lambda t: 0.0), rtol=1e-7, atol=1e-9)
    for j in range(q + 1):
        want = solve([0.0, 0.0], lambda t, j=j: _lagrange(predictor, j, t))
        assert np.allclose(tab.C[step, :, j].numpy(), want, rtol=1e-7, atol=1e-9)
    for j in range(q + 2):
        want = solve([0.0, 0.0], lambda t, j=j: _lagrange(corrector, j, t))
        if j >= 1:
            want = want - tab.C[step, :, j - 1].numpy()
        assert np.allclose(tab.D[step, :, j].numpy(), want, rtol=1e-7, atol=1e-9)


@pytest.mark.slow
def test_data_form_is_exact_when_the_data_estimate_is_constant() -> None:
    """A model whose hop estimate is a fixed point c makes the flow linear: dm/dt = A m + B c.
    The data form then has no extrapolation error (state at 0.999 without the hop, against
    DOP853 on the linear system); the F form has."""
    c = 0.7

    def model(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x, v = split_phase(m.double())
        co = BRIDGE.coefficients(t.double()[:, None])
        a_f, a_x, a_v = probode_hop_weights(co.normalizer, co.P, co.hop_aa, co.hop_bb, co.hop_den)
        return ((c - a_x * x - a_v * v) / a_f).to(m.dtype)

    m0 = BRIDGE.sample_prior((3, 1), generator=torch.Generator().manual_seed(0)).double()

    def f(t, y):
        co = BRIDGE.coefficients(torch.tensor(t, dtype=torch.float64))
        x, v = y[:3], y[3:]
        dv = co.hop_den.item() * c - co.P.item() * (co.hop_aa.item() * x + co.hop_bb.item() * v)
        return np.concatenate([v, dv])

    exact = solve_ivp(f, (1e-5, 0.999), m0[:, 0].tolist() + m0[:, 1].tolist(), method="DOP853",
                      rtol=1e-12, atol=1e-12).y[:3, -1]
    errors = {}
    for variant in VARIANTS:
        sampler = PhaseSampler(BRIDGE, 6, T=0.9, order=1, grid="uniform", hop=False, variant=variant)
        x = sampler.sample(model, m0)[:, 0].numpy()
        errors[variant] = float(np.abs(x - exact).max())
    assert errors["data"] < 1e-5 and errors["data-corrector"] < 1e-5, errors
    assert errors["multistep"] > 100 * errors["data"], errors


BROAD = GaussianMixture([[0.5, -0.3], [-0.6, 0.4]], [0.5, 0.6], [0.4, 0.6])


def _error(setting: Setting, nfe: int, m0: torch.Tensor, target: torch.Tensor) -> float:
    x1 = run_settings(BROAD.as_model(BRIDGE), BRIDGE, m0, nfe, [setting])[0]
    return (x1 - target).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("variant", ["multistep", "data", "multistep-corrector", "data-corrector"])
@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.slow
def test_convergence_orders(variant: str, order: int) -> None:
    """Pathwise error against the exact flow to T and its exact hop: slope r + 1 for the
    predictors, r + 2 with the corrector (uniform grids, float64 state), capped by the start-up:
    step 0 has one output (order 0, local error O(h^2); O(h^3) corrected), so the global order is
    at most 2 for the predictors and 3 with the corrector."""
    T = 0.7
    m0 = BRIDGE.sample_prior((32, 2), generator=torch.Generator().manual_seed(1)).double()
    mT = ode_solution(BROAD, BRIDGE, m0, 1e-5, T, rtol=1e-13, atol=1e-13)
    target = BRIDGE.estimate_x1(mT, BROAD.drift(BRIDGE, mT, T), T)
    nfes = (9, 17)
    errs = [_error(Setting(T, 1.0, order, None, variant), n, m0, target) for n in nfes]
    slope = math.log(errs[0] / errs[1]) / math.log((nfes[1] - 1) / (nfes[0] - 1))
    expected = min(order + 1, 2) + (1 if variant.endswith("corrector") else 0)
    assert slope > expected - 0.45, (errs, slope)


@pytest.mark.slow
def test_sampler_variant_matches_the_tuning_loop_and_is_checked() -> None:
    mix = GaussianMixture([[1.0, 0.0], [-1.0, 0.5]], [0.2, 0.3])
    model = mix.as_model(BRIDGE)
    m0 = BRIDGE.sample_prior((32, 2), generator=torch.Generator().manual_seed(2)).double()
    for variant in VARIANTS:
        setting = Setting(0.75, 1.5, 3, None, variant)  # order 3: the corrector reads 5 outputs
        want = run_settings(model, BRIDGE, m0, 8, [setting])[0]
        for backend in ("cpu", "reference", "triton"):  # the F form runs on the fused phase_step op
            sampler = PhaseSampler(BRIDGE, 8, **setting.sampler_kwargs(8), backend=backend)
            assert sampler.variant == variant and variant in repr(sampler)
            got = sampler.sample(model, m0)
            assert (got.double() - want).abs().max().item() < 3e-4, (variant, backend)
    with pytest.raises(ValueError, match="variant"):
        PhaseSampler(BRIDGE, 8, variant="euler")
    with pytest.raises(ValueError, match="variant"):
        PhaseSampler(PhaseBridge(mode="SDE"), 8, solver="sde", variant="data")
    # Explicit settings without a variant mean the published multistep.
    assert PhaseSampler(BRIDGE, 8, T=0.8, order=2, grid="rev-quad").variant == "multistep"


def test_mixed_variants_in_one_tuning_call_keep_their_order() -> None:
    mix = GaussianMixture([[1.0, 0.0], [-1.0, 0.5]], [0.2, 0.3])
    model = mix.as_model(BRIDGE)
    m0 = BRIDGE.sample_prior((8, 2), generator=torch.Generator().manual_seed(3)).double()
    settings = [Setting(0.8, 1.0, o, None, v) for v in reversed(VARIANTS) for o in (1, 3)]
    together = run_settings(model, BRIDGE, m0, 6, settings, max_rows=1000)
    for setting, out in zip(settings, together, strict=True):
        alone = run_settings(model, BRIDGE, m0, 6, [setting])[0]
        assert torch.allclose(out, alone, rtol=0, atol=1e-12), setting.label


def test_every_variant_samples_under_inference_mode() -> None:
    """Inference tensors keep no version counter: the history check is skipped, not a crash."""
    model = BROAD.as_model(BRIDGE)
    m0 = BRIDGE.sample_prior((8, 2), generator=torch.Generator().manual_seed(4))
    for variant in VARIANTS:
        sampler = PhaseSampler(BRIDGE, 6, T=0.7, order=2, grid="uniform", variant=variant, backend="cpu")
        want = sampler.sample(model, m0)
        with torch.inference_mode():
            got = sampler.sample(model, m0)
        assert torch.equal(got, want), variant


# --- the registry, and the production variants against the oracle's own transcription ----------

from psb_fast import variants  # noqa: E402
from psb_fast.oracles import mixture_2d_grid  # noqa: E402
from psb_fast.reference import variants as ref_variants  # noqa: E402
from psb_fast.reference.sampler import sample_variant  # noqa: E402


def test_the_registry_is_the_one_list_of_variants():
    """VARIANTS (settings, sampler, tuning, CLI choices) derive from the registry's records."""
    assert VARIANTS == tuple(v.name for v in variants.REGISTRY) == variants.VARIANTS
    for record in variants.REGISTRY:
        assert variants.variant(record.name) is record
        assert (record.form, record.corrector) == ref_variants.VARIANT_FORMS[record.name]
    with pytest.raises(ValueError, match="variant must be one of"):
        variants.variant("data-predictor")


@pytest.mark.parametrize("form", ["F", "data"])
@pytest.mark.parametrize("t_end", [None, 0.999])
def test_tables_match_the_oracle(form, t_end):
    """psb_fast.variant_tables (RK4 in u on (x, tau v)) against reference/variants.py (Gauss-Legendre
    in u for the F form, the implicit Gauss method on (x, v) for the data form), 1e-7 relative."""
    grid = torch.tensor([1e-5, 0.2, 0.45, 0.7, 0.85, 0.97], dtype=torch.float64)
    got = variant_tables(BRIDGE, grid, 2, form, t_end)
    Phi, C, D = ref_variants.variant_tables(BRIDGE, grid, 2, form, t_end)
    for a, b in ((got.Phi, Phi), (got.C, C), (got.D, D)):
        assert (a - b).abs().max() <= 1e-7 * max(1.0, b.abs().max())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ["float64", "cpu"])
@pytest.mark.parametrize(("order", "hop"), [(3, True), (1, True), (2, False)])
@pytest.mark.slow
def test_sampler_matches_the_oracle(variant, backend, order, hop):
    """PhaseSampler's one step path (the fused phase_step with the transition, the scaled data
    estimates, the corrector) against reference.sampler.sample_variant (float64 throughout) on the
    exact drift of a 3 x 3 mixture."""
    m0 = BRIDGE.sample_prior((64, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = mixture_2d_grid().as_model(BRIDGE)
    T = 0.8 if hop else 0.95
    setting = Setting(T, 1.5, order, None, variant)
    sampler = PhaseSampler(BRIDGE, 8, setting, hop=hop, backend=backend)
    got = sampler.sample(model, m0.float() if backend == "cpu" else m0).double()
    want = sample_variant(model, m0, BRIDGE, setting.grid(8, 1e-5), order, variant, hop=hop)
    assert (got - want).abs().max() < 2e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_tuning_rows_match_the_oracle(variant):
    """tuning.run_settings (the same step path on per-row tensors, float64) against the oracle (to
    the tables' own accuracy, ~1e-8: RK4 in u against the oracle's Gauss method)."""
    m0 = BRIDGE.sample_prior((16, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = mixture_2d_grid().as_model(BRIDGE)
    settings = [Setting(0.8, 1.5, 2, None, variant), Setting(0.7, 2.0, 1, None, variant)]
    out = run_settings(model, BRIDGE, m0, 6, settings, max_rows=64)
    for got, s in zip(out, settings, strict=True):
        want = sample_variant(model, m0, BRIDGE, s.grid(6, 1e-5), s.order, variant)
        assert (got - want).abs().max() < 1e-7


def test_the_table_cache_is_shared_and_keyed_by_the_bridge():
    """One cache for the sampler and tuning: a second sampler of the same setting reuses its
    tables; another bridge gets its own."""
    setting = Setting(0.8, 1.5, 2, None, "data-corrector")
    a = PhaseSampler(BRIDGE, 7, setting)
    b = PhaseSampler(BRIDGE, 7, setting)
    assert a.tables is b.tables
    c = PhaseSampler(PhaseBridge(p=2.5), 7, setting)
    assert c.tables is not a.tables and not torch.equal(c.tables.C, a.tables.C)
