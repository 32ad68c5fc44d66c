"""Learned step times (psb_fast.learn): the differentiable loop and tables, the parametrization,
the learning on an exact drift, the keep-only-if-better rule, the tuned-file round trip, bad input."""

import math

import pytest
import torch

from psb_fast import PhaseBridge
from psb_fast import learn as learn_mod
from psb_fast.learn import (
    T_MAX,
    GridParams,
    Learn,
    grid_tables,
    learn_setting,
    sample_grid,
    setting_of,
    split_rows,
)
from psb_fast.oracles import mixture_2d_grid
from psb_fast.sampler import PhaseSampler
from psb_fast.settings import Setting, load_tuned, published_setting, save_tuned
from psb_fast.tuning import reference_solution, run_settings, tune_learned
from psb_fast.variants import VARIANTS

torch.set_num_threads(1)
T0 = 1e-5
BRIDGE = PhaseBridge()


def _prior(n: int, seed: int) -> torch.Tensor:
    return BRIDGE.sample_prior((n, 2), torch.Generator().manual_seed(seed), dtype=torch.float64)


def _tiny_net(seed: int = 0):
    """A smooth model differentiable in its state and time (float64)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    def model(m, t):
        return net(torch.cat([m, t[:, None].to(m.dtype)], 1))

    return model


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_sample_grid_equals_the_production_loop(variant, order):
    model = mixture_2d_grid().as_model(BRIDGE)
    m0 = _prior(16, 0)
    setting = Setting(0.8, 1.5, order, None, variant)
    expected = run_settings(model, BRIDGE, m0, 6, [setting])[0]
    params = GridParams(setting.grid(6, T0), T0)
    u = params.u()
    tables = grid_tables(BRIDGE, u, order, variant)
    got = sample_grid(model, m0, learn_mod._t_of(u), tables, order, variant)
    # the RK4 tables are built with another step count here (one build with the sub-grids): ~1e-10
    assert torch.allclose(got, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("variant", ["multistep", "data-corrector"])
def test_gradient_matches_finite_differences_of_the_whole_sampler(variant):
    model, m0 = _tiny_net(), _prior(32, 1)
    setting = Setting(0.8, 1.5, 2, None, variant)
    params = GridParams(setting.grid(5, T0), T0)

    def loss() -> torch.Tensor:
        u = params.u()
        x1 = sample_grid(model, m0, learn_mod._t_of(u), grid_tables(BRIDGE, u, 2, variant), 2, variant)
        return x1.pow(2).mean()

    grads = torch.autograd.grad(loss(), params.parameters())
    eps = 1e-5
    for p, g in zip(params.parameters(), grads, strict=True):
        for k in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[k] += eps
                up = float(loss())
                p.view(-1)[k] -= 2 * eps
                down = float(loss())
                p.view(-1)[k] += eps
            assert float(g.view(-1)[k]) == pytest.approx((up - down) / (2 * eps), rel=2e-3, abs=1e-7)


def test_grid_params_are_ordered_bounded_and_round_trip_through_a_setting():
    start = Setting(0.7, 2.0, 2, None, "data-corrector")
    params = GridParams(start.grid(7, T0), T0)
    assert torch.allclose(params.grid(), start.grid(7, T0), rtol=1e-12, atol=1e-15)
    with torch.no_grad():  # any parameters give an ordered grid in [t0, T_MAX]
        params.z.copy_(torch.tensor([4.0, -3.0, 0.5, 2.0, -1.0, 0.0]))
        params.s.fill_(30.0)
    params.clamp()
    t = params.grid()
    assert t[0] == T0 and bool((t.diff() > 0).all()) and float(t[-1]) <= T_MAX
    assert float(params.z.detach().max() - params.z.detach().min()) <= learn_mod.MAX_LOG_GAP + 1e-12
    with torch.no_grad():  # a moderate grid round-trips through a Setting's fractions
        params.z.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4, 0.0]))
        params.s.fill_(0.5)
    t = params.grid()
    setting = setting_of(t, start)
    assert (setting.q, setting.order, setting.variant) == (2.0, 2, "data-corrector")
    assert torch.allclose(setting.grid(7, T0), t, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_learned_setting_on_an_exact_drift_is_ordered_and_no_worse_on_validation():
    model = mixture_2d_grid().as_model(BRIDGE)
    m0 = _prior(96, 2)
    target = reference_solution(model, BRIDGE, m0, 200)
    start = Setting(0.6, 2.0, 1, None, "multistep-corrector")
    found = learn_setting(model, BRIDGE, 4, start, m0[:64], target[:64], m0[64:], target[64:],
                          Learn(steps=20, val_every=2, patience=4), T0, progress=False)
    assert found.best_val <= found.start_val
    assert found.curve and all(len(c) == 3 for c in found.curve)
    if found.setting is not None:
        t = found.setting.grid(4, T0)
        assert t[0] == T0 and bool((t.diff() > 0).all()) and T0 < found.setting.T <= T_MAX
        assert found.best_val < found.start_val


def _tune(m0, monkeypatch=None, **learn):
    model = mixture_2d_grid().as_model(BRIDGE)
    options = Learn(steps=15, val_every=3, patience=3, **learn)
    from psb_fast.tuning import Search

    search = Search(Ts=(0.5, 0.7), qs=(2.0,), orders=(1,), variants=("multistep-corrector",), refine=False)
    return tune_learned(model, BRIDGE, [4], m0, search, options, reference_nfe=200, progress=False)


@pytest.mark.slow
def test_tune_learned_keeps_the_better_on_disjoint_evaluation_draws_and_round_trips(tmp_path):
    m0 = _prior(120, 3)
    result = _tune(m0)
    entry = result[4]
    info = entry["learn"]
    assert info["draws"] == {"tune": 48, "validation": 24, "evaluation": 48}
    assert info["kept"] in ("learned", "grid")
    if info["kept"] == "learned":
        assert info["learned_rmse"] < info["grid_rmse"] and entry["rmse"] == info["learned_rmse"]
        assert info["z"] < -2.0
        assert entry["fractions"] == info["learned"]["fractions"]
    else:
        assert entry["rmse"] == info["grid_rmse"]
    assert entry["rmse"] <= info["grid_rmse"]
    path = tmp_path / "tuned.json"
    save_tuned(result, path)
    back = load_tuned(path)[4]
    assert back["learn"]["kept"] == info["kept"]
    sampler = PhaseSampler.from_tuned(path, BRIDGE, 4, backend="float64")
    kept = Setting.from_json(entry)
    assert sampler.setting == kept
    assert torch.equal(sampler.grid, kept.grid(4, T0))


def test_a_worse_learned_setting_is_not_kept(monkeypatch):
    """The keep-only-if-better rule, with learning replaced by a setting that is far worse."""

    def bad(model, bridge, nfe, start, *args, **kwargs):
        worse = published_setting(nfe).replace(T=0.2, variant=start.variant, order=start.order)
        return learn_mod.Learned(setting_of(worse.grid(nfe, T0), start), 1.0, 0.5, 1.0, 0.5, 3, 0.0)

    import psb_fast.tuning

    monkeypatch.setattr(psb_fast.tuning, "learn_setting", bad)  # tune_learned's learner
    entry = _tune(_prior(120, 4))[4]
    info = entry["learn"]
    assert info["learned_rmse"] > info["grid_rmse"]
    assert info["kept"] == "grid" and entry["rmse"] == info["grid_rmse"]
    assert Setting.from_json(entry) == Setting.from_json(info["grid"])
    assert info["ratio_to_grid"] == pytest.approx(info["learned_rmse"] / info["grid_rmse"])


def test_paired_z_counts_standard_errors_of_the_difference():
    b = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert learn_mod.paired_z(b, b) == 0.0
    a = b - torch.tensor([0.1, 0.3, 0.1, 0.3])  # difference mean -0.2, std 0.11547, se 0.057735
    assert learn_mod.paired_z(a, b) == pytest.approx(-0.2 / (0.11547005 / 2), rel=1e-6)


def test_split_rows_is_disjoint_and_covers_the_batch():
    tune_rows, val_rows, eval_rows = split_rows(100, Learn())
    bounds = (tune_rows.start, tune_rows.stop, val_rows.start, val_rows.stop, eval_rows.start, eval_rows.stop)
    assert bounds == (0, 40, 40, 60, 60, 100)


@pytest.mark.parametrize("kwargs, word", [
    ({"lr": -1.0}, "lr"), ({"lr": math.nan}, "lr"), ({"jacobian": "some"}, "jacobian"),
    ({"steps": 0}, "steps"), ({"val_share": 0.5, "eval_share": 0.5}, "val_share"),
    ({"teacher_ball": -0.1}, "teacher_ball"), ({"batch": 0}, "batch"), ({"keep_z": -1.0}, "keep_z"),
    ({"eval_share": 0.0}, "eval_share"),
])
def test_bad_options_raise_one_line_errors_naming_the_field(kwargs, word):
    with pytest.raises(ValueError, match=word) as err:
        Learn(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_calls_raise_before_any_work():
    model = mixture_2d_grid().as_model(BRIDGE)
    with pytest.raises(ValueError, match="m0 must hold enough rows"):
        tune_learned(model, BRIDGE, [4], _prior(12, 0), None, Learn())
    with pytest.raises(TypeError, match="learn must be"):
        tune_learned(model, BRIDGE, [4], _prior(64, 0), None, "yes")
    with pytest.raises(ValueError, match="probODE"):
        tune_learned(model, PhaseBridge(mode="SDE"), [4], _prior(64, 0), None, Learn())
    with pytest.raises(ValueError, match="nfe"):
        learn_setting(model, BRIDGE, 1, Setting(0.5), _prior(8, 0), _prior(8, 0)[:, :2], _prior(8, 1),
                      _prior(8, 1)[:, :2], progress=False)
