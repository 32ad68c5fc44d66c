"""psb_fast.solvers: the step plan (`make_plan`) and the SDE solvers' steps for the loop, checked
against the public ops they must equal (`phase_step`, `sde_step`, `PhaseBridge.estimate_x1`) with the
seeds of the seed policy (`seeded_noise`: draw k of a run seeded s uses step_seed(s, k)). The ODE
variants' steps are psb_fast.variants' (tests/test_variants.py)."""

import pytest
import torch

from psb_fast import PhaseBridge, phase_step, sde_step
from psb_fast.multistep import multistep_coefficients
from psb_fast.seeds import step_seed
from psb_fast.solvers import make_plan, seeded_noise, solver_step, sscs_first_half
from psb_fast.variants import step_tables

torch.set_num_threads(1)

GRID = torch.tensor([1e-3, 0.2, 0.45, 0.7, 0.9], dtype=torch.float64)
T_END = 0.999


def _plan(mode: str, solver: str, hop: bool = True):
    """The plan of a sampler on GRID (the SDE solvers' tables: the published update at order 0)."""
    bridge = PhaseBridge(mode=mode)
    tables = step_tables(bridge, GRID, 0, "multistep", None if hop else T_END)
    return bridge, make_plan(bridge, GRID, tables, solver)


def _state(seed: int, batch: int = 3, channels: int = 2, rest: int = 4):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(batch, 2 * channels, rest, generator=g)
    F = [torch.randn(batch, channels, rest, generator=g) for _ in range(len(GRID))]
    return m, F


# ----------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("solver", ["sde", "em"])
def test_plan_with_the_hop_steps_between_grid_times_and_hops_at_T(solver):
    bridge, plan = _plan("SDE", solver)
    times = GRID.tolist()
    assert plan.nfe == 5 and plan.n_steps == 4 and plan.t_eval == tuple(times)
    assert plan.t_step == tuple(times[:-1])
    assert plan.h == pytest.approx([b - a for a, b in zip(times[:-1], times[1:], strict=True)], rel=1e-15)
    assert [step.h for step in plan.sde] == list(plan.h) and {step.kind for step in plan.sde} == {
        "exact" if solver == "sde" else "em"}
    assert plan.T_hop == times[-1] and plan.hop_weights == bridge.hop_weights(times[-1])


def test_plan_without_the_hop_takes_a_last_step_to_t_end():
    _, plan = _plan("SDE", "sde", hop=False)
    assert plan.nfe == 5 and plan.n_steps == 5
    assert plan.t_step[-1] == GRID[-1].item() and plan.h[-1] == pytest.approx(T_END - GRID[-1].item())


def test_sscs_evaluates_at_each_steps_midpoint():
    _, plan = _plan("SDE", "sscs")
    times = GRID.tolist()
    midpoints = [0.5 * (a + b) for a, b in zip(times[:-1], times[1:], strict=True)]
    assert plan.t_eval[:-1] == pytest.approx(midpoints, rel=1e-14) and plan.t_eval[-1] == times[-1]


@pytest.mark.parametrize("mode", ["probODE", "SDE"])
def test_plan_hop_and_estimates_equal_the_bridge_hop(mode):
    bridge, plan = _plan(mode, "sde")
    m, F = _state(0)
    torch.testing.assert_close(plan.hop(m, F[0], "cpu"), bridge.estimate_x1(m, F[0], plan.T_hop),
                               rtol=1e-5, atol=1e-5)
    for i in (0, 2):
        expected = bridge.estimate_x1(m, F[i], plan.t_eval[i])
        torch.testing.assert_close(plan.x1_hat(i, m, F[i], "cpu"), expected, rtol=1e-5, atol=1e-5)
        co = plan.coefficients_at(i)
        assert co.lvv.item() == pytest.approx(bridge.coefficients(plan.t_eval[i]).lvv.item(), rel=1e-14)


# ----------------------------------------------------------------------------- SDE solvers


def test_seeded_noise_is_the_step_seed_of_each_draw():
    noise = seeded_noise(11)
    m = torch.zeros(2, 4)
    assert noise(m, 3, "exact", 0.1, 0.2) == (step_seed(11, 3), None)
    seeds = {noise(m, k, "em", 0.0, 0.1)[0] for k in range(50)} | {seeded_noise(12)(m, 0, "em", 0.0, 0.1)[0]}
    assert len(seeds) == 51 and noise(m, 3, "em", 0.5, 0.1) == noise(m, 3, "exact", 0.1, 0.2)


@pytest.mark.parametrize(("solver", "kind"), [("sde", "exact"), ("em", "em")])
def test_sde_steps_are_sde_step_with_the_step_seed(solver, kind):
    bridge, plan = _plan("SDE", solver)
    m, F = _state(3)
    expected = m.clone()
    step = solver_step(plan, solver, "cpu", seeded_noise(5))
    for i in range(plan.n_steps):
        step(i, m, F[i])
        sde_step(kind, expected, F[i], bridge, plan.t_step[i], plan.h[i], seed=step_seed(5, i), backend="cpu")
        torch.testing.assert_close(m, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver", ["sde", "em", "sscs"])
def test_sde_solvers_are_deterministic_per_seed(solver):
    _, plan = _plan("SDE", solver)

    def run(seed):
        m, F = _state(4)
        noise = seeded_noise(seed)
        first_half = sscs_first_half(plan, "cpu", noise) if solver == "sscs" else None
        step = solver_step(plan, solver, "cpu", noise)
        for i in range(plan.n_steps):
            if first_half is not None:
                first_half(i, m)
            step(i, m, F[i])
        return m

    a, b, c = run(8), run(8), run(9)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert (a - c).abs().max() > 1e-3  # other noise


def test_noise_free_exact_step_is_the_order0_multistep_step():
    """With xi = 0 the exact SDE step is m <- Phi(h) m + (cx, cv) F: the order-0 exponential update."""
    bridge, plan = _plan("SDE", "sde")
    m, F = _state(6)
    expected = m.clone()
    co = multistep_coefficients(bridge, GRID, 0)

    def zero_noise(m, k, kind, t, h):
        x_shape = (m.shape[0], m.shape[1] // 2, *m.shape[2:])
        return 0, (torch.zeros(x_shape), torch.zeros(x_shape))

    step = solver_step(plan, "sde", "cpu", zero_noise)
    for i in range(plan.n_steps):
        step(i, m, F[i])
        cx, cv = co.Cx[i, 0].item(), co.Cv[i, 0].item()
        phase_step(expected, [F[i]], co.h[i].item(), [cx], [cv], backend="cpu")
        torch.testing.assert_close(m, expected, rtol=1e-5, atol=1e-5)


def test_sscs_is_half_step_then_velocity_update_then_half_step():
    bridge, plan = _plan("SDE", "sscs")
    m, F = _state(7)
    expected = m.clone()
    noise = seeded_noise(13)
    first_half = sscs_first_half(plan, "cpu", noise)
    step = solver_step(plan, "sscs", "cpu", noise)
    for i in range(plan.n_steps):
        t, h = plan.t_step[i], plan.h[i]
        mid = t + 0.5 * h
        assert plan.t_eval[i] == pytest.approx(mid, rel=1e-14)
        first_half(i, m)
        step(i, m, F[i])
        sde_step("sscs_half", expected, None, bridge, t, 0.5 * h, seed=step_seed(13, 2 * i), backend="cpu")
        N = bridge.coefficients(mid).normalizer.item()
        phase_step(expected, [F[i]], 0.0, [0.0], [h * N], backend="cpu")
        second_seed = step_seed(13, 2 * i + 1)
        sde_step("sscs_half", expected, None, bridge, mid, 0.5 * h, seed=second_seed, backend="cpu")
        torch.testing.assert_close(m, expected, rtol=1e-5, atol=1e-5)
    before = m.clone()
    first_half(plan.n_steps, m)  # the hop's evaluation at T: no half step
    assert torch.equal(m, before)
