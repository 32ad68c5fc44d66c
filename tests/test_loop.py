"""psb_fast.loop: the sampling loop `integrate` (order of evaluations, correctors, hooks and steps),
the checked model call `ModelCall`, the per-row multistep update and hop used by tuning, and the
finiteness checks (`check_finite`, `raise_first_nonfinite`)."""

import pytest
import torch

from psb_fast import PhaseBridge, phase_step
from psb_fast.bridge import split_phase
from psb_fast.loop import (
    Hooks,
    ModelCall,
    affine_rows,
    check_finite,
    hop_rows,
    integrate,
    raise_first_nonfinite,
)

torch.set_num_threads(1)


def _recording_loop(nfe: int, n_steps: int, with_corrector: bool):
    """integrate on a [1, 2] state whose pieces log (what, i) and leave marks on m."""
    log = []

    def evaluate(i, m):
        log.append(("eval", i, m[0, 0].item()))
        return torch.full((1, 1), float(i))

    def step(i, m, F):
        log.append(("step", i, F.item()))
        m[0, 0] += 1.0  # x counts the steps

    def correct(i, m, F, apply=True):
        log.append(("correct", i, F.item()) if apply else ("kept", i, F.item()))

    hooks = Hooks(
        before_eval=[lambda i, m: log.append(("before", i))],
        after_eval=[lambda i, m, F: log.append(("after_eval", i, F.item()))],
        after_step=[lambda i, m: log.append(("after_step", i, m[0, 0].item()))],
    )
    m = torch.zeros(1, 2)
    F = integrate(m, evaluate=evaluate, step=step, nfe=nfe, n_steps=n_steps, hooks=hooks,
                  correct=correct if with_corrector else None)
    return m, F, log


@pytest.mark.parametrize("with_corrector", [False, True])
def test_integrate_with_the_hop_stops_after_the_last_evaluation(with_corrector):
    m, F, log = _recording_loop(nfe=3, n_steps=2, with_corrector=with_corrector)
    expected = []
    for i in range(3):
        expected += [("before", i), ("eval", i, float(i))]
        expected += [("correct", i, float(i))] if with_corrector else []
        expected += [("after_eval", i, float(i))]
        if i < 2:
            expected += [("step", i, float(i)), ("after_step", i, float(i + 1))]
    assert log == expected
    assert F.item() == 2.0 and m[0, 0].item() == 2.0  # the last output is returned; 2 steps taken


def test_integrate_without_the_hop_steps_after_every_evaluation():
    m, F, log = _recording_loop(nfe=3, n_steps=3, with_corrector=False)
    assert [entry[:2] for entry in log if entry[0] == "step"] == [("step", 0), ("step", 1), ("step", 2)]
    assert log[-1] == ("after_step", 2, 3.0) and m[0, 0].item() == 3.0 and F.item() == 2.0


def test_hooks_run_in_list_order_and_may_change_the_state():
    seen = []

    def evaluate(i, m):
        seen.append(m.clone())
        return torch.zeros(1, 1)

    hooks = Hooks(before_eval=[lambda i, m: m.mul_(2.0), lambda i, m: m.add_(1.0)])
    m = torch.ones(1, 2)
    integrate(m, evaluate=evaluate, step=lambda i, m, F: None, nfe=2, n_steps=1, hooks=hooks)
    # (1 * 2 + 1) = 3 before the first evaluation, (3 * 2 + 1) = 7 before the second
    assert [s[0, 0].item() for s in seen] == [3.0, 7.0] and m[0, 0].item() == 7.0


def test_integrate_matches_the_multistep_recursion_by_hand():
    """An ODE run with integrate + phase_step equals the update written out in float64."""
    torch.manual_seed(0)
    m0 = torch.randn(3, 4, dtype=torch.float32)
    h, Cx, Cv = [0.1, 0.2, 0.3], [[0.01], [0.02, -0.01], [0.03, -0.02]], [[0.5], [0.4, 0.1], [0.3, 0.2]]
    W = torch.randn(2, 4)

    def model(m):  # a fixed linear model of the state
        return m @ W.t()

    outputs = []

    def evaluate(i, m):
        outputs.insert(0, model(m))
        return outputs[0]

    def step(i, m, F):
        phase_step(m, outputs[: len(Cx[i])], h[i], Cx[i], Cv[i], backend="cpu")

    m = m0.clone()
    integrate(m, evaluate=evaluate, step=step, nfe=3, n_steps=3, hooks=Hooks())
    x, v = (t.double() for t in split_phase(m0.clone()))
    history = []
    for i in range(3):
        history.insert(0, torch.cat([x, v], 1) @ W.double().t())
        x, v = x + h[i] * v, v.clone()
        for cx, cv, F in zip(Cx[i], Cv[i], history, strict=False):
            x, v = x + cx * F, v + cv * F
    torch.testing.assert_close(m.double(), torch.cat([x, v], 1), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- ModelCall


def _times(nfe, batch=2, dtype=torch.float32):
    return [torch.full((batch,), 0.1 * (i + 1), dtype=dtype) for i in range(nfe)]


def test_model_call_passes_the_time_and_condition_and_casts_the_output():
    m = torch.zeros(2, 6)
    calls = []

    def model(m_in, t, cond):
        calls.append((m_in.dtype, t.clone(), cond))
        return torch.ones(2, 3, dtype=torch.float64)

    call = ModelCall(model, "label", _times(2, dtype=torch.float64), torch.float64, m)
    F = call(1, m)
    assert F.dtype == torch.float32 and torch.equal(F, torch.ones(2, 3)) and call.last is F
    (dtype, t, cond), = calls
    assert dtype == torch.float64 and torch.allclose(t, torch.full((2,), 0.2, dtype=torch.float64))
    assert cond == "label"


def test_model_call_copies_an_output_that_is_a_view_of_the_state():
    m = torch.arange(12.0).view(2, 6)
    call = ModelCall(lambda m_in, t: m_in[:, 3:], None, _times(1), torch.float32, m)
    F = call(0, m)
    assert torch.equal(F, m[:, 3:]) and F.data_ptr() != m[:, 3:].data_ptr()
    m.zero_()  # the next in-place step must not change F
    assert F.sum().item() == sum(range(3, 6)) + sum(range(9, 12))


@pytest.mark.parametrize(
    ("output", "message"),
    [(torch.zeros(2, 4), r"model output at step 1 \(t=0.25\) must have shape \(2, 3\), got \(2, 4\)"),
     ("F", r"model output at step 1 \(t=0.25\) must have shape \(2, 3\), got str"),
     (torch.zeros(2, 3, device="meta"), r"model output at step 1 \(t=0.25\) must be on cpu, got meta")],
)
def test_model_call_names_the_step_of_a_wrong_output(output, message):
    m = torch.zeros(2, 6)
    call = ModelCall(lambda m_in, t: output, None, _times(2), torch.float32, m, t_values=[0.125, 0.25])
    with pytest.raises(ValueError, match=message):
        call(1, m)


def test_model_call_checks_finiteness_from_check_from_on():
    m = torch.zeros(2, 6)
    bad = torch.full((2, 3), float("nan"))
    call = ModelCall(lambda m_in, t: bad, None, _times(3), torch.float32, m, finite=[],
                     t_values=[0.1, 0.2, 0.3], check_from=1)
    assert torch.isnan(call(0, m)).all()  # left to the state check after step 0
    with pytest.raises(ValueError, match=r"model output at step 1 \(t=0.2\) contains NaN or Inf"):
        call(1, m)


# ----------------------------------------------------------------------------- per-row update and hop


@pytest.mark.parametrize("form", ["F", "transition", "none"])
def test_affine_rows_equals_phase_step_row_by_row(form):
    """Per-row coefficients ([B, 1, ...] tensors) give each row the update `phase_step` gives it alone:
    phi = h (the F form), a transition (p_xx, p_xv, p_vx, p_vv), or 0.0 (sources only)."""
    g = torch.Generator().manual_seed(1)
    m = torch.randn(3, 4, 5, dtype=torch.float64, generator=g)
    sources = [torch.randn(3, 2, 5, dtype=torch.float64, generator=g) for _ in range(2)]
    h = torch.tensor([0.1, 0.2, 0.05], dtype=torch.float64)
    P = torch.tensor([[0.9, 0.1, -0.2, 1.1], [1.0, 0.3, 0.0, 0.8], [1.2, -0.1, 0.4, 0.7]],
                     dtype=torch.float64)  # rows (p_xx, p_xv, p_vx, p_vv)
    Cx = torch.randn(2, 3, dtype=torch.float64, generator=g) * 0.1
    Cv = torch.randn(2, 3, dtype=torch.float64, generator=g)
    col = (-1, 1, 1)
    phi = {"F": h.view(col), "transition": tuple(p.view(col) for p in P.t()), "none": 0.0}[form]
    out = affine_rows(m.clone(), sources, phi, [c.view(col) for c in Cx], [c.view(col) for c in Cv])
    for b in range(3):
        row_phi = {"F": h[b].item(), "transition": P[b].tolist(), "none": 0.0}[form]
        row = [S[b : b + 1].float() for S in sources]
        expected = phase_step(m[b : b + 1].float().clone(), row, row_phi, Cx[:, b].tolist(),
                              Cv[:, b].tolist(), backend="cpu")
        torch.testing.assert_close(out[b : b + 1].float(), expected, rtol=1e-5, atol=1e-5)


def test_hop_rows_equals_each_rows_bridge_hop():
    torch.manual_seed(2)
    bridge = PhaseBridge()
    T = [0.5, 0.9, 0.99]
    m = torch.randn(3, 4, dtype=torch.float64)
    F = torch.randn(3, 2, dtype=torch.float64)
    weights = torch.tensor([bridge.hop_weights(t) for t in T], dtype=torch.float64)  # [3, (a_F, a_x, a_v)]
    x1 = hop_rows(m, F, tuple(w.view(-1, 1) for w in weights.t()))
    expected = bridge.estimate_x1(m, F, torch.tensor(T, dtype=torch.float64))
    torch.testing.assert_close(x1, expected, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- finiteness checks


def test_check_finite_on_cpu_raises_the_message_of_its_kind():
    finite = []
    check_finite(torch.ones(2, 3), finite, 0, 0.1, "state")
    assert finite == []  # CPU: decided at once, nothing deferred
    bad = torch.ones(2, 3)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"sampler state after the update at step 4 \(t=0.5\) contains NaN"):
        check_finite(bad, finite, 4, 0.5, "state")
    first = r"m0 \(the initial state\) contains NaN or Inf \(first: inf at index \(1, 2\)\)"
    with pytest.raises(ValueError, match=first):
        check_finite(bad, finite, 0, 0.0, "m0")
    with pytest.raises(ValueError, match=r"the sample \(x1 at step 9, t=0.99\)"):
        check_finite(bad, finite, 9, 0.99, "x1")
    check_finite(torch.zeros(0, 3), finite, 0, 0.0, "state")  # empty: nothing to check


def test_raise_first_nonfinite_reports_the_earliest_false_flag():
    ok, bad = torch.tensor(True), torch.tensor(False)
    raise_first_nonfinite([])
    raise_first_nonfinite([(0, 0.1, ok, "m0"), (1, 0.2, ok)])
    flags = [(0, 0.1, ok, "m0"), (1, 0.2, ok), (2, 0.3, bad, "state"), (3, 0.4, bad)]
    with pytest.raises(ValueError, match=r"sampler state after the update at step 2 \(t=0.3\)"):
        raise_first_nonfinite(flags)
    with pytest.raises(ValueError, match=r"model output at step 3 \(t=0.4\) contains NaN or Inf"):
        raise_first_nonfinite(flags[:2] + flags[3:])  # an entry without a kind is a model output


def test_a_before_eval_hook_that_replaces_the_state_skips_that_steps_correction():
    """A hook returning True (a guidance redraw) replaced part of m_i: the corrector keeps F_i as
    history but does not redo step i - 1; hooks returning anything else (None, a tensor) do not."""
    seen = []
    hooks = Hooks(before_eval=[lambda i, m: i == 1, lambda i, m: m.mul_(1.0)])
    integrate(torch.zeros(1, 2), evaluate=lambda i, m: torch.zeros(1, 1), step=lambda i, m, F: None,
              nfe=3, n_steps=2, hooks=hooks, correct=lambda i, m, F, apply: seen.append((i, apply)))
    assert seen == [(0, True), (1, False), (2, True)]
