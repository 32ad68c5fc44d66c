"""Distribution metrics (psb_fast.metrics) against closed forms, POT, and bad input."""

import math

import pytest
import torch

from psb_fast.metrics import (
    distribution_quality,
    energy_distance,
    held_out_halves,
    median_bandwidth,
    mmd,
    projections,
    sliced_w2,
    wasserstein_1d_squared,
)

torch.set_num_threads(1)


def test_1d_w2_of_step_quantile_functions_is_exact():
    # Q_a = 0 on (0, 1/2), 1 on (1/2, 1); Q_b = 0, 0.5, 1 on thirds: (1/2)^2 on (1/3, 2/3) -> 1/12
    a, b = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.5], [1.0], [0.0]])
    assert float(wasserstein_1d_squared(a, b)[0]) == pytest.approx(1 / 12, rel=1e-14)
    assert sliced_w2(a, b) == pytest.approx(math.sqrt(1 / 12), rel=1e-14)  # 1-D: every direction is +-1


def test_1d_w2_between_gaussian_quantiles_matches_the_closed_form():
    # W2^2(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2; midpoint quantiles of each law
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    z = normal.icdf((torch.arange(20000, dtype=torch.float64) + 0.5) / 20000)
    a, b = (0.3 + 1.0 * z)[:, None], (-0.5 + 1.7 * z)[:, None]
    assert float(wasserstein_1d_squared(a, b)[0]) == pytest.approx(0.8 ** 2 + 0.7 ** 2, rel=1e-3)


@pytest.mark.slow
def test_sliced_w2_of_a_shift_is_the_rms_projected_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 3, generator=g, dtype=torch.float64)
    shift = torch.tensor([0.3, -1.2, 0.5], dtype=torch.float64)
    theta = projections(3)
    assert sliced_w2(a, a + shift) == pytest.approx(float((shift @ theta).pow(2).mean().sqrt()), rel=1e-10)
    # and over many directions, E (theta . c)^2 = |c|^2 / D
    many = sliced_w2(a, a + shift, n_projections=20000)
    assert many == pytest.approx(float(shift.norm()) / math.sqrt(3), rel=0.02)
    assert sliced_w2(a, a) == 0.0


def test_sliced_w2_equals_pot():
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 4, generator=g), 1.3 * torch.randn(457, 4, generator=g) + 0.2
    want = ot.sliced_wasserstein_distance(a.double().numpy(), b.double().numpy(), n_projections=200, seed=0)
    assert sliced_w2(a, b) == pytest.approx(float(want), rel=1e-10)


def test_mmd_is_zero_for_identical_sets_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(400, 2, generator=g, dtype=torch.float64)
    assert mmd(a, a) == 0.0 and mmd(a, a.clone(), bandwidth=0.5) == 0.0
    values = [mmd(a, a + torch.tensor([s, 0.0], dtype=torch.float64), bandwidth=1.0) for s in (0.1, 0.5, 2.0)]
    assert 0 < values[0] < values[1] < values[2]


def test_mmd_of_two_points_and_of_two_gaussians_matches_the_closed_form():
    x = torch.zeros(1, 2, dtype=torch.float64)
    y = torch.tensor([[0.6, 0.8]], dtype=torch.float64)  # |x - y| = 1
    assert mmd(x, y, bandwidth=0.5) == pytest.approx(math.sqrt(2 - 2 * math.exp(-1 / (2 * 0.25))), rel=1e-12)
    # N(0, s^2 I) vs N(mu, s^2 I) in D dims, kernel width h:
    # MMD^2 = 2 (h^2 / (h^2 + 2 s^2))^(D/2) (1 - exp(-|mu|^2 / (2 (h^2 + 2 s^2))))
    g = torch.Generator().manual_seed(3)
    n, s, h, mu = 3000, 1.0, 1.0, torch.tensor([1.0, 0.5], dtype=torch.float64)
    a = s * torch.randn(n, 2, generator=g, dtype=torch.float64)
    b = s * torch.randn(n, 2, generator=g, dtype=torch.float64) + mu
    c = h * h + 2 * s * s
    want = 2 * (h * h / c) * (1 - math.exp(-float(mu @ mu) / (2 * c)))
    # the biased estimate adds about 2 (1 - E k(A, A')) / n
    assert mmd(a, b, bandwidth=h) ** 2 == pytest.approx(want, abs=0.01)


def test_median_bandwidth_and_energy_distance():
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # distances 3, 4, 5
    assert median_bandwidth(points) == pytest.approx(4.0)
    assert energy_distance(points[:1], points[1:2]) == pytest.approx(6.0)  # 2 |x - y|
    quality = distribution_quality(points, points)
    assert quality == {"sw2": 0.0, "mmd": 0.0, "energy": 0.0}


def test_held_out_halves_are_disjoint_test_points_or_none():
    a, b = held_out_halves("gmm-grid", 50)
    assert a.shape == b.shape == (50, 2) and not torch.equal(a, b)
    again = held_out_halves("gmm-grid", 50)
    assert torch.equal(again[0], a)
    d1, d2 = held_out_halves("digits", 10_000)  # the test split's halves, at most n each
    assert d1.shape[1:] == (1, 8, 8) and d1.shape == d2.shape and d1.shape[0] >= 100
    assert held_out_halves("tensor:whatever.npy", 10) is None


@pytest.mark.parametrize("call, match", [
    (lambda: sliced_w2(torch.zeros(3, 2), torch.zeros(3, 3)), "same size"),
    (lambda: sliced_w2([[0.0]], torch.zeros(1, 1)), "a must be a tensor"),
    (lambda: mmd(torch.zeros(0, 2), torch.zeros(3, 2)), "N >= 1"),
    (lambda: mmd(torch.zeros(3, 2), torch.zeros(3, 2), bandwidth=0.0), "bandwidth"),
    (lambda: sliced_w2(torch.zeros(3, 2), torch.full((3, 2), float("nan"))), "non-finite"),
    (lambda: sliced_w2(torch.zeros(3, 2), torch.zeros(3, 2), n_projections=0), "n_projections"),
    (lambda: median_bandwidth(torch.zeros(1, 2)), "at least 2"),
    (lambda: held_out_halves("gmm-grid", 0), "n must be"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
