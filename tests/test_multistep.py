"""Exponential multistep coefficients (psb_fast.multistep, docs/math.md §7) vs 30-digit quadrature.

The reference integrates the integrals of docs/math.md §7.2 with mpmath.quad (tanh-sinh, 30 digits), splitting
each step where tau = 1 - s shrinks by a factor of 3. N(s) is the float64
`PhaseBridge.coefficients(s).normalizer` (prefetched in one vectorized call at mpmath's nodes).
Since l_{i,j}(s) and (t_{i+1} - s) l_{i,j}(s) are polynomials in y = s - t_i (expanded here
exactly at 30 digits), every coefficient of a step is a combination of the 5 moments
M_k = int N(s) (s - t_i)^k ds, k = 0..4, each one mpmath.quad.
"""

from __future__ import annotations

import functools
import random

import mpmath as mp
import pytest
import torch

from psb_fast.bridge import PhaseBridge
from psb_fast.multistep import multistep_coefficients
from psb_fast.reference.grids import rev_quad_grid, uniform_grid

torch.set_num_threads(1)

DPS = 30
RTOL = 1e-10
ORDERS = (0, 1, 2, 3)
NFES = (5, 10, 20)
T0 = 1e-5
BRIDGES = {
    "default": dict(),
    "p1.5_k-0.3": dict(p=1.5, k=-0.3),
    "sde": dict(mode="SDE"),
}
_RULE = mp.mp._tanh_sinh  # the rule mp.quad uses by default; only its nodes are read, to prefetch N
# N(s) is float64, so mp.quad's 30-digit error target is never met and it would run to its
# default degree 7 (5x the nodes of degree 6) for nothing; degree 6 agrees with 7 to 1e-15.
MAX_DEGREE = 6


class _Normalizer:
    """N(s) as mpf from the float64 bridge, cached per node; prefetched per interval."""

    def __init__(self, bridge: PhaseBridge) -> None:
        self.bridge = bridge
        self.cache: dict = {}

    def prefetch(self, points: list) -> None:
        prec = mp.mp.prec
        nodes = {
            x
            for a, b in zip(points[:-1], points[1:], strict=True)
            for degree in range(1, MAX_DEGREE + 1)
            for x, _ in _RULE.get_nodes(a, b, degree, prec)
        }
        nodes = [x for x in nodes if x not in self.cache]
        if nodes:
            s = torch.tensor([float(x) for x in nodes], dtype=torch.float64)
            values = self.bridge.coefficients(s).normalizer.tolist()
            self.cache.update((x, mp.mpf(v)) for x, v in zip(nodes, values, strict=True))

    def __call__(self, s) -> mp.mpf:
        value = self.cache.get(s)
        if value is None:  # mp.quad asked for a node the prefetch did not cover
            value = self.cache[s] = mp.mpf(self.bridge.coefficients(float(s)).normalizer.item())
        return value


@functools.cache
def _normalizer(bridge_name: str) -> _Normalizer:
    return _Normalizer(PhaseBridge(**BRIDGES[bridge_name]))


def _split(a: float, b: float) -> list:
    """[a, ..., b] with breakpoints where tau = 1 - s drops by a factor of 3 (N steepens near 1)."""
    points = [mp.mpf(a)]
    while (1 - points[-1]) / 3 > 1 - mp.mpf(b):
        points.append(1 - (1 - points[-1]) / 3)
    points.append(mp.mpf(b))
    return points


@functools.cache
def _moments(bridge_name: str, a: float, b: float, kmax: int = 4) -> tuple:
    """(M_0 .. M_kmax), M_k = int_a^b N(s) (s - a)^k ds at 30 digits."""
    N = _normalizer(bridge_name)
    with mp.workdps(DPS):
        points = _split(a, b)
        N.prefetch(points)
        lo = mp.mpf(a)
        out = []
        for k in range(kmax + 1):
            value, err = mp.quad(
                lambda s, k=k: N(s) * (s - lo) ** k, points, error=True, maxdegree=MAX_DEGREE
            )
            assert err <= 1e-12 * abs(value), (a, b, k, value, err)
            out.append(value)
    return tuple(out)


def _poly_mul(p: list, q: list) -> list:
    out = [mp.mpf(0)] * (len(p) + len(q) - 1)
    for i, pi in enumerate(p):
        for j, qj in enumerate(q):
            out[i + j] += pi * qj
    return out


def _lagrange_poly(offsets: list, j: int) -> list:
    """Coefficients (in y = s - t_i, ascending) of l_j = prod_{k != j} (y - d_k) / (d_j - d_k)."""
    poly = [mp.mpf(1)]
    for k, dk in enumerate(offsets):
        if k != j:
            den = offsets[j] - dk
            poly = _poly_mul(poly, [-dk / den, 1 / den])
    return poly


def _apply(poly: list, moments: tuple):
    return sum(c * m for c, m in zip(poly, moments, strict=False))


def _reference(bridge_name: str, times: list[float], t_end: float | None, order: int):
    """(Cx, Cv) as nested lists of mpf, from the integrals of docs/math.md §7.2 at 30 digits."""
    ends = times[1:] + ([t_end] if t_end is not None else [])
    Cx, Cv = [], []
    with mp.workdps(DPS):
        for i, (a, b) in enumerate(zip(times, ends, strict=False)):
            M = _moments(bridge_name, a, b)
            q = min(i, order)
            offsets = [mp.mpf(times[i - k]) - mp.mpf(a) for k in range(q + 1)]
            h = mp.mpf(b) - mp.mpf(a)
            row_x, row_v = [], []
            for j in range(q + 1):
                lj = _lagrange_poly(offsets, j)
                row_v.append(_apply(lj, M))
                row_x.append(_apply(_poly_mul(lj, [h, mp.mpf(-1)]), M))  # (t_{i+1} - s) l_j
            Cx.append(row_x)
            Cv.append(row_v)
    return Cx, Cv


def _assert_rel(got: torch.Tensor, want: list, what: str) -> None:
    worst = 0.0
    for i, row in enumerate(want):
        for j, w in enumerate(row):
            rel = abs((mp.mpf(got[i, j].item()) - w) / w)
            worst = max(worst, float(rel))
            assert rel <= RTOL, f"{what}[{i},{j}] = {got[i, j].item()!r}, want {mp.nstr(w, 20)} (rel {rel})"


GRID_CASES = [
    # (bridge, NFE, T, t_end): no-hop grids end at T and take one more step to t_end;
    # hop grids (t_end None) end at T, including the default T = 0.999 where N is steepest.
    *[("default", n, 0.999, None) for n in NFES],
    *[("default", n, 0.9, 0.999) for n in NFES],
    ("default", 10, 0.7, None),
    ("p1.5_k-0.3", 10, 0.9, 0.999),
    ("p1.5_k-0.3", 5, 0.999, None),
    ("sde", 10, 0.99, 0.999),
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(("bridge_name", "n", "T", "t_end"), GRID_CASES)
@pytest.mark.slow
def test_coefficients_match_mpmath(bridge_name, n, T, t_end, order):
    bridge = PhaseBridge(**BRIDGES[bridge_name])
    grid = rev_quad_grid(n, T0, T)
    co = multistep_coefficients(bridge, grid, order, t_end)
    Cx, Cv = _reference(bridge_name, grid.tolist(), t_end, order)
    S = n - 1 + (t_end is not None)
    assert co.Cx.shape == co.Cv.shape == (S, order + 1)
    _assert_rel(co.Cv, Cv, "Cv")
    _assert_rel(co.Cx, Cx, "Cx")


def test_coefficients_match_mpmath_uniform_grid():
    """A grid other than rev-quad: uniform, whose first steps are long relative to t0."""
    bridge = PhaseBridge()
    grid = uniform_grid(6, 0.05, 0.95)
    co = multistep_coefficients(bridge, grid, 3, 0.999)
    Cx, Cv = _reference("default", grid.tolist(), 0.999, 3)
    _assert_rel(co.Cv, Cv, "Cv")
    _assert_rel(co.Cx, Cx, "Cx")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("t_end", [None, 0.999])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 10])
def test_structure(n, t_end, order):
    T = 0.9
    grid = rev_quad_grid(n, T0, T)
    co = multistep_coefficients(PhaseBridge(), grid, order, t_end)
    S = n - 1 + (t_end is not None)
    for name in ("Cx", "Cv"):
        C = getattr(co, name)
        assert C.dtype == torch.float64 and C.shape == (S, order + 1), name
        for i in range(S):
            q = min(i, order)
            assert bool((C[i, q + 1 :] == 0).all()), f"{name}[{i}] nonzero beyond column {q}"
            assert bool((C[i, : q + 1] != 0).all()), f"{name}[{i}] has a zero within columns 0..{q}"
            # l_j keeps one sign on [t_i, t_{i+1}] (all its roots are at earlier nodes): (-1)^j.
            signs = torch.tensor([(-1.0) ** j for j in range(q + 1)], dtype=torch.float64)
            assert bool((torch.sign(C[i, : q + 1]) == signs).all()), f"{name}[{i}] signs {C[i]}"
    assert co.t.dtype == co.h.dtype == torch.float64
    assert co.t.shape == co.h.shape == (S,)
    torch.testing.assert_close(co.t, grid[:S], rtol=0, atol=0)
    if S:
        assert bool((co.h > 0).all())
        end = t_end if t_end is not None else T
        assert co.h.sum().item() == pytest.approx(end - T0, rel=1e-14)
        torch.testing.assert_close(co.t + co.h, torch.tensor(grid.tolist()[1:] + ([t_end] if t_end else []),
                                                             dtype=torch.float64), rtol=0, atol=1e-16)


def test_one_point_grid_without_t_end():
    """NFE 1 with hop: no steps, so empty [0, order + 1] coefficients (not a crash)."""
    co = multistep_coefficients(PhaseBridge(), rev_quad_grid(1, T0, 0.9), 2, None)
    assert co.Cx.shape == co.Cv.shape == (0, 3) and co.t.shape == co.h.shape == (0,)


@pytest.mark.parametrize(("bridge_name", "n", "T", "t_end"), GRID_CASES[:6])
@pytest.mark.slow
def test_order0_is_integral_of_normalizer(bridge_name, n, T, t_end):
    """Cv_{i,0} of order 0 is int N over the step; Cx_{i,0} is int (t_{i+1} - s) N(s) ds."""
    grid = rev_quad_grid(n, T0, T)
    co = multistep_coefficients(PhaseBridge(**BRIDGES[bridge_name]), grid, 0, t_end)
    times = grid.tolist()
    ends = times[1:] + ([t_end] if t_end is not None else [])
    with mp.workdps(DPS):
        for i, (a, b) in enumerate(zip(times, ends, strict=False)):
            M = _moments(bridge_name, a, b)
            assert abs(co.Cv[i, 0].item() / M[0] - 1) <= RTOL
            assert abs(co.Cx[i, 0].item() / ((mp.mpf(b) - mp.mpf(a)) * M[0] - M[1]) - 1) <= RTOL


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(("T", "t_end"), [(0.999, None), (0.9, 0.999)])
def test_exact_for_polynomials(order, T, t_end):
    """sum_j C_{i,j} F(t_{i-j}) = int w(s) N(s) F(s) ds for F of degree <= min(i, order) in s.

    w = 1 for Cv and t_{i+1} - s for Cx; the right side from the moments (30 digits).
    """
    rng = random.Random(1234 + order)
    grid = rev_quad_grid(10, T0, T)
    times = grid.tolist()
    ends = times[1:] + ([t_end] if t_end is not None else [])
    co = multistep_coefficients(PhaseBridge(), grid, order, t_end)
    with mp.workdps(DPS):
        for i, (a, b) in enumerate(zip(times, ends, strict=False)):
            q = min(i, order)
            M = _moments("default", a, b)
            for degree in range(q + 1):
                # F(s) = sum_k f_k (s - a)^k, random coefficients, exact degree `degree`.
                f = [mp.mpf(rng.uniform(-1, 1)) for _ in range(degree)] + [mp.mpf(rng.choice([-1, 1]))]

                def F(s, f=f, a=a):
                    return sum(fk * (mp.mpf(s) - mp.mpf(a)) ** k for k, fk in enumerate(f))

                h = mp.mpf(b) - mp.mpf(a)
                want_v = _apply(f, M)
                want_x = _apply(_poly_mul(f, [h, mp.mpf(-1)]), M)
                got_v = sum(co.Cv[i, j].item() * F(times[i - j]) for j in range(q + 1))
                got_x = sum(co.Cx[i, j].item() * F(times[i - j]) for j in range(q + 1))
                # Scale: the same sums with |C| |F|, so cancellation in the sum is allowed for.
                scale_v = sum(abs(co.Cv[i, j].item() * F(times[i - j])) for j in range(q + 1))
                scale_x = sum(abs(co.Cx[i, j].item() * F(times[i - j])) for j in range(q + 1))
                assert abs(got_v - want_v) <= RTOL * scale_v, (i, degree, got_v, want_v)
                assert abs(got_x - want_x) <= RTOL * scale_x, (i, degree, got_x, want_x)


def test_degree_above_order_is_not_exact():
    """Sanity of the test above: a degree q + 1 polynomial is not integrated exactly."""
    grid = rev_quad_grid(10, T0, 0.9)
    times = grid.tolist()
    co = multistep_coefficients(PhaseBridge(), grid, 1, None)
    i, a, b = 5, times[5], times[6]
    M = _moments("default", a, b)
    with mp.workdps(DPS):
        want = M[2]  # F(s) = (s - a)^2
        got = sum(co.Cv[i, j].item() * (mp.mpf(times[i - j]) - mp.mpf(a)) ** 2 for j in range(2))
        assert abs(got - want) > 1e-3 * abs(want)


@pytest.mark.parametrize("order", [4, -1, 5, True, 2.0, None])
def test_bad_order(order):
    with pytest.raises(ValueError, match="order"):
        multistep_coefficients(PhaseBridge(), rev_quad_grid(5), order)


@pytest.mark.parametrize(
    "times",
    [[0.1, 0.3, 0.2, 0.5], [0.1, 0.2, 0.2, 0.5], [0.5, 0.4, 0.3]],
)
def test_non_increasing_grid(times):
    with pytest.raises(ValueError, match="grid"):
        multistep_coefficients(PhaseBridge(), torch.tensor(times, dtype=torch.float64), 2)


@pytest.mark.parametrize("t_end", [0.9, 0.5, 1.0, 1.5])
def test_bad_t_end(t_end):
    with pytest.raises(ValueError, match="t_end"):
        multistep_coefficients(PhaseBridge(), rev_quad_grid(5, T0, 0.9), 2, t_end)
