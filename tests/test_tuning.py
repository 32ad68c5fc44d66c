"""Per-NFE defaults (psb_fast.defaults, psb_fast/defaults.json) and the tuning API (psb_fast.tuning)."""

import json
import math

import pytest
import torch

from psb_fast import PhaseBridge
from psb_fast.defaults import default_entry, default_setting, tuned_grid
from psb_fast.grids import power_grid
from psb_fast.oracles import mixture_2d_grid, ode_solution
from psb_fast.reference.grids import rev_quad_grid
from psb_fast.reference.sampler import sample_ode
from psb_fast.settings import Setting, published_setting
from psb_fast.tuning import (
    fractions_from_log_gaps,
    load_tuned,
    optimize_grid,
    reference_solution,
    run_settings,
    save_tuned,
    settings_rmse,
    tune,
)

torch.set_num_threads(1)
T0, T_REF = 1e-5, 0.999
#: Regression guard on problems the search never saw (the validate split of benchmarks/problems.py,
#: the first VALIDATE_COUNT problems, 256 draws each, a prior seed the study does not use): the
#: defaults' median and worst ratio to the published settings must stay within these bounds. The
#: defaults of studies/defaults_study.py (the rule in psb_fast/defaults.json) give medians 0.80 /
#: 0.40 / 0.51 and worst ratios 1.48 / 0.91 / 0.94 here at NFE 5 / 10 / 20 (at NFE 5 two of these
#: eight problems lose to the published setting; benchmarks/results/defaults_study/validate.md has
#: 40 validate problems).
VALIDATE_COUNT = 8
MEDIAN_BOUND = {5: 0.85, 10: 0.45, 20: 0.6}
WORST_BOUND = {5: 2.0, 10: 1.2, 20: 1.2}


def test_default_settings_cover_1_to_50_with_valid_values():
    assert default_entry(50)["nfe"] == 50 and default_entry(51)["nfe"] == 51
    for nfe in range(1, 60):
        s = default_setting(nfe)
        assert isinstance(s.T, float) and T0 < s.T < 1
        assert isinstance(s.q, float) and math.isfinite(s.q) and s.q > 0
        assert isinstance(s.order, int) and 0 <= s.order <= 3
        assert s.fractions is None or len(s.fractions) == nfe
    assert default_setting(200).T >= default_setting(50).T  # one rule for every NFE
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            default_setting(bad)


def test_tuned_grid_spans_t0_to_T_and_uses_the_fractions():
    for nfe in range(1, 60):
        for t0, T in ((1e-5, 0.8), (1e-3, 0.95)):
            grid = tuned_grid(nfe, t0, T)
            assert grid.dtype == torch.float64 and grid.shape == (nfe,)
            assert grid[0] == t0 and (nfe == 1 or grid[-1] == T)
            assert bool((grid[1:] > grid[:-1]).all())
            q, fractions = default_setting(nfe).q, default_setting(nfe).fractions
            if fractions is not None:
                a, b = t0 ** (1 / q), T ** (1 / q)
                r = (grid ** (1 / q) - a) / (b - a)
                assert torch.allclose(r, torch.tensor(fractions, dtype=torch.float64), atol=1e-12)
            else:
                assert torch.allclose(grid, rev_quad_grid(nfe, t0, T, q), rtol=0, atol=1e-15)


def test_power_grid_with_fractions_and_validation():
    assert torch.equal(power_grid(6, 1e-5, 0.7, 1.5), rev_quad_grid(6, 1e-5, 0.7, 1.5))
    uniform = [i / 4 for i in range(5)]
    assert torch.allclose(power_grid(5, 1e-5, 0.7, 2.0, uniform), rev_quad_grid(5, 1e-5, 0.7, 2.0))
    grid = power_grid(4, 0.0, 0.64, 2.0, [0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(grid, torch.tensor([0.0, 0.04, 0.16, 0.64], dtype=torch.float64))
    for bad in ([0.0, 0.5, 1.0], [0.1, 0.4, 0.6, 1.0], [0.0, 0.4, 0.6, 0.9], [0.0, 0.6, 0.4, 1.0],
                [0.0, 0.5, 0.5, 1.0], "abcd"):
        with pytest.raises(ValueError, match="fractions"):
            power_grid(4, 1e-5, 0.7, 2.0, bad)
    with pytest.raises(ValueError, match="fractions"):
        power_grid(1, 1e-5, 0.7, 2.0, [0.0])
    with pytest.raises(ValueError, match="q"):
        power_grid(4, 1e-5, 0.7, -1.0)
    with pytest.raises(ValueError, match="T"):
        power_grid(4, 0.5, 0.4, 2.0)


@pytest.fixture(scope="module")
def validate_problems():
    """The first VALIDATE_COUNT validate-split problems with a fresh prior batch and the exact
    flow's output at 0.999."""
    from benchmarks.problems import problems

    bridge = PhaseBridge()
    out = []
    for prob in problems("validate", VALIDATE_COUNT):
        mix = prob.mixture
        gen = torch.Generator().manual_seed(7)
        m0 = bridge.sample_prior((256, mix.dim), generator=gen, dtype=torch.float64)
        m_end = ode_solution(mix, bridge, m0, T0, T_REF, rtol=1e-8, atol=1e-8)
        out.append((mix.as_model(bridge), m0, mix.posterior_mean(bridge, m_end, T_REF)))
    return bridge, out


@pytest.mark.parametrize("nfe", sorted(MEDIAN_BOUND))
@pytest.mark.slow
def test_defaults_beat_published_on_validate_problems(validate_problems, nfe):
    bridge, probs = validate_problems
    pair = [default_setting(nfe), published_setting(nfe)]
    errs = torch.stack([settings_rmse(model, bridge, m0, target, nfe, pair, max_rows=8192)
                        for model, m0, target in probs])
    ratios = errs[:, 0] / errs[:, 1]
    msg = f"NFE {nfe}: ratios {[round(r, 3) for r in ratios.tolist()]}"
    assert float(ratios.median()) <= MEDIAN_BOUND[nfe] and float(ratios.max()) <= WORST_BOUND[nfe], msg


def test_batched_settings_equal_the_reference_sampler():
    bridge = PhaseBridge()
    mix = mixture_2d_grid()
    m0 = bridge.sample_prior((16, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = mix.as_model(bridge)
    settings = [(0.4, 2.0, 2), (0.9, 1.5, 3), (0.7, 1.0, 0), (0.8, 1.5, 2, (0.0, 0.1, 0.3, 0.45, 0.8, 1.0))]
    out = run_settings(model, bridge, m0, 6, settings, max_rows=10_000)
    for c, setting in enumerate(map(Setting.coerce, settings)):
        ref = sample_ode(model, m0, bridge, setting.grid(6, T0), setting.order, hop=True)
        assert torch.allclose(out[c], ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="fractions"):
        run_settings(model, bridge, m0, 6, [(0.8, 1.5, 2, (0.0, 0.5, 1.0))])


def test_optimize_grid_finds_the_minimum_of_a_known_objective():
    """Objective with a known minimum: T = 0.75 and fractions (0, 0.1, 0.4, 1)."""
    goal = torch.tensor([0.75, 0.1, 0.4], dtype=torch.float64)

    def objective(settings):
        points = torch.tensor([[s.T, *s.fractions[1:-1]] for s in settings], dtype=torch.float64)
        return ((points - goal) ** 2).sum(1)

    best, value, iterations = optimize_grid(objective, 4, Setting(0.5, 2.0, 2), min_step=1e-3, max_iter=400)
    assert (best.q, best.order) == (2.0, 2) and best.fractions[0] == 0.0 and best.fractions[-1] == 1.0
    r = best.fractions
    assert abs(best.T - 0.75) < 2e-3 and max(abs(r[1] - 0.1), abs(r[2] - 0.4)) < 2e-3
    assert value < 1e-5 and iterations > 1
    assert fractions_from_log_gaps([0.0, 0.0]) == (0.0, 0.5, 1.0)


@pytest.mark.slow
def test_tune_beats_published_on_a_tiny_problem():
    bridge = PhaseBridge()
    mix = mixture_2d_grid()
    model = mix.as_model(bridge)
    m0 = bridge.sample_prior((32, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = tune(model, bridge, [5], m0, Ts=[0.5, 0.6, 0.7], qs=[1.5, 2.0], orders=[2, 3], reference_nfe=60,
                  progress=False, refine=False, max_rows=1024, free_grid=True)
    r = result[5]
    assert set(r) >= {"T", "q", "order", "fractions", "rmse", "published_rmse"}
    ref = reference_solution(model, bridge, m0, 60)
    chosen = Setting.from_json(r)  # with its variant and free grid
    settings = [chosen, published_setting(5), chosen.replace(fractions=None)]
    chosen, published, power = settings_rmse(model, bridge, m0, ref, 5, settings)
    assert math.isclose(float(chosen), r["rmse"], rel_tol=1e-9)
    assert chosen <= power and chosen <= published and r["rmse"] <= r["published_rmse"]


def test_save_load_round_trip_and_malformed_files(tmp_path):
    result = {5: {"T": 0.6, "q": 1.5, "order": 2, "rmse": 0.01}, 10: {"T": 0.8, "q": 1.25, "order": 3},
              4: {"T": 0.5, "q": 1.0, "order": 2, "fractions": [0.0, 0.2, 0.7, 1.0]}}
    path = tmp_path / "tuned.json"
    save_tuned(result, path)
    loaded = load_tuned(path)
    assert loaded == result
    bad = tmp_path / "bad.json"
    fmt = "psb_fast.tuned/1"

    def with_fractions(fractions):
        entry = {"T": 0.6, "q": 1.5, "order": 2, "fractions": fractions}
        return json.dumps({"format": fmt, "settings": {"3": entry}})

    for text in (
        "{not json",
        json.dumps({"settings": {"5": {"T": 0.6, "q": 1.5, "order": 2}}}),  # no format tag
        json.dumps({"format": fmt, "settings": {"five": {"T": 0.6, "q": 1.5, "order": 2}}}),
        json.dumps({"format": fmt, "settings": {"5": {"T": 1.5, "q": 1.5, "order": 2}}}),
        json.dumps({"format": fmt, "settings": {"5": {"T": 0.6, "q": -1, "order": 2}}}),
        json.dumps({"format": fmt, "settings": {"5": {"T": 0.6, "q": 1.5, "order": 4}}}),
        json.dumps({"format": fmt, "settings": {"5": {"T": 0.6, "q": 1.5}}}),
        json.dumps({"format": fmt, "settings": {}}),
        with_fractions([0, 1]),
        with_fractions([0, 0.7, 0.5]),
        with_fractions("0,0.5,1"),
        with_fractions([0, True, 1]),
    ):
        bad.write_text(text)
        with pytest.raises(ValueError):
            load_tuned(bad)
    with pytest.raises(ValueError):
        save_tuned({0: {"T": 0.6, "q": 1.5, "order": 2}}, tmp_path / "x.json")


def test_tune_progress_counts_every_candidate(monkeypatch):
    """The tune bar advances once per candidate setting (coarse and refined), across NFEs."""
    import psb_fast.progress as progress_module

    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, k):
            self.n += k

        def set_postfix_str(self, text):
            pass

        def refresh(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(progress_module, "tqdm", Bar)  # every bar is made there
    bridge = PhaseBridge()
    m0 = bridge.sample_prior((32, 2), generator=torch.Generator().manual_seed(0))
    model = mixture_2d_grid().as_model(bridge)
    from psb_fast.tuning import Search, tune

    tune(model, bridge, [3, 4], m0, Search(Ts=(0.5, 0.7), qs=(2.0,), orders=(1, 2)), reference_nfe=20)
    (bar,) = bars
    assert bar.n == bar.total and bar.total > 2 * 4


def test_tune_and_reference_solution_take_a_model_whose_parameters_require_grad():
    """tune and reference_solution run the model without autograd (a load_trained model called
    outside torch.no_grad used to stop them with an in-place autograd error)."""
    from psb_fast.tuning import Search, reference_solution

    bridge = PhaseBridge()
    net = torch.nn.Linear(5, 2)  # m (4 values) and t -> F; parameters require grad
    assert all(p.requires_grad for p in net.parameters())

    def model(m, t):
        return net(torch.cat([m, t[:, None]], dim=1))

    m0 = bridge.sample_prior((16, 2), generator=torch.Generator().manual_seed(0))
    target = reference_solution(model, bridge, m0, nfe=20)
    assert target.shape == (16, 2) and not target.requires_grad
    result = tune(model, bridge, [3], m0, Search(Ts=[0.6], qs=[2.0], orders=[1], refine=False),
                  target=target, progress=False)
    assert set(result) == {3} and result[3]["rmse"] >= 0
