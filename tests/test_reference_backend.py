"""The production "reference" backend (psb_fast.ops.float64) and the bridge's derived
coefficients against the independent oracle (reference/).

Both sides compute in float64, so results agree to float64 rounding (outputs stored in float32
may then differ by one float32 ulp). phase_step, phase_hop and sde_step on this backend are also
in the per-op tests (tests/test_phase_step.py, tests/test_sde_step.py), next to "cpu" and "triton".
"""

from __future__ import annotations

import pytest
import torch

from psb_fast import PhaseBridge, bridge_sample
from psb_fast.reference.bridge_sample import bridge_sample_reference, bridge_terms, training_loss_reference
from psb_fast.reference.phase_step import hop_reference
from psb_fast.train import training_loss

MODES = ("probODE", "SDE")
PARAMS = [
    {},
    {"p": 0.5, "k": -0.9, "varx": 4.0, "varv": 0.25},
    {"p": 10.0, "k": 0.95, "varx": 0.1, "varv": 3.0},
]
TIMES = torch.tensor([0.0, 1e-3, 0.2, 0.5, 0.8, 0.95, 0.99, 1 - 1e-4, 1 - 1e-6], dtype=torch.float64)


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(shape, generator=g)
    eps = tuple(torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    return x1, eps


@pytest.mark.parametrize("params", PARAMS, ids=["default", "p0.5", "p10"])
@pytest.mark.parametrize("mode", MODES)
def test_bridge_sample_reference_backend_matches_oracle(mode, params):
    bridge = PhaseBridge(**params, mode=mode)
    x1, eps = _inputs((len(TIMES), 3, 7))
    got = bridge_sample(bridge, x1, TIMES, backend="reference", eps=eps)
    want = bridge_sample_reference(bridge, x1, TIMES, *eps)
    for name, a, b in zip(("m_t", "label"), got, want, strict=True):
        assert a.dtype == b.dtype == torch.float32, name
        torch.testing.assert_close(a, b, rtol=2.5e-7, atol=1e-6, msg=name)


@pytest.mark.parametrize("params", PARAMS, ids=["default", "p0.5", "p10"])
@pytest.mark.parametrize("mode", MODES)
def test_derived_coefficients_match_oracle(mode, params):
    """label_* (docs/math.md §5.2) and the folded hop weights (§8) from PhaseBridge equal the
    oracle's own arithmetic on the same primitive coefficients."""
    bridge = PhaseBridge(**params, mode=mode)
    co = bridge.coefficients(TIMES)
    k = bridge_terms(bridge, TIMES)
    for name, want in (
        ("cx", k["cx"]), ("cv", k["cv"]),
        ("label_x1", 4 * k["tau"] ** 2 / k["N"]),
        ("label_eps_x", -k["P"] * k["AA"] / k["N"]),
        ("label_eps_v", k["e_v"] / k["N"]),
    ):
        torch.testing.assert_close(getattr(co, name), want, rtol=1e-12, atol=1e-15, msg=name)
    # The hop is linear in (F, x, v): the oracle's hop of unit inputs gives its weights.
    unit = torch.ones(1, 1, dtype=torch.float64)
    zero = torch.zeros(1, 1, dtype=torch.float64)
    for T in TIMES.tolist():
        want = [
            hop_reference(bridge, zero, zero, unit, T).item(),
            hop_reference(bridge, unit, zero, zero, T).item(),
            hop_reference(bridge, zero, unit, zero, T).item(),
        ]
        got = bridge.hop_weights(T)
        scale = max(abs(w) for w in want)
        for g, w in zip(got, want, strict=True):
            assert abs(g - w) <= 1e-11 * scale, (T, got, want)


@pytest.mark.parametrize("mode", MODES)
def test_estimate_x1_matches_oracle_hop(mode):
    """The reference backend's hop (PhaseBridge.estimate_x1, float64) against the oracle's."""
    bridge = PhaseBridge(mode=mode)
    g = torch.Generator().manual_seed(1)
    B = len(TIMES)
    m = torch.randn(B, 4, 5, generator=g, dtype=torch.float64)
    F = torch.randn(B, 2, 5, generator=g, dtype=torch.float64)
    got = bridge.estimate_x1(m, F, TIMES)
    want = hop_reference(bridge, m[:, :2], m[:, 2:], F, TIMES)
    scale = want.abs().amax(dim=(1, 2), keepdim=True)
    assert bool(((got - want).abs() <= 1e-11 * scale).all())


@pytest.mark.parametrize("weighting", ["reciprocal", "none"])
def test_training_loss_reference_backend_matches_oracle(weighting):
    """training_loss(backend="reference") is the oracle's loss of the same (m_t, label) batch."""
    bridge = PhaseBridge()
    x1, _ = _inputs((64, 2), seed=2)
    t = torch.linspace(0.0, 0.99, 64, dtype=torch.float64)

    def model(m, tt):
        return m[:, :2] * 0.3 - m[:, 2:] * 0.1

    got = training_loss(model, bridge, x1, t, seed=3, weighting=weighting, backend="reference")
    m_t, label = bridge_sample(bridge, x1, t, seed=3, backend="reference")
    want = training_loss_reference(model(m_t, t), label, t, weighting)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
