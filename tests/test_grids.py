"""Sampling time grids (reference/grids.py, docs/math.md §10.1): rev-quad and uniform; the minimum spacing
of production grids (psb_fast.grids)."""

from __future__ import annotations

import math

import pytest
import torch

from psb_fast import grids
from psb_fast.reference.grids import rev_quad_grid, uniform_grid
from psb_fast.settings import Setting

GRIDS = (rev_quad_grid, uniform_grid)


def _documented_rev_quad(n: int, t0: float, T: float) -> list[float]:
    """docs/math.md §10.1, q = 2, in Python floats: t_i = (sqrt(t0) + i/(n-1) (sqrt(T) - sqrt(t0)))^2."""
    a, b = math.sqrt(t0), math.sqrt(T)
    return [(a + i / (n - 1) * (b - a)) ** 2 for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 5, 10, 20, 101])
@pytest.mark.parametrize(("t0", "T"), [(1e-5, 0.999), (1e-5, 0.7), (0.0, 0.4), (0.1, 0.9)])
def test_rev_quad_matches_documented_formula(n, t0, T):
    grid = rev_quad_grid(n, t0, T)
    assert grid.dtype == torch.float64 and grid.shape == (n,)
    # Endpoints exactly, interior to rounding.
    assert grid[0].item() == t0 and grid[-1].item() == T
    want = torch.tensor(_documented_rev_quad(n, t0, T), dtype=torch.float64)
    torch.testing.assert_close(grid, want, rtol=1e-14, atol=1e-16)
    assert bool((grid[1:] > grid[:-1]).all())


def test_rev_quad_default_arguments():
    grid = rev_quad_grid(10)
    assert grid[0].item() == 1e-5 and grid[-1].item() == 0.999
    torch.testing.assert_close(grid, torch.tensor(_documented_rev_quad(10, 1e-5, 0.999), dtype=torch.float64))


def test_rev_quad_steps_grow():
    """q = 2 puts small steps at the start: the steps increase (sqrt-spacing is uniform)."""
    grid = rev_quad_grid(20, 1e-5, 0.999)
    h = grid.diff()
    assert bool((h[1:] > h[:-1]).all())
    step = (math.sqrt(0.999) - math.sqrt(1e-5)) / 19
    torch.testing.assert_close(grid.sqrt().diff(), torch.full((19,), step, dtype=torch.float64),
                               rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("q", [0.5, 1.0, 3.0])
def test_rev_quad_other_orders(q):
    n, t0, T = 7, 0.01, 0.95
    grid = rev_quad_grid(n, t0, T, q=q)
    a, b = t0 ** (1 / q), T ** (1 / q)
    want = torch.tensor([(a + i / (n - 1) * (b - a)) ** q for i in range(n)], dtype=torch.float64)
    torch.testing.assert_close(grid, want, rtol=1e-14, atol=0.0)
    assert grid[0].item() == t0 and grid[-1].item() == T
    assert bool((grid.diff() > 0).all())
    if q == 1.0:
        torch.testing.assert_close(grid, uniform_grid(n, t0, T), rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("n", [2, 5, 11])
def test_uniform(n):
    grid = uniform_grid(n, 0.02, 0.9)
    assert grid.dtype == torch.float64 and grid.shape == (n,)
    assert grid[0].item() == 0.02 and grid[-1].item() == pytest.approx(0.9, abs=1e-15)
    want = torch.tensor([0.02 + i * (0.9 - 0.02) / (n - 1) for i in range(n)], dtype=torch.float64)
    torch.testing.assert_close(grid, want, rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(grid.diff(), torch.full((n - 1,), (0.9 - 0.02) / (n - 1), dtype=torch.float64))


@pytest.mark.parametrize("fn", GRIDS)
def test_single_point(fn):
    grid = fn(1, 0.3, 0.7)
    assert grid.dtype == torch.float64
    assert grid.tolist() == [0.3]


@pytest.mark.parametrize("fn", GRIDS)
@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((0, 1e-5, 0.9), "n"),
        ((-3, 1e-5, 0.9), "n"),
        ((True, 1e-5, 0.9), "n"),
        ((2.0, 1e-5, 0.9), "n"),
        ((5, 0.5, 0.5), "T"),
        ((5, 0.6, 0.5), "T"),
        ((5, 1e-5, 1.0), "T"),
        ((5, 1e-5, 1.5), "T"),
        ((5, -0.1, 0.5), "t0"),
        ((5, float("nan"), 0.5), "t0"),
        ((5, 1e-5, float("nan")), "T"),
        ((5, 1e-5, float("inf")), "T"),
    ],
)
def test_validation(fn, args, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        fn(*args)


@pytest.mark.parametrize("q", [0.0, -1.0, float("nan"), float("inf")])
def test_rev_quad_bad_q(q):
    with pytest.raises(ValueError, match=r"\bq\b"):
        rev_quad_grid(5, 1e-5, 0.9, q=q)


# --- minimum spacing of production grids (psb_fast.grids, docs/math.md §10.1; D8) ------------------------

@pytest.mark.parametrize("gap", [1e-4, 1e-6, 1e-9, 1e-15])
def test_nearly_coincident_explicit_nodes_are_refused(gap):
    times = [1e-5, 0.1, 0.2, 0.2 + gap, 0.6]
    message = r"nodes t\[2\]=0.2 and t\[3\]=0.2.* are too close: step .* < the minimum 0.0004 \(1/1000 of"
    with pytest.raises(ValueError, match=message):
        grids.explicit_grid(times, 5, 1e-5)


def test_the_floor_is_the_larger_of_the_ratio_and_the_dtype_bound():
    grid = torch.tensor([0.0, 0.5, 0.5 + 5.1e-4, 0.9], dtype=torch.float64)
    floor = grids.min_steps(grid)
    ulp32 = grids.MIN_STEP_ULPS * torch.finfo(torch.float32).eps
    # step 1 is bounded by its larger neighbour (0.5 / 1000), steps 0 and 2 by the float32 ulps of their end
    assert floor.tolist() == pytest.approx([ulp32 * 0.5, 5e-4, ulp32 * 0.9], rel=1e-12)
    grids.check_spacing(grid)  # just above the floor: accepted; just below: refused
    with pytest.raises(ValueError, match=r"t\[1\]=0.5 and t\[2\]=0.50049 are too close"):
        grids.check_spacing(torch.tensor([0.0, 0.5, 0.5 + 4.9e-4, 0.9], dtype=torch.float64))
    tiny = torch.tensor([0.5, 0.5 + 1e-6, 0.5 + 2e-6], dtype=torch.float64)  # steps 1e-6, ratio 1
    ulps32 = grids.MIN_STEP_ULPS * torch.finfo(torch.float32).eps * 0.5
    assert 1e-6 < ulps32 and float(grids.min_steps(tiny)[0]) == pytest.approx(ulps32, rel=1e-5)
    with pytest.raises(ValueError, match="64 float32 ulps"):
        grids.check_spacing(tiny)
    grids.check_spacing(tiny, torch.float64)  # 1e-6 is far from float64's resolution


def test_tuned_fractions_with_a_collapsed_gap_are_refused():
    fractions = (0.0, 0.3, 0.3 + 1e-7, 0.7, 1.0)
    with pytest.raises(ValueError, match="are too close"):
        grids.power_grid(5, 1e-5, 0.9, 2.0, fractions)
    with pytest.raises(ValueError, match="are too close"):
        Setting(0.9, 2.0, 2, fractions).grid(5, 1e-5)


@pytest.mark.parametrize("n", [2, 3, 10, 100, 1000, 10_000])
@pytest.mark.parametrize("q", [0.5, 1.0, 1.5, 2.0, 3.0, 6.0])
def test_every_named_grid_of_any_size_passes(n, q):
    for t0, T in ((1e-5, 0.999), (1e-5, 0.5), (0.0, 0.9)):
        if not (t0 == 0.0 and q > 6):
            grids.power_grid(n, t0, T, q)
        grids.uniform_grid(n, t0, T)


def test_the_package_defaults_pass():
    from psb_fast.defaults import default_setting

    for nfe in range(1, 201):
        default_setting(nfe).grid(nfe, 1e-5)
