"""psb_fast.hooks: the callback and trajectory hooks and stroke `Guidance` (init-v on construction,
the velocity redraws before the first evaluations, inpainting's running x1 estimate), run on a
sampler's step plan and checked against psb_fast.guidance and the bridge's hop."""

import pytest
import torch

from psb_fast import PhaseBridge
from psb_fast.bridge import split_phase
from psb_fast.guidance import StrokeGuide, fill_unknown, redraw_velocity
from psb_fast.hooks import Guidance, record_trajectory, report_to
from psb_fast.loop import Hooks, integrate
from psb_fast.seeds import step_seed
from psb_fast.solvers import make_plan
from psb_fast.variants import step_tables

torch.set_num_threads(1)

GRID = torch.tensor([1e-3, 0.3, 0.6, 0.8, 0.9], dtype=torch.float64)


def _plan(bridge: PhaseBridge):
    """The step plan of an ODE sampler on GRID with the hop."""
    return make_plan(bridge, GRID, step_tables(bridge, GRID, 0, "multistep"), "ode")


def _linear_model(W: torch.Tensor):
    return lambda i, m: m @ W.t()  # evaluate(i, m) -> F_i, [B, C] from [B, 2C]


def _run(m: torch.Tensor, hooks: Hooks, nfe: int = 5):
    W = torch.linspace(-1, 1, m.shape[1] * m.shape[1] // 2).view(m.shape[1] // 2, m.shape[1])
    step = lambda i, m, F: split_phase(m)[0].add_(0.1 * split_phase(m)[1])  # noqa: E731 (x += 0.1 v)
    return integrate(m, evaluate=_linear_model(W), step=step, nfe=nfe, n_steps=nfe - 1, hooks=hooks)


# ----------------------------------------------------------------------------- callback, trajectory


def test_report_to_passes_each_evaluation_with_its_time_and_the_live_state():
    plan = _plan(PhaseBridge())
    reports = []
    m = torch.randn(3, 4)
    F_last = _run(m, Hooks(after_eval=[report_to(lambda info: reports.append(dict(info)), plan)]))
    assert [r["i"] for r in reports] == list(range(5))
    assert [r["t"] for r in reports] == list(plan.t_eval)
    assert all(r["m"] is m for r in reports) and reports[-1]["F"] is F_last


def test_trajectory_snapshots_are_copies_with_the_hop_estimate():
    bridge = PhaseBridge()
    plan = _plan(bridge)
    trajectory, states = [], []
    m = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    hooks = Hooks(after_eval=[record_trajectory(trajectory, plan, "cpu"),
                              lambda i, m, F: states.append((m.clone(), F.clone()))])
    _run(m, hooks)
    assert len(trajectory) == 5
    for i, (entry, (m_i, F_i)) in enumerate(zip(trajectory, states, strict=True)):
        assert entry["t"] == plan.t_eval[i]
        assert torch.equal(entry["x"], m_i[:, :2]) and torch.equal(entry["v"], m_i[:, 2:])  # not later states
        torch.testing.assert_close(entry["x1_hat"], bridge.estimate_x1(m_i, F_i, plan.t_eval[i]),
                                   rtol=1e-5, atol=1e-5)
    assert not torch.equal(trajectory[0]["x"], trajectory[-1]["x"])


# ----------------------------------------------------------------------------- guidance


def test_init_v_mixes_the_velocity_once_on_construction_and_adds_no_hook():
    plan = _plan(PhaseBridge())
    m = torch.randn(4, 6)
    stroke = torch.randn(3)
    x0, v0 = (t.clone() for t in split_phase(m))
    guidance = Guidance(StrokeGuide(stroke, mode="init-v", init_weight=0.25), m, plan, "cpu", seed=0)
    hooks = Hooks()
    guidance.add_to(hooks)
    assert hooks == Hooks()
    x, v = split_phase(m)
    assert torch.equal(x, x0)
    torch.testing.assert_close(v, 0.75 * v0 + 0.25 * stroke.expand(4, 3))


def test_dyn_v_redraws_before_the_first_strength_times_nfe_evaluations():
    plan = _plan(PhaseBridge())
    stroke = torch.randn(2)
    m = torch.randn(6, 4)
    guidance = Guidance(StrokeGuide(stroke, mode="dyn-v", strength=0.4), m, plan, "cpu", seed=3)
    hooks = Hooks()
    guidance.add_to(hooks)
    assert hooks.before_eval == [guidance.redraw] and hooks.after_eval == [] and guidance.redraws == 2
    changed = []
    for i in range(5):
        before = m.clone()
        guidance.redraw(i, m)
        assert torch.equal(m[:, :2], before[:, :2])  # x is kept
        changed.append(not torch.equal(m, before))
    assert changed == [True, True, False, False, False]


def test_dyn_v_redraw_follows_the_bridge_conditional_of_v():
    """v ~ N(cv s + (Lxv/Lxx)(x - cx s), Lvv^2) at the evaluation time, from step_seed(seed, -1)."""
    bridge = PhaseBridge()
    plan = _plan(bridge)
    B = 20000
    stroke = torch.tensor([0.5, -1.0])
    m = bridge.sample_prior((B, 2), generator=torch.Generator().manual_seed(1))
    guidance = Guidance(StrokeGuide(stroke, mode="dyn-v", strength=1.0), m, plan, "cpu", seed=4)
    guidance.redraw(0, m)
    guidance.redraw(1, m)
    co = bridge.coefficients(plan.t_eval[1])
    cx, cv, lxx, lxv, lvv = (float(getattr(co, n)) for n in ("cx", "cv", "lxx", "lxv", "lvv"))
    x, v = split_phase(m)
    z = (v - (cv * stroke + lxv / lxx * (x - cx * stroke))) / lvv
    assert z.mean().abs().max() < 0.03 and (z.std(0) - 1).abs().max() < 0.03  # 4 sigma at B = 20000
    # exactly the documented generator: a replay from the state before the second redraw
    m2 = bridge.sample_prior((B, 2), generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(step_seed(4, -1))
    for i in range(2):
        redraw_velocity(m2, stroke.expand(B, 2), plan.coefficients_at(i), generator)
    assert torch.equal(m, m2)


def test_inpaint_fills_unknown_entries_from_the_previous_hop_estimate():
    bridge = PhaseBridge()
    plan = _plan(bridge)
    stroke = torch.tensor([[0.3, -1.0, 0.7], [-1.0, -1.0, 0.2]])  # -1: unknown
    m = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    guidance = Guidance(StrokeGuide(stroke, mode="inpaint"), m, plan, "cpu", seed=5)
    hooks = Hooks()
    guidance.add_to(hooks)
    assert hooks.before_eval == [guidance.redraw] and hooks.after_eval == [guidance.estimate]
    assert guidance.redraws == 5 and torch.equal(guidance.x1_hat, torch.zeros(2, 3))

    replay = m.clone()
    generator = torch.Generator().manual_seed(step_seed(5, -1))
    known = stroke != -1.0
    x1_hat = torch.zeros(2, 3)
    F = torch.randn(2, 3, generator=torch.Generator().manual_seed(3))
    for i in range(3):
        guidance.redraw(i, m)
        redraw_velocity(replay, fill_unknown(stroke, known, x1_hat), plan.coefficients_at(i), generator)
        assert torch.equal(m, replay)
        guidance.estimate(i, m, F)
        x1_hat = bridge.estimate_x1(replay, F, plan.t_eval[i])
        torch.testing.assert_close(guidance.x1_hat, x1_hat, rtol=1e-5, atol=1e-5)
        x1_hat = guidance.x1_hat
    assert not torch.equal(fill_unknown(stroke, known, x1_hat), stroke)


@pytest.mark.parametrize("mode", ["dyn-v", "inpaint"])
def test_guidance_redraws_are_deterministic_per_seed(mode):
    plan = _plan(PhaseBridge())
    stroke = torch.tensor([0.2, -1.0])

    def run(seed):
        m = torch.ones(3, 4)
        guidance = Guidance(StrokeGuide(stroke, mode=mode, strength=1.0), m, plan, "cpu", seed=seed)
        hooks = Hooks()
        guidance.add_to(hooks)
        _run(m, hooks)
        return m

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
