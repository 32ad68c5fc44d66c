"""Distribution quality of samples against held-out data: sliced Wasserstein-2, MMD, energy distance.

    a, b = held_out_halves("gmm-grid", 2000)                 # two disjoint held-out sets (or None)
    h = median_bandwidth(a)                                  # one kernel width for a whole table
    row = distribution_quality(x1, a, bandwidth=h)           # {"sw2", "mmd", "energy"}
    floor = distribution_quality(b, a, bandwidth=h)          # data vs data: the sampling-noise floor

Point sets are [N, ...] (flattened to [N, D]); every metric is computed in float64 on the CPU and
returned as a float in data units (MMD: unitless, in [0, sqrt 2]). The three are zero for identical
sets. Two finite samples of one distribution are not at zero: the data-vs-data value of two held-out
halves of the same size is the floor below which differences between samplers are noise.

- `sliced_w2`: sqrt(mean over P random unit directions theta of W2^2(theta.a, theta.b)), the 1-D
  W2 of the projections computed exactly from the two empirical quantile functions (any sizes N, M).
  The directions are numpy's RandomState(seed).randn(D, P), normalised per column, as POT's
  `ot.sliced_wasserstein_distance(a, b, n_projections=P, seed=seed)` draws them, so the two agree to
  rounding (tests/test_metrics.py checks it where POT is installed).
- `mmd`: the biased (V-statistic) maximum mean discrepancy with the Gaussian kernel
  k(x, y) = exp(-|x - y|^2 / (2 h^2)): sqrt(mean k(a, a') + mean k(b, b') - 2 mean k(a, b)).
  h: `median_bandwidth` (the median heuristic: the median pairwise distance) of the pooled sets
  unless given; a table should fix one h (e.g. of the held-out data) so its rows compare.
- `energy_distance`: 2 E|A - B| - E|A - A'| - E|B - B'| (biased, >= 0).
"""

from __future__ import annotations

import numpy as np
import torch

from .data import has_held_out, load_data

#: Directions and seed of `sliced_w2` (the values the benchmarks used with POT).
SW_PROJECTIONS = 200
SW_SEED = 0
#: Points (at most) whose pairwise distances give `median_bandwidth` (the first rows).
MEDIAN_POINTS = 1000


def _points(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [N, ...], got {type(value).__name__}")
    if value.dim() < 1 or value.shape[0] < 1:
        raise ValueError(f"{name} must have shape [N, ...] with N >= 1, got {tuple(value.shape)}")
    points = value.detach().to("cpu", torch.float64).reshape(value.shape[0], -1)
    if not bool(torch.isfinite(points).all()):
        raise ValueError(f"{name} holds non-finite values")
    return points


def _pair(a: object, b: object) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _points("a", a), _points("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have points of the same size, got {a.shape[1]} and {b.shape[1]} "
                         "values")
    return a, b


def wasserstein_1d_squared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W2^2 between the empirical distributions (equal weights) of the columns of a [N, P] and b [M, P],
    [P] float64: the integral over levels s in (0, 1) of (Q_a(s) - Q_b(s))^2, exact for step quantile
    functions (each level interval between consecutive k/N and k/M is summed once)."""
    a, b = a.to(torch.float64).sort(0).values, b.to(torch.float64).sort(0).values
    n, m = a.shape[0], b.shape[0]
    levels = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                        torch.arange(1, m + 1, dtype=torch.float64) / m]).sort().values
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    middle = levels - widths / 2  # inside each interval (empty intervals have width 0)
    i = (middle * n).floor().long().clamp(0, n - 1)
    j = (middle * m).floor().long().clamp(0, m - 1)
    return (widths[:, None] * (a[i] - b[j]).pow(2)).sum(0)


def projections(dim: int, count: int = SW_PROJECTIONS, seed: int = SW_SEED) -> torch.Tensor:
    """`count` unit directions in R^dim, float64 [dim, count] (numpy RandomState(seed), as POT)."""
    theta = np.random.RandomState(seed).randn(dim, count)
    return torch.from_numpy(theta / np.sqrt((theta ** 2).sum(0, keepdims=True)))


def sliced_w2(a: torch.Tensor, b: torch.Tensor, n_projections: int = SW_PROJECTIONS,
              seed: int = SW_SEED) -> float:
    """Sliced Wasserstein-2 distance between point sets a [N, ...] and b [M, ...] (data units)."""
    a, b = _pair(a, b)
    if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
        raise ValueError(f"n_projections must be an int >= 1, got {n_projections!r}")
    theta = projections(a.shape[1], n_projections, seed)
    return float(wasserstein_1d_squared(a @ theta, b @ theta).mean().sqrt())


def median_bandwidth(x: torch.Tensor) -> float:
    """The median heuristic: the median distance between distinct points among the first
    MEDIAN_POINTS rows of x [N, ...] (N >= 2); 1.0 when all of them coincide."""
    x = _points("x", x)[:MEDIAN_POINTS]
    if x.shape[0] < 2:
        raise ValueError(f"x must hold at least 2 points for a median distance, got {x.shape[0]}")
    d = torch.pdist(x)
    h = float(d.median())
    return h if h > 0 else 1.0


def mmd(a: torch.Tensor, b: torch.Tensor, bandwidth: float | None = None) -> float:
    """MMD (biased, Gaussian kernel of width `bandwidth`; None: `median_bandwidth` of a and b
    pooled) between point sets a [N, ...] and b [M, ...] (module docstring)."""
    a, b = _pair(a, b)
    h = median_bandwidth(torch.cat([a, b])) if bandwidth is None else bandwidth
    if isinstance(h, bool) or not isinstance(h, int | float) or not h > 0 or h == float("inf"):
        raise ValueError(f"bandwidth must be a finite number > 0 or None, got {bandwidth!r}")

    def mean_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(x, y).pow(2) / (2 * h * h)).mean()

    squared = mean_kernel(a, a) + mean_kernel(b, b) - 2 * mean_kernel(a, b)
    return float(squared.clamp(min=0).sqrt())


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance 2 E|A-B| - E|A-A'| - E|B-B'| between point sets a [N, ...] and b [M, ...] (>= 0)."""
    a, b = _pair(a, b)
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def distribution_quality(samples: torch.Tensor, data: torch.Tensor, bandwidth: float | None = None) -> dict:
    """{"sw2", "mmd", "energy"} of `samples` [N, ...] against `data` [M, ...] (module docstring)."""
    return {"sw2": sliced_w2(samples, data), "mmd": mmd(samples, data, bandwidth),
            "energy": energy_distance(samples, data)}


def held_out_halves(spec: str, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two disjoint sets of held-out points of the data `spec` (its "test" split, `psb_fast.data`):
    up to n points each (x float32 [n', ...]); None where the source has no held-out part
    (tensor files and image folders). Toy sets: 2 n points of the test stream of `seed`; finite
    sets: the test split's first and second halves, at most n points each."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not has_held_out(spec):
        return None
    source = load_data(spec, split="test", seed=seed)
    if source.size is None:
        x = source.all(2 * n)[0]
    else:
        x = source.all()[0]
        n = min(n, x.shape[0] // 2)
        if n < 1:
            raise ValueError(f"the test split of {spec!r} holds {x.shape[0]} point(s): too few for two "
                             "halves")
    return x[:n], x[n:2 * n]
