"""PhaseSampler's API: published-algorithm compatibility, solvers, trajectory, conditioning, errors,
Setting as its input, old spellings, from_tuned."""

import math

import pytest
import torch

import psb_fast
from psb_fast import PhaseBridge, PhaseSampler, backends
from psb_fast.defaults import default_setting, tuned_grid
from psb_fast.oracles import mixture_2d_grid, ode_solution
from psb_fast.reference.grids import rev_quad_grid
from psb_fast.reference.sampler import sample_ode
from psb_fast.sampler import published_T
from psb_fast.settings import Setting, load_tuned, published_setting, save_tuned

torch.set_num_threads(1)
BACKENDS = ["cpu", "reference", "triton"]


@pytest.fixture(scope="module")
def setup():
    bridge = PhaseBridge()
    mix = mixture_2d_grid()
    m0 = bridge.sample_prior((128, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    return bridge, mix, m0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("nfe", "T"), [(5, 0.4), (10, 0.7), (20, 0.9)])
def test_published_settings_match_reference(setup, backend, nfe, T):
    """order 2, rev-quad, hop at the published T: equals the reference algorithm to 1e-4."""
    bridge, mix, m0 = setup
    model = mix.as_model(bridge)
    out = PhaseSampler(bridge, nfe, T=T, order=2, grid="rev-quad", backend=backend).sample(model, m0)
    ref = sample_ode(model, m0, bridge, rev_quad_grid(nfe, 1e-5, T), 2, hop=True)
    assert out.dtype == m0.dtype and out.shape == (128, 2)
    assert (out.double() - ref.double()).abs().max() < 1e-4


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_no_hop_matches_reference_every_order(setup, order):
    bridge, mix, m0 = setup
    model = mix.as_model(bridge)
    out = PhaseSampler(bridge, 12, T=0.95, order=order, hop=False, backend="cpu").sample(model, m0)
    ref = sample_ode(model, m0, bridge, rev_quad_grid(12, 1e-5, 0.95), order, hop=False)
    assert (out.double() - ref.double()).abs().max() < 1e-4


@pytest.mark.parametrize("nfe", [5, 10, 20])
@pytest.mark.slow
def test_defaults_are_tuned_and_accurate(setup, nfe):
    """None settings take the tuned T/order/grid; the hop output tracks the exact flow's x1 at
    least as well as the published settings (pathwise, vs the exact flow to 0.999)."""
    bridge, mix, m0 = setup
    sampler = PhaseSampler(bridge, nfe=nfe)
    T, order = default_setting(nfe).T, default_setting(nfe).order
    assert (sampler.T, sampler.order, sampler.grid_kind) == (T, order, "default")
    assert sampler.setting == default_setting(nfe)
    assert torch.equal(sampler.grid, tuned_grid(nfe, 1e-5, T))
    m64 = m0.double()
    m_end = ode_solution(mix, bridge, m64, 1e-5, 0.999)
    exact = bridge.estimate_x1(m_end, mix.drift(bridge, m_end, 0.999), 0.999)
    model = mix.as_model(bridge)
    out = sampler.sample(model, m64)
    published = PhaseSampler(bridge, nfe, T=published_T(nfe), order=2, grid="rev-quad").sample(model, m64)
    assert out.dtype == torch.float64

    def rmse(a):
        return float((a - exact).pow(2).mean().sqrt())

    assert rmse(out) <= rmse(published)


def test_other_solvers_and_no_hop_keep_published_defaults():
    sde = PhaseSampler(PhaseBridge(mode="SDE"), nfe=10, solver="sde")
    assert (sde.T, sde.order, sde.grid_kind) == (0.7, 0, "rev-quad")
    nohop = PhaseSampler(PhaseBridge(), nfe=10, hop=False)
    assert (nohop.T, nohop.order, nohop.grid_kind) == (0.99, 2, "rev-quad")


def test_model_called_nfe_times_with_row_times(setup):
    bridge, mix, m0 = setup
    calls = []

    def model(m, t):
        calls.append(t)
        assert t.shape == (m.shape[0],) and t.dtype == m.dtype and t.device == m.device
        return mix.as_model(bridge)(m, t)

    PhaseSampler(bridge, 7).sample(model, m0)
    assert len(calls) == 7
    expected = PhaseSampler(bridge, 7).grid.tolist()
    assert [float(t[0]) for t in calls] == pytest.approx(expected)


def test_trajectory_and_callback(setup):
    bridge, mix, m0 = setup
    seen = []
    x1, traj = PhaseSampler(bridge, 10).sample(
        mix.as_model(bridge), m0, return_trajectory=True, callback=lambda d: seen.append(d["i"])
    )
    assert seen == list(range(10)) and len(traj) == 10
    assert traj[-1]["t"] == pytest.approx(default_setting(10).T)
    assert torch.allclose(traj[-1]["x1_hat"], x1, atol=1e-6)
    assert all(s["x"].shape == (128, 2) and s["v"].shape == (128, 2) for s in traj)
    assert not torch.equal(traj[0]["x"], traj[-1]["x"])


def test_cond_is_passed_through(setup):
    bridge, mix, m0 = setup
    labels = torch.arange(m0.shape[0])
    got = []

    def model(m, t, cond):
        got.append(cond)
        return torch.zeros(m.shape[0], m.shape[1] // 2, dtype=m.dtype)

    PhaseSampler(bridge, 3).sample(model, m0, cond=labels)
    assert len(got) == 3 and all(c is labels for c in got)


@pytest.mark.parametrize("solver", ["sde", "em", "sscs"])
@pytest.mark.slow
def test_sde_solvers_reproduce_mixture(solver):
    """SDE model with its exact drift: the output's per-mode means sit on the mixture's modes."""
    bridge = PhaseBridge(mode="SDE")
    mix = mixture_2d_grid()
    m0 = bridge.sample_prior((1000, 2), generator=torch.Generator().manual_seed(1))
    out = PhaseSampler(bridge, 100, solver=solver, hop=False, T=0.99).sample(mix.as_model(bridge), m0, seed=3)
    nearest = torch.cdist(out.double(), mix.means).argmin(1)
    frac = torch.bincount(nearest, minlength=mix.n_components).double() / len(out)
    se = torch.sqrt(mix.weights * (1 - mix.weights) / len(out))
    assert ((frac - mix.weights).abs() < 5 * se + 0.02).all(), (frac, mix.weights)
    for k in range(mix.n_components):
        pts = out.double()[nearest == k]
        assert (pts.mean(0) - mix.means[k]).abs().max() < 0.1


def test_sde_seed_determinism():
    bridge = PhaseBridge(mode="SDE")
    mix = mixture_2d_grid()
    m0 = bridge.sample_prior((64, 2), generator=torch.Generator().manual_seed(1))
    s = PhaseSampler(bridge, 8, solver="sde")
    a, b, c = (s.sample(mix.as_model(bridge), m0, seed=sd) for sd in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nfe": 0}, "nfe"),
        ({"nfe": 2.5}, "nfe"),
        ({"T": 1.0}, "T"),
        ({"T": 1e-6}, "T"),
        ({"T": math.nan}, "T"),
        ({"order": 4}, "order"),
        ({"solver": "heun"}, "solver"),
        ({"grid": "cosine"}, "grid"),
        ({"backend": "cuda"}, "backend"),
        ({"solver": "sde"}, "mode"),
        ({"hop": False, "T": 0.9995}, "T"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PhaseSampler(PhaseBridge(), **kwargs)


def test_bad_m0_and_bad_model_output(setup):
    bridge, mix, m0 = setup
    sampler = PhaseSampler(bridge, 5)
    with pytest.raises(ValueError, match="m0"):
        sampler.sample(mix.as_model(bridge), m0[:, :3])
    with pytest.raises(TypeError, match="m0"):
        sampler.sample(mix.as_model(bridge), m0.to(torch.int64))
    with pytest.raises(ValueError, match=r"step 0 \(t=1e-05\).*shape"):
        sampler.sample(lambda m, t: torch.zeros(m.shape[0], 3), m0)

    t2 = float(sampler.grid[2])

    def nan_at_step_2(m, t):
        F = mix.as_model(bridge)(m, t)
        return F * math.nan if float(t[0]) > t2 - 1e-6 else F

    with pytest.raises(ValueError, match=rf"step 2 \(t={t2:.6g}\).*NaN"):
        sampler.sample(nan_at_step_2, m0)


def test_public_names():
    assert psb_fast.PhaseSampler is PhaseSampler and callable(psb_fast.bridge_sample)
    from psb_fast.tuning import tune

    assert psb_fast.tune is tune


def test_deferred_nonfinite_report_names_first_bad_step():
    """Accelerator path: flags kept on the device, the first bad step is reported after the loop."""
    from psb_fast.sampler import _raise_first_nonfinite

    _raise_first_nonfinite([])
    _raise_first_nonfinite([(0, 0.1, torch.tensor(True)), (1, 0.2, torch.tensor(True))])
    flags = [(0, 0.1, torch.tensor(True)), (1, 0.25, torch.tensor(False)), (2, 0.5, torch.tensor(False))]
    with pytest.raises(ValueError, match=r"step 1 \(t=0.25\).*NaN"):
        _raise_first_nonfinite(flags)


def test_nfe1_hops_at_its_only_grid_time(setup):
    """NFE 1: one evaluation at t0, and the hop at that same time (as the reference does)."""
    bridge, mix, m0 = setup
    model = mix.as_model(bridge)
    out = PhaseSampler(bridge, 1, backend="cpu").sample(model, m0)
    ref = sample_ode(model, m0, bridge, rev_quad_grid(1, 1e-5, 0.4), 2, hop=True)
    assert (out.double() - ref.double()).abs().max() < 1e-4


def test_progress_bar_reaches_nfe(monkeypatch):
    """The bar counts every network evaluation, the last one (before the hop) included."""
    import psb_fast.progress as progress_module

    counts = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            counts.append(self)

        def update(self, k=1):
            self.n += k

        def close(self):
            pass

    monkeypatch.setattr(progress_module, "tqdm", Bar)  # every bar is made there
    bridge = PhaseBridge()
    m0 = bridge.sample_prior((8, 2), generator=torch.Generator().manual_seed(0))
    for nfe in (1, 5, 10):
        sampler = PhaseSampler(bridge, nfe, backend="cpu")
        sampler.sample(lambda m, t: torch.zeros_like(m[:, :2]), m0, progress=True)
    assert [(b.n, b.total) for b in counts] == [(1, 1), (5, 5), (10, 10)]


def test_model_output_on_another_device_is_refused():
    """The loop's fused steps take the output as it is: one on another device is refused first."""
    bridge = PhaseBridge()
    m0 = bridge.sample_prior((4, 2), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"model output at step 0 \(t=1e-05\) must be on cpu, got meta"):
        PhaseSampler(bridge, 3, backend="cpu").sample(lambda m, t: torch.zeros(4, 2, device="meta"), m0)


# ------------------------------------------------------------------- Setting, old spellings, from_tuned

def test_setting_is_the_samplers_input():
    bridge = PhaseBridge()
    setting = default_setting(10).replace(order=1)
    sampler = PhaseSampler(bridge, 10, setting)
    assert sampler.setting == setting and (sampler.T, sampler.order, sampler.variant) == (
        setting.T, 1, setting.variant)
    assert torch.equal(sampler.grid, setting.grid(10, 1e-5))
    pub = PhaseSampler(bridge, 10, published_setting(10))
    assert (pub.T, pub.order, pub.grid_kind, pub.variant) == (0.7, 2, "rev-quad", "multistep")
    with pytest.raises(ValueError, match="either setting or the old keywords"):
        PhaseSampler(bridge, 10, setting, order=2)
    with pytest.raises(TypeError, match="setting must be"):
        PhaseSampler(bridge, 10, "rev-quad")


def test_old_keywords_warn_once_and_stay_in_one_family(monkeypatch):
    """A partial old spelling replaces fields of the family default (variant included), never
    mixing in the published variant; T, order and grid together keep meaning the published update."""
    monkeypatch.setattr(backends, "_WARNED", set())
    bridge = PhaseBridge()
    with pytest.warns(FutureWarning, match=r"PhaseSampler\(order=...\) is deprecated"):
        partial = PhaseSampler(bridge, 10, order=1)
    assert partial.setting == default_setting(10).replace(order=1)
    with warnings_recorded() as seen:
        PhaseSampler(bridge, 10, order=1)
    assert not seen  # once per process
    with pytest.warns(FutureWarning):
        full = PhaseSampler(bridge, 10, T=0.7, order=2, grid="rev-quad")
    assert full.setting == published_setting(10)
    with pytest.warns(FutureWarning, match="keyword-only"):
        positional = PhaseSampler(bridge, 10, 0.7, 1e-5, 2, "rev-quad")
    assert positional.setting == published_setting(10)
    with pytest.warns(FutureWarning, match="'float64'"):
        assert PhaseSampler(bridge, 4, backend="reference").backend == "float64"


class warnings_recorded:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        seen = self._cm.__enter__()
        warnings.simplefilter("always")
        return seen

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


# --- tuned-settings files (beside Setting) ------------------------------------------------------


def test_tuned_file_round_trip_and_from_tuned(tmp_path):
    path = tmp_path / "tuned.json"
    save_tuned({10: {"T": 0.75, "q": 1.5, "order": 2, "variant": "data-corrector", "rmse": 0.1}}, path)
    entries = load_tuned(path)
    assert entries[10]["variant"] == "data-corrector"
    sampler = PhaseSampler.from_tuned(path, PhaseBridge(), 10)
    assert sampler.setting == Setting(0.75, 1.5, 2, None, "data-corrector")
