"""Conditional generation: stroke guidance (dyn-v, init-v), inpainting, class labels, from_tuned."""

import json

import pytest
import torch

from psb_fast import PhaseBridge, PhaseSampler, bridge_sample
from psb_fast.bridge import split_phase
from psb_fast.guidance import StrokeGuide, redraw_velocity
from psb_fast.oracles import mixture_2d_grid
from psb_fast.settings import Setting
from psb_fast.tuning import save_tuned

torch.set_num_threads(1)
MODE = torch.tensor([1.2, 1.2])  # a mode of the 3x3 grid mixture


@pytest.fixture(scope="module")
def setup():
    bridge = PhaseBridge()
    mix = mixture_2d_grid()
    m0 = bridge.sample_prior((1000, 2), generator=torch.Generator().manual_seed(0))
    return bridge, mix.as_model(bridge), m0


def near(out: torch.Tensor, point: torch.Tensor, radius: float = 0.5) -> float:
    return float(((out - point).norm(dim=1) < radius).float().mean())


@pytest.mark.parametrize("t", [0.05, 0.5, 0.9])
def test_redraw_gives_the_bridge_conditional_of_v(t):
    """x_t, v_t from the bridge at x1 = s; v redrawn from v | x, x1 = s: (x, v) keeps the bridge's
    mean (cx s, cv s) and covariance Sigma(t)."""
    bridge = PhaseBridge()
    s = torch.full((200_000, 1), 0.7)
    m, _ = bridge_sample(bridge, s, torch.full((200_000,), t), seed=3, backend="cpu")
    m[:, 1] = 123.0  # the old v must not matter
    redraw_velocity(m, s, bridge.coefficients(t), torch.Generator().manual_seed(1))
    x, v = (a.double().flatten() for a in split_phase(m))
    co = bridge.coefficients(t)
    assert float(v.mean()) == pytest.approx(0.7 * float(co.cv), abs=4 * float(co.svv) ** 0.5 / 447)
    cov = torch.cov(torch.stack([x, v]))
    assert float(cov[0, 1]) == pytest.approx(float(co.sxv), rel=0.02, abs=1e-3 * float(co.svv))
    assert float(cov[1, 1]) == pytest.approx(float(co.svv), rel=0.02)


def test_dyn_v_pulls_samples_to_the_stroke(setup):
    bridge, model, m0 = setup
    sampler = PhaseSampler(bridge, 10, backend="cpu")
    free = near(sampler.sample(model, m0), MODE)
    weak = near(sampler.sample(model, m0, guide=StrokeGuide(MODE), seed=0), MODE)
    strong = near(sampler.sample(model, m0, guide=StrokeGuide(MODE, strength=1.0), seed=0), MODE)
    assert free < 0.2 and weak > free + 0.02 and strong > 0.95


def test_dyn_v_redraws_only_the_first_steps_and_is_seeded(setup):
    bridge, model, m0 = setup
    sampler = PhaseSampler(bridge, 8, backend="cpu")
    seen = []

    def spy(m, t):
        seen.append(split_phase(m)[1].clone())
        return model(m, t)

    guide = StrokeGuide(MODE, strength=0.5)
    a = sampler.sample(spy, m0[:16], guide=guide, seed=5)
    v_guided = seen[:]
    seen.clear()
    b = sampler.sample(spy, m0[:16], guide=guide, seed=5)
    assert torch.equal(a, b)
    seen.clear()
    sampler.sample(spy, m0[:16])
    assert guide.redraw_steps(8) == 4
    assert not torch.equal(v_guided[0], seen[0])  # step 0's v was redrawn
    c = sampler.sample(model, m0[:16], guide=guide, seed=6)
    assert not torch.equal(a, c)


def test_init_v_mixes_the_initial_velocity_once(setup):
    bridge, model, m0 = setup
    first = []
    guide = StrokeGuide(MODE, mode="init-v", init_weight=0.25)
    PhaseSampler(bridge, 5, backend="cpu").sample(
        model, m0[:8], guide=guide, callback=lambda d: first.append(d["m"].clone()) if d["i"] == 0 else None
    )
    expected = 0.75 * split_phase(m0[:8])[1] + 0.25 * MODE
    assert torch.allclose(split_phase(first[0])[1], expected, atol=1e-6)
    assert torch.equal(split_phase(first[0])[0], split_phase(m0[:8])[0])


def test_inpainting_keeps_known_entries_and_fills_unknown_from_the_model(setup):
    """Stroke (1.2, -1): x-coordinate known, y unknown. Outputs sit at x = 1.2 and their y at one
    of the mixture's rows (-1.2, 0, 1.2), each row reached."""
    bridge, model, m0 = setup
    out = PhaseSampler(bridge, 10, backend="cpu").sample(
        model, m0, guide=StrokeGuide(torch.tensor([1.2, -1.0]), mode="inpaint"), seed=0
    )
    assert float((out[:, 0] - 1.2).abs().mean()) < 0.1
    rows = torch.tensor([-1.2, 0.0, 1.2])
    share = [float(((out[:, 1] - r).abs() < 0.3).float().mean()) for r in rows]
    assert sum(share) > 0.9 and min(share) > 0.1


def test_per_sample_strokes_and_class_labels_pass_through(setup):
    bridge, model, m0 = setup
    strokes = torch.stack([MODE, -MODE]).repeat(4, 1)  # [8, 2]
    labels = torch.arange(8)
    got = []

    def conditional(m, t, cond):
        got.append(cond)
        return model(m, t)

    out = PhaseSampler(bridge, 6, backend="cpu").sample(
        conditional, m0[:8], cond=labels, guide=StrokeGuide(strokes, strength=1.0), seed=0
    )
    assert all(c is labels for c in got) and len(got) == 6
    assert torch.allclose(out[0::2], MODE.expand(4, 2), atol=0.5)
    assert torch.allclose(out[1::2], -MODE.expand(4, 2), atol=0.5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stroke": [1.0, 2.0]}, TypeError, "stroke"),
        ({"stroke": torch.tensor([1, 2])}, TypeError, "stroke"),
        ({"stroke": torch.tensor([1.0, float("nan")])}, ValueError, "NaN"),
        ({"stroke": MODE, "mode": "dyn-x"}, ValueError, "mode"),
        ({"stroke": MODE, "strength": 1.5}, ValueError, "strength"),
        ({"stroke": MODE, "init_weight": -0.1}, ValueError, "init_weight"),
    ],
)
def test_bad_guides(kwargs, error, match):
    with pytest.raises(error, match=match):
        StrokeGuide(**kwargs)


def test_bad_guide_use(setup):
    bridge, model, m0 = setup
    sampler = PhaseSampler(bridge, 4, backend="cpu")
    with pytest.raises(ValueError, match="stroke must have shape"):
        sampler.sample(model, m0, guide=StrokeGuide(torch.zeros(3)))
    with pytest.raises(TypeError, match="guide"):
        sampler.sample(model, m0, guide=MODE)


def test_explicit_grid_and_from_tuned(setup, tmp_path):
    bridge, model, m0 = setup
    times = Setting(0.8, 1.5, 3, (0.0, 0.1, 0.3, 0.55, 0.8, 1.0)).grid(6, 1e-5)
    explicit = PhaseSampler(bridge, 6, grid=times, order=3, backend="cpu")
    assert explicit.T == pytest.approx(0.8) and explicit.grid_kind == "explicit"
    path = tmp_path / "tuned.json"
    save_tuned({6: {"T": 0.8, "q": 1.5, "order": 3, "fractions": [0.0, 0.1, 0.3, 0.55, 0.8, 1.0]}}, path)
    loaded = PhaseSampler.from_tuned(path, bridge, 6, backend="cpu")
    assert torch.equal(loaded.grid, explicit.grid) and loaded.order == 3
    assert torch.equal(loaded.sample(model, m0[:32]), explicit.sample(model, m0[:32]))
    with pytest.raises(ValueError, match="tuned NFEs"):
        PhaseSampler.from_tuned(path, bridge, 7)
    with pytest.raises(ValueError, match="from the file"):
        PhaseSampler.from_tuned(path, bridge, 6, T=0.5)
    for bad, match in [([1e-5, 0.5, 0.4, 0.6, 0.7, 0.8], "increasing"), ([1e-5, 0.5], "nfe=6"),
                       ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "t0")]:
        with pytest.raises(ValueError, match=match):
            PhaseSampler(bridge, 6, grid=bad)
    with pytest.raises(ValueError, match="disagrees"):
        PhaseSampler(bridge, 6, grid=times, T=0.7)
    path.write_text(json.dumps({"format": "nope"}))
    with pytest.raises(ValueError):
        PhaseSampler.from_tuned(path, bridge, 6)


def test_sampling_a_trainable_module_needs_no_grad_context(setup):
    """A real nn.Module with trainable weights: sample() must not build or trip over autograd."""
    bridge, _, m0 = setup
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    out = PhaseSampler(bridge, 5, backend="cpu").sample(lambda m, t: net(m), m0[:8])
    assert out.shape == (8, 2) and not out.requires_grad


@pytest.mark.parametrize("variant", ["multistep-corrector", "data-corrector"])
def test_guidance_redraws_are_not_undone_by_the_corrector(setup, variant):
    """A redraw replaces v before an evaluation; the corrector must not redo the step before it
    (its correction would carry the jump into the state). Inpainting redraws before every
    evaluation, so each corrector variant then gives exactly its predictor's output, and strong
    dyn-v guidance reaches the stroke's mode with every variant."""
    bridge, model, m0 = setup
    from psb_fast.defaults import default_setting

    setting = default_setting(10).replace(order=3)
    predictor = setting.replace(variant=variant.removesuffix("-corrector"))
    guide = StrokeGuide(torch.tensor([1.2, -1.0]), mode="inpaint")
    corrected = PhaseSampler(bridge, 10, setting.replace(variant=variant), backend="cpu")
    plain = PhaseSampler(bridge, 10, predictor, backend="cpu")
    assert torch.equal(corrected.sample(model, m0, guide=guide, seed=0),
                       plain.sample(model, m0, guide=guide, seed=0))
    strong = corrected.sample(model, m0, guide=StrokeGuide(MODE, strength=1.0), seed=0)
    assert near(strong, MODE) > 0.99
