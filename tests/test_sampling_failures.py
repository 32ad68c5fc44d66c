"""Failure behaviour of the sampling API: aliased inputs, argument bounds and types, and
non-finite values (regression tests; psb_fast.ops, sampler, bridge, guidance).

Triton runs under the interpreter on CPU tensors (tests/conftest.py).
"""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch

from psb_fast import PhaseBridge, PhaseSampler, bridge_sample
from psb_fast.backends import all_finite, check_no_internal_overlap, finite_flag, overlaps, unaliased
from psb_fast.bridge import P_RANGE, VAR_RANGE, split_phase
from psb_fast.guidance import StrokeGuide, mix_initial_velocity
from psb_fast.ops.phase_step import phase_hop, phase_step
from psb_fast.ops.sde_step import sde_step
from psb_fast.sampler import MAX_NFE, _raise_first_nonfinite
from psb_fast.settings import published_setting

torch.set_num_threads(1)
BACKENDS = ("cpu", "reference", "triton")


def state(B: int = 3, C: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 2 * C, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- overlap helpers


def test_overlap_helpers():
    m = torch.zeros(3, 4)
    assert overlaps(m[:, :2], m) and overlaps(m[:, :2], m[:, 2:])  # interleaved rows: conservative
    assert not overlaps(m[:1], m[1:]) and not overlaps(m, torch.zeros(3, 4)) and not overlaps(m[:0], m)
    F = m[:, :2]
    assert unaliased(F, m) is not F and torch.equal(unaliased(F, m), F)
    other = torch.ones(3, 2)
    assert unaliased(other, m) is other
    check_no_internal_overlap("m", m.t())
    with pytest.raises(ValueError, match=r"m must not have overlapping elements.*strides \(0, 1\)"):
        check_no_internal_overlap("m", torch.zeros(4).expand(3, 4))


def test_finiteness_helpers():
    big = torch.full((1000,), 3e38)  # finite, but its float32 sum overflows
    assert all_finite(big) and bool(finite_flag(big))
    half = torch.full((100_000,), 1.0, dtype=torch.float16)  # fp16 sum overflows, values finite
    assert all_finite(half)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(50)
        t[17] = bad
        assert not all_finite(t) and not bool(finite_flag(t))


# ----------------------------------------------------------------------------- aliased inputs


def _views(m: torch.Tensor, C: int) -> dict[str, list[torch.Tensor]]:
    """F histories that share memory with m: x, v, [v, x], and a window shifted by one element."""
    flat = m.view(-1)
    shifted = flat[1 : 1 + m.shape[0] * C].view(m.shape[0], C)
    return {"x": [m[:, :C]], "v": [m[:, C:]], "v,x": [m[:, C:], m[:, :C]], "shifted": [shifted]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["x", "v", "v,x", "shifted"])
def test_phase_step_with_views_of_m_equals_copies(backend, case):
    m = state()
    aliased, copied = m.clone(), m.clone()
    F_alias = _views(aliased, 3)[case]
    F_copy = [F.clone() for F in _views(copied, 3)[case]]
    coeffs = [0.5, -0.2][: len(F_alias)]
    phase_step(aliased, F_alias, 0.1, coeffs, coeffs, backend=backend)
    phase_step(copied, F_copy, 0.1, coeffs, coeffs, backend=backend)
    assert torch.equal(aliased, copied)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["exact", "em", "sscs_half"])
def test_sde_step_with_views_of_m_equals_copies(backend, kind):
    bridge = PhaseBridge(mode="SDE")
    m = state()
    aliased, copied = m.clone(), m.clone()

    def args(mm, copy):
        x, v = split_phase(mm)
        own = (lambda t: t.clone()) if copy else (lambda t: t)
        return (None if kind == "sscs_half" else own(v)), (own(x), own(v))

    F, xi = args(aliased, copy=False)
    sde_step(kind, aliased, F, bridge, 0.3, 0.05, xi=xi, backend=backend)
    F, xi = args(copied, copy=True)
    sde_step(kind, copied, F, bridge, 0.3, 0.05, xi=xi, backend=backend)
    assert torch.equal(aliased, copied)


@pytest.mark.parametrize("backend", BACKENDS)
def test_phase_hop_with_view_of_m(backend):
    bridge, m = PhaseBridge(), state()
    before = m.clone()
    got = phase_hop(bridge, m, m[:, 3:], 0.7, backend=backend)
    assert torch.equal(m, before)
    assert torch.equal(got, phase_hop(bridge, m, m[:, 3:].clone(), 0.7, backend=backend))


@pytest.mark.parametrize(("backend", "order"), [("cpu", 0), ("cpu", 2), ("reference", 2), ("triton", 3)])
def test_sampler_model_returning_a_view_of_m(backend, order):
    """The issue's case: F = m[:, :2] differed from F = m[:, :2].clone() by up to 26.9."""
    bridge = PhaseBridge()
    m0 = bridge.sample_prior((16, 2), generator=torch.Generator().manual_seed(0))
    s = PhaseSampler(bridge, 8, T=0.9, order=order, grid="uniform", backend=backend)
    got = s.sample(lambda m, t: m[:, :2], m0)
    want = s.sample(lambda m, t: m[:, :2].clone(), m0)
    assert torch.equal(got, want)


def test_sampler_rejects_a_model_that_overwrites_its_previous_output():
    bridge = PhaseBridge()
    m0 = bridge.sample_prior((8, 2), generator=torch.Generator().manual_seed(0))
    buffer = torch.empty(8, 2)

    def reusing(m, t):
        return buffer.copy_(0.5 * m[:, 2:] - m[:, :2])

    # The F-form multistep keeps the model's earlier outputs themselves (the data form keeps the
    # x1 estimates it computes from them, which a reused buffer cannot change).
    published = published_setting(6)
    with pytest.raises(ValueError, match=r"model output of step 0 was overwritten.*step 1.*F\.clone"):
        PhaseSampler(bridge, 6, published, backend="cpu").sample(reusing, m0)
    # Order 0 keeps no earlier output, and a constant (never rewritten) output is fine.
    PhaseSampler(bridge, 6, published.replace(order=0), backend="cpu").sample(reusing, m0)
    const = torch.full((8, 2), 0.25)
    s = PhaseSampler(bridge, 6, published, backend="cpu")
    assert torch.equal(s.sample(lambda m, t: const, m0), s.sample(lambda m, t: const.clone(), m0))


def test_mix_initial_velocity_with_a_stroke_that_is_a_view_of_m():
    m = state()
    aliased, copied = m.clone(), m.clone()
    mix_initial_velocity(aliased, split_phase(aliased)[1], 0.3)
    mix_initial_velocity(copied, split_phase(copied)[1].clone(), 0.3)
    assert torch.equal(aliased, copied)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bridge_sample_with_overlapping_and_expanded_inputs(backend):
    bridge = PhaseBridge()
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    x1 = base[:, :3]
    eps = (base[:, 1:4], base[:, 3:])  # overlap x1 and each other
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    got = bridge_sample(bridge, x1, t, backend=backend, eps=eps)
    want = bridge_sample(bridge, x1.clone(), t, backend=backend, eps=tuple(e.clone() for e in eps))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    row = torch.randn(1, 3).expand(4, 3)  # stride 0
    got = bridge_sample(bridge, row, t, seed=5, backend=backend)
    want = bridge_sample(bridge, row.contiguous(), t, seed=5, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_ops_reject_an_expanded_state(backend):
    m = torch.zeros(1, 4).expand(3, 4)
    with pytest.raises(ValueError, match="m must not have overlapping elements"):
        phase_step(m, [torch.zeros(3, 2)], 0.1, [0.1], [0.1], backend=backend)
    with pytest.raises(ValueError, match="m must not have overlapping elements"):
        sde_step("sscs_half", m, None, PhaseBridge(mode="SDE"), 0.2, 0.1, seed=0, backend=backend)


# ----------------------------------------------------------------------------- bounds and types


def test_nfe_upper_bound_is_refused_at_once():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"nfe must be an int in \[1, 10000\], got 1000000000"):
        PhaseSampler(PhaseBridge(), 10**9)
    assert time.perf_counter() - start < 0.5
    with pytest.raises(ValueError, match="nfe"):
        PhaseSampler(PhaseBridge(), MAX_NFE + 1)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"p": 1e77}, "p"),
        ({"p": 1e300}, "p"),
        ({"p": P_RANGE[1] * 1.01}, "p"),
        ({"p": P_RANGE[0] / 1.01}, "p"),
        ({"varx": VAR_RANGE[1] * 10}, "varx"),
        ({"varx": 5e-324}, "varx"),
        ({"varv": 1e200}, "varv"),
        ({"varv": VAR_RANGE[0] / 10}, "varv"),
    ],
)
def test_bridge_rejects_extreme_parameters(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be in \["):
        PhaseBridge(**kwargs)


def test_bridge_parameter_box_corners_are_finite():
    t = torch.tensor([0.0, 1e-9, 0.3, 0.5, 0.9, 0.999, 1 - 1e-7, 1 - 2.0**-53], dtype=torch.float64)
    corners = itertools.product(P_RANGE, VAR_RANGE, VAR_RANGE, (-(1 - 2.0**-53), 0.0, 1 - 2.0**-53))
    for p, varx, varv, k in corners:
        for mode in ("probODE", "SDE"):
            co = PhaseBridge(p=p, k=k, varx=varx, varv=varv, mode=mode).coefficients(t)
            for field in ("lxx", "lvv", "ell", "AA", "normalizer", "label_x1", "hop_aa", "hop_den"):
                value = getattr(co, field)
                assert bool(torch.isfinite(value).all()), (p, varx, varv, k, mode, field)
            assert bool((co.lvv > 0).all())


def test_bridge_accepts_one_element_tensors():
    b = PhaseBridge(p=torch.tensor(2.0), k=torch.tensor([-0.5]), varx=torch.tensor(1.5, dtype=torch.float64))
    assert b.key() == (2.0, -0.5, 1.5, 1.0, "probODE")
    with pytest.raises(TypeError, match="k must be a real number or a one-element real tensor"):
        PhaseBridge(k=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("hop", ["no", 1, None, torch.tensor(True)])
def test_hop_must_be_a_bool(hop):
    with pytest.raises(TypeError, match=rf"hop must be a bool, got {hop!r}"[:24]):
        PhaseSampler(PhaseBridge(), 5, hop=hop)


def test_T_and_t0_accept_one_element_tensors():
    want = PhaseSampler(PhaseBridge(), 5, T=0.5, t0=0.0)
    got = PhaseSampler(PhaseBridge(), 5, T=torch.tensor(0.5, dtype=torch.float64), t0=torch.tensor([0]))
    assert (got.T, got.t0) == (want.T, want.t0) and torch.equal(got.grid, want.grid)
    with pytest.raises(TypeError, match=r"T must be a real number or a one-element real tensor.*\(2,\)"):
        PhaseSampler(PhaseBridge(), 5, T=torch.tensor([0.5, 0.6]))
    with pytest.raises(TypeError, match="t0 must be a real number, got str"):
        PhaseSampler(PhaseBridge(), 5, t0="0")
    with pytest.raises(ValueError, match="T must be in"):
        PhaseSampler(PhaseBridge(), 5, T=torch.tensor(1.5))


def test_sample_checks_its_arguments_before_the_first_model_call():
    bridge = PhaseBridge()
    m0 = bridge.sample_prior((4, 2), generator=torch.Generator().manual_seed(0))
    calls = []

    def model(m, t):
        calls.append(t)
        return torch.zeros(4, 2)

    s = PhaseSampler(bridge, 3, backend="cpu")
    with pytest.raises(TypeError, match="callback must be callable or None, got 3"):
        s.sample(model, m0, callback=3)
    with pytest.raises(TypeError, match="model must be callable, got str"):
        s.sample("model", m0)
    with pytest.raises(TypeError, match="return_trajectory must be a bool"):
        s.sample(model, m0, return_trajectory="yes")
    with pytest.raises(TypeError, match="progress must be a bool"):
        s.sample(model, m0, progress=None)
    assert calls == []


# ----------------------------------------------------------------------------- non-finite values


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_overflow_is_reported_with_its_step(backend):
    """F = 3e38 is finite in float32 but the update overflows the state: ValueError, not inf."""
    bridge = PhaseBridge()
    m0 = bridge.sample_prior((4, 2), generator=torch.Generator().manual_seed(0))
    s = PhaseSampler(bridge, 5, backend=backend)
    with pytest.raises(ValueError, match=r"state after the update at step \d \(t=.*\) contains NaN or Inf"):
        s.sample(lambda m, t: torch.full((4, 2), 3e38), m0)


@pytest.mark.parametrize(
    ("solver", "hop", "bad_step"),
    [("ode", True, 2), ("ode", True, 4), ("ode", False, 4), ("em", True, 1), ("sscs", False, 2)],
)
@pytest.mark.parametrize("with_callback", [False, True])
def test_nonfinite_model_output_is_named_with_its_step(solver, hop, bad_step, with_callback):
    """A NaN model output is reported as the model's, at its step, whether its check runs at once
    (a hook reads F) or is left to the state check after the step (the loop's fast path), and no
    hook sees it."""
    bridge = PhaseBridge(mode="probODE" if solver == "ode" else "SDE")
    m0 = bridge.sample_prior((4, 2), generator=torch.Generator().manual_seed(0))
    calls, seen = [], []

    def model(m, t):
        calls.append(float(t[0]))
        F = torch.zeros(4, 2)
        return F * math.nan if len(calls) == bad_step + 1 else F

    s = PhaseSampler(bridge, 5, T=0.9, hop=hop, solver=solver, backend="cpu")
    callback = (lambda info: seen.append(info["i"])) if with_callback else None
    with pytest.raises(ValueError, match=rf"model output at step {bad_step} \(t=.*\) contains NaN or Inf"):
        s.sample(model, m0, seed=0, callback=callback)
    assert len(calls) == bad_step + 1
    assert seen == (list(range(bad_step)) if with_callback else [])


def test_output_cast_overflow_is_reported():
    bridge = PhaseBridge()
    m0 = bridge.sample_prior((4, 2), generator=torch.Generator().manual_seed(0)).half()
    s = PhaseSampler(bridge, 5, backend="cpu")
    with pytest.raises(ValueError, match=r"the sample \(x1 at step 4, t=.*\) contains NaN or Inf"):
        s.sample(lambda m, t: torch.full((4, 2), 3e4, dtype=torch.float16), m0)


def test_nonfinite_m0_is_reported():
    m0 = torch.zeros(2, 4)
    m0[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"m0 .*NaN or Inf \(first: nan at index \(1, 3\)\)"):
        PhaseSampler(PhaseBridge(), 3, backend="cpu").sample(lambda m, t: torch.zeros(2, 2), m0)


def test_deferred_flags_report_the_first_failure_of_any_kind():
    ok, bad = torch.tensor(True), torch.tensor(False)
    flags = [(0, 0.1, ok, "model"), (0, 0.1, bad, "state"), (1, 0.3, bad, "model"), (4, 0.7, bad, "x1")]
    with pytest.raises(ValueError, match=r"state after the update at step 0 \(t=0.1\)"):
        _raise_first_nonfinite(flags)
    with pytest.raises(ValueError, match=r"the sample \(x1 at step 4, t=0.7\)"):
        _raise_first_nonfinite([flags[0], flags[3]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("where", "value"), [("x1", math.nan), ("x1", math.inf), ("eps_v", -math.inf)])
def test_bridge_sample_rejects_nonfinite_inputs_on_cpu(backend, where, value):
    x1 = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    eps = (torch.zeros(3, 2, 4), torch.zeros(3, 2, 4))
    target = x1 if where == "x1" else eps[1]
    target[2, 1, 3] = value
    with pytest.raises(ValueError, match=rf"{where} must be finite, got {value} at index \(2, 1, 3\)"):
        bridge_sample(PhaseBridge(), x1, torch.rand(3), backend=backend, eps=eps)


def test_guide_scalars_accept_one_element_tensors():
    guide = StrokeGuide(torch.zeros(2), strength=torch.tensor(0.5), init_weight=torch.tensor([0.25]))
    assert (guide.strength, guide.init_weight) == (0.5, 0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_sde_step_below_float64_resolution(backend):
    """t + h == t in float64 (no quadrature grid): the drift integrals take N as constant."""
    m = state()
    before = m.clone()
    F = torch.randn(3, 3)
    sde_step("exact", m, F, PhaseBridge(mode="SDE"), 0.5, 1e-300, seed=0, backend=backend)
    assert torch.equal(m, before)
