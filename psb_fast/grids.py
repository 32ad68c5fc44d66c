"""Sampling time grids: the one place that builds, names and checks them (docs/math.md §10.1).

Every grid of the package is a power grid: for n = NFE points from t0 to T and a power q > 0,

    t_i = (t0^(1/q) + r_i (T^(1/q) - t0^(1/q)))^q,   i = 0..n-1,

with r_i = i/(n-1) (the plain power-q grid; q = 2 is the published "rev-quad") or free fractions
0 = r_0 < r_1 < ... < r_{n-1} = 1 in the power-q coordinate (a tuned grid: it maps to any t0 and
T). The end points are set exactly to t0 and T. "uniform" is n equally spaced times (torch.linspace).

Grid names (`PhaseSampler(grid=...)`, `psb-fast sample --grid`): "default" (the package default's
grid for this NFE, `psb_fast.defaults`; "tuned" is its old name), "rev-quad", "uniform", or
"power-<q>" for any q > 0 (e.g. "power-1.5"). `parse_grid` reads a name, `make_grid` builds it,
`explicit_grid` checks user times. Bad arguments raise ValueError naming the argument.

Minimum spacing (docs/math.md §10.1): every grid this module returns (power grids, tuned fractions,
uniform and explicit grids) passes `check_spacing`: each step h_i = t_{i+1} - t_i is at least
1/MAX_STEP_RATIO of each neighbouring step and MIN_STEP_ULPS units in the last place of t_{i+1}
in the time dtype (float32: the dtype in which the fast backends give t to the model). Nearly
coincident nodes are refused with one line naming them, instead of coefficients that amplify
rounding and model error by the step ratio.

reference/grids.py is the reference implementation's own transcription of the same formulas
(the independent oracle); production code does not import it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import checks

GRID_NAMES = ("default", "rev-quad", "uniform", "power-<q>")  # "tuned": the old name of "default"
#: Adjacent steps may differ by at most this factor: the correctors' error grows in proportion to it.
MAX_STEP_RATIO = 1e3
#: A step spans at least this many units in the last place of its end time in the time dtype, so the
#: model sees it with a relative rounding error of at most 1/64.
MIN_STEP_ULPS = 64
#: The time dtype grids are checked for by default: the one the float32 backends give the model.
TIME_DTYPE = torch.float32
#: The grid of the published sampler: the power grid with q = 2.
PUBLISHED_GRID = "rev-quad"


def parse_grid(name: object) -> tuple[str, float | None]:
    """A grid name as (kind, q): ("tuned", None), ("uniform", None) or ("power", q), with q = 2.0
    for "rev-quad" and q from "power-<q>" (a finite number > 0). ValueError naming `grid` else."""
    if name in ("default", "tuned", "uniform"):
        return str(name), None
    if name == "rev-quad":
        return "power", 2.0
    if isinstance(name, str) and name.startswith("power-"):
        try:
            q = float(name[len("power-"):])
        except ValueError:
            q = math.nan
        if math.isfinite(q) and q > 0:
            return "power", q
    raise ValueError(f"grid must be one of {GRID_NAMES} (q > 0), got {name!r}")


def grid_name(q: float) -> str:
    """The name of the power-q grid: "rev-quad" for q = 2, else "power-<q>" (parse_grid reads it back
    to the same q)."""
    return PUBLISHED_GRID if q == 2.0 else f"power-{float(q)!r}"


def make_grid(name: str, n: int, t0: float, T: float) -> torch.Tensor:
    """The n evaluation times of the named grid from t0 to T, float64 [n] (module docstring).

    "default" depends on the package defaults, which build on this module: it is
    `default_setting(n).grid(n, t0)` (psb_fast.defaults)."""
    kind, q = parse_grid(name)
    if kind in ("default", "tuned"):
        raise ValueError(f"the {name!r} grid is the package default's: use default_setting(n).grid(n, t0)")
    if kind == "uniform":
        return uniform_grid(n, t0, T)
    return power_grid(n, t0, T, q)


def power_grid(
    n: int, t0: float, T: float, q: float = 2.0, fractions: Sequence[float] | None = None
) -> torch.Tensor:
    """t_i = (t0^(1/q) + r_i (T^(1/q) - t0^(1/q)))^q, float64 [n], end points exactly t0 and T.

    fractions: r_0 = 0 < r_1 < ... < r_{n-1} = 1 (n numbers) in the power-q coordinate; None ->
    r_i = i/(n-1). n = 1 gives [t0] and takes no fractions. Checks: n an int >= 1, 0 <= t0 < 1,
    T < 1 (and t0 < T for n > 1), q finite > 0.
    """
    _check_span(n, t0, T)
    q = checks.number("q", q)
    if q <= 0:
        raise ValueError(f"q (the grid order) must be > 0, got {q!r}")
    if n == 1:
        if fractions is not None:
            raise ValueError(f"fractions must be None for nfe = 1, got {fractions!r}")
        return torch.tensor([float(t0)], dtype=torch.float64)
    if fractions is None:
        r = torch.arange(n, dtype=torch.float64) / (n - 1)
    else:
        r = torch.tensor(check_fractions(fractions, n), dtype=torch.float64)
    a, b = float(t0) ** (1.0 / q), float(T) ** (1.0 / q)
    grid = (a + r * (b - a)) ** q
    grid[0], grid[-1] = float(t0), float(T)
    return check_spacing(grid)


def rev_quad_grid(n: int, t0: float, T: float) -> torch.Tensor:
    """The published grid: the power grid with q = 2."""
    return power_grid(n, t0, T, 2.0)


def uniform_grid(n: int, t0: float, T: float) -> torch.Tensor:
    """n equally spaced times from t0 to T, float64 [n] ([t0] for n = 1)."""
    _check_span(n, t0, T)
    if n == 1:
        return torch.tensor([float(t0)], dtype=torch.float64)
    return check_spacing(torch.linspace(float(t0), float(T), n, dtype=torch.float64))


def check_fractions(fractions: object, n: int | None = None) -> tuple[float, ...]:
    """Grid fractions as a tuple of floats: at least 2 finite numbers rising strictly from exactly 0
    to exactly 1, and n of them when n is given. ValueError naming `fractions` else."""
    try:
        if isinstance(fractions, (str, bytes)):
            raise TypeError
        items = list(fractions)
        if any(isinstance(f, bool) for f in items):
            raise TypeError
        values = [float(f) for f in items]
    except (TypeError, ValueError) as err:
        raise ValueError(f"fractions must be a sequence of numbers, got {fractions!r}") from err
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"fractions must be finite, got {values}")
    if n is not None and len(values) != n:
        raise ValueError(f"fractions must have length nfe = {n}, got {len(values)}")
    if len(values) < 2:
        raise ValueError(f"fractions must hold at least 2 numbers (0 and 1), got {values}")
    if values[0] != 0.0 or values[-1] != 1.0:
        raise ValueError(f"fractions must start at 0 and end at 1, got {values[0]!r} .. {values[-1]!r}")
    if any(not b > a for a, b in zip(values[:-1], values[1:], strict=False)):
        raise ValueError(f"fractions must be strictly increasing, got {values}")
    return tuple(values)


def explicit_grid(times: Sequence[float] | torch.Tensor, n: int, t0: float) -> torch.Tensor:
    """Check user-given grid times: n finite values, strictly increasing, starting at t0 (to 1e-12).
    Returns them as a float64 CPU tensor [n]."""
    try:
        grid = torch.as_tensor(times, dtype=torch.float64).flatten().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"grid must be a grid name {GRID_NAMES} or a sequence of times, got {times!r}"
        ) from err
    if grid.numel() != n:
        raise ValueError(f"grid must hold nfe={n} times, got {grid.numel()}")
    if not bool(torch.isfinite(grid).all()) or (n > 1 and not bool((grid.diff() > 0).all())):
        raise ValueError(f"grid times must be finite and strictly increasing, got {grid.tolist()}")
    if not math.isclose(float(grid[0]), t0, rel_tol=0, abs_tol=1e-12):
        raise ValueError(f"grid must start at t0={t0}, got {float(grid[0])!r}")
    return check_spacing(grid)


def min_steps(grid: torch.Tensor, dtype: torch.dtype = TIME_DTYPE) -> torch.Tensor:
    """The smallest allowed step at each position of `grid` (float64 [n - 1]): the larger of
    1/MAX_STEP_RATIO of the larger neighbouring step and MIN_STEP_ULPS * eps(dtype) * t_{i+1}."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    h = grid.diff()
    neighbour = torch.zeros_like(h)
    if h.numel() > 1:
        neighbour[1:] = h[:-1]
        neighbour[:-1] = torch.maximum(neighbour[:-1], h[1:])
    ulps = MIN_STEP_ULPS * torch.finfo(dtype).eps * grid[1:].abs()
    return torch.maximum(neighbour / MAX_STEP_RATIO, ulps)


def check_spacing(grid: torch.Tensor, dtype: torch.dtype = TIME_DTYPE) -> torch.Tensor:
    """`grid` (float64 [n], increasing) when no two adjacent nodes are closer than `min_steps` allows;
    else ValueError naming the first such pair, their step and the minimum (docs/math.md §10.1)."""
    if grid.numel() < 2:
        return grid
    h, floor = grid.diff(), min_steps(grid, dtype)
    bad = torch.nonzero(~(h >= floor))
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(
            f"grid nodes t[{i}]={float(grid[i])!r} and t[{i + 1}]={float(grid[i + 1])!r} are too close: "
            f"step {float(h[i]):.3g} < the minimum {float(floor[i]):.3g} (1/{MAX_STEP_RATIO:g} of a "
            f"neighbouring step, and {MIN_STEP_ULPS} {str(dtype).replace('torch.', '')} ulps of the time; "
            f"docs/math.md §10.1)")
    return grid


def _check_span(n: object, t0: object, T: object) -> None:
    checks.count("nfe", n, 1)
    t0, T = checks.number("t0", t0), checks.number("T", T)
    if not 0 <= t0 < 1:
        raise ValueError(f"t0 must be in [0, 1), got {t0!r}")
    if not T < 1 or (n > 1 and not t0 < T):
        raise ValueError(f"T must be in (t0, 1) = ({t0}, 1), got {T!r}")
