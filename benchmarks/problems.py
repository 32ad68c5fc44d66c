"""Generated benchmark problems with exact drifts: reproducible Gaussian mixtures in three splits.

    from psb_fast.benchmarks.problems import problems       # studies/: from benchmarks.problems import ...
    for prob in problems("tune", count=20):
        model = prob.mixture.as_model(bridge)                # the exact AGM network of this problem

Every problem is a `GaussianMixture` (possibly anisotropic and rotated) built from one integer seed
by a `torch.Generator`; nothing is read from files.

Splits are disjoint by seed: problem i (i = 0, 1, ...) of split s has seed 3 i + SPLITS[s] (tune 0,
validate 1, test 2), so `seed % 3` names the split. The family is fixed by i: FAMILY_CYCLE[i % 10],
so the first ten problems of every split cover all families (random mixtures appear twice per
cycle, isotropic and anisotropic). Default counts: tune 120, validate 60, test 120; any count >= 1
may be asked for (the sequence of seeds is unbounded).

Families (dimension D, modes K; K D <= 1600 always):
- "gmm": isotropic random mixture, D log-uniform in 2..64, K in 2..50 (log-uniform, capped at
  1600 // D), log-normal weights (log-std 0.2..1.5: "Dirichlet-like", unequal), widths s_k =
  w0 exp(0.3 N(0, 1)) with w0 log-uniform in 0.02..0.5; means spread (N(0, I)) or clustered (2..5
  cluster centres ~ N(0, I), each mean within N(0, c^2 I) of its centre, c in 0.05..0.3).
- "gmm-aniso": the same with per-axis widths s_kd = w0 exp(0.7 N(0, 1)) in a random rotation.
- "rings": 1..3 concentric rings of small isotropic components (beads that overlap or not).
- "spiral": 1..3 arms of an Archimedean spiral, small isotropic components along each arm.
- "checkerboard": n x n board (n 3..5), each black square either a few (2 x 2) axis-aligned
  anisotropic components or one broad isotropic one; the board randomly rotated.
- "curve": points near a sine or a parabola, many small components (widths 0.01..0.04).
- "grid": an n x m grid of modes (n, m in 3..7), isotropic or anisotropic, randomly rotated.
- "embedded": one of the structured 2-D problems above placed in D = 3..10 dimensions by a
  random rotation, with tiny widths (0.002..0.01) along the extra axes.

Scale: every mixture is centred (weighted mean 0) and rescaled, means and widths together, so
that its overall std sqrt(trace Cov[x] / D) is a target drawn uniformly in 0.7..1.3. The widths
above (and in `Problem.detail`) are before this rescale, which multiplies them by ~0.7..1.5
(embedded problems: up to ~3, their variance living in 2 of D axes). The overall std fixes the
trace only: clustered high-dimensional mixtures put most of it in a few directions (largest
principal std up to ~8 on the default splits, as in real data), structured 2-D ones up to ~1.6.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from psb_fast.oracles import GaussianMixture

SPLITS: dict[str, int] = {"tune": 0, "validate": 1, "test": 2}
DEFAULT_COUNTS: dict[str, int] = {"tune": 120, "validate": 60, "test": 120}
FAMILIES = ("gmm", "gmm-aniso", "rings", "spiral", "checkerboard", "curve", "grid", "embedded")
FAMILY_CYCLE = (
    "gmm", "gmm-aniso", "rings", "checkerboard", "gmm", "spiral", "gmm-aniso", "curve", "grid", "embedded",
)
MAX_SIZE = 1600  # the largest K * D of a problem
SCALE_RANGE = (0.7, 1.3)  # the overall std of every problem's data lies in this range

F64 = torch.float64


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: `mixture` is its data distribution (exact drifts via its methods).

    name: unique id "<family>-<seed>"; family: one of FAMILIES; split: "tune" / "validate" /
    "test"; seed: the integer it is built from; detail: a short human description.
    """

    name: str
    family: str
    split: str
    seed: int
    mixture: GaussianMixture
    detail: str = ""

    @property
    def label(self) -> str:
        """A short table label, e.g. "rings-14 (D=2, K=48; 2 rings)"."""
        mix = self.mixture
        extra = f"; {self.detail}" if self.detail else ""
        return f"{self.name} (D={mix.dim}, K={mix.n_components}{extra})"


def split_of(seed: int) -> str:
    """The split a seed belongs to (seed % 3: 0 tune, 1 validate, 2 test)."""
    _check_seed(seed)
    return next(name for name, rest in SPLITS.items() if rest == seed % 3)


def problems(split: str, count: int | None = None) -> list[Problem]:
    """The first `count` problems of `split` (default DEFAULT_COUNTS[split]), in seed order."""
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if count is None:
        count = DEFAULT_COUNTS[split]
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int or None, got {count!r}")
    return [problem(3 * i + SPLITS[split]) for i in range(count)]


def problem(seed: int) -> Problem:
    """The problem built from `seed` (any int >= 0): family FAMILY_CYCLE[(seed // 3) % 10]."""
    _check_seed(seed)
    family = FAMILY_CYCLE[(seed // 3) % len(FAMILY_CYCLE)]
    gen = torch.Generator().manual_seed(7919 * seed + 12345)
    parts = _BUILDERS[family](gen)
    mixture = _unit_scale(parts, _uniform(gen, *SCALE_RANGE))
    return Problem(f"{family}-{seed}", family, split_of(seed), seed, mixture, parts.detail)


def overall_std(mixture: GaussianMixture) -> float:
    """sqrt(trace Cov[x] / D) of the mixture's data (exact, from its parameters)."""
    w = mixture.weights
    mbar = w @ mixture.means
    spread = (w * ((mixture.means - mbar) ** 2).sum(1)).sum()
    width = (w * (mixture.axis_stds**2).sum(1)).sum()
    return math.sqrt((spread + width).item() / mixture.dim)


# ------------------------------------------------------------------------------------ construction


@dataclass
class _Parts:
    """A mixture under construction: means [K, D], stds [K] or [K, D], weights [K], rotation or None."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor
    rotation: torch.Tensor | None = None
    detail: str = ""


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen, dtype=F64).item()


def _log_uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return math.exp(_uniform(gen, math.log(lo), math.log(hi)))


def _int_log_uniform(gen: torch.Generator, lo: int, hi: int) -> int:
    """An int in [lo, hi], log-uniformly."""
    return min(hi, int(_log_uniform(gen, lo, hi + 1)))


def _int(gen: torch.Generator, lo: int, hi: int) -> int:
    """An int in [lo, hi], uniformly."""
    return int(torch.randint(lo, hi + 1, (), generator=gen).item())


def _normal(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=F64)


def _rotation(gen: torch.Generator, dim: int) -> torch.Tensor:
    """A random orthogonal [dim, dim] matrix (QR of a Gaussian matrix, signs fixed: Haar)."""
    q, r = torch.linalg.qr(_normal(gen, dim, dim))
    return q * torch.sign(torch.diagonal(r))


def _weights(gen: torch.Generator, k: int) -> torch.Tensor:
    """Unequal positive weights [K]: log-normal with a log-std drawn in 0.2..1.5."""
    return torch.exp(_uniform(gen, 0.2, 1.5) * _normal(gen, k))


def _plane_rotation(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=F64)


def _unit_scale(parts: _Parts, target: float) -> GaussianMixture:
    """The mixture centred at 0 and rescaled (means and widths) to overall std `target`."""
    raw = GaussianMixture(parts.means, parts.stds, parts.weights, rotation=parts.rotation)
    factor = target / overall_std(raw)
    means = (raw.means - raw.weights @ raw.means) * factor
    return GaussianMixture(means, raw.stds * factor, raw.weights, rotation=raw.rotation)


def _random_gmm(gen: torch.Generator, anisotropic: bool) -> _Parts:
    dim = _int_log_uniform(gen, 2, 64)
    k = _int_log_uniform(gen, 2, min(50, MAX_SIZE // dim))
    w0 = _log_uniform(gen, 0.02, 0.5)
    clustered = bool(torch.rand((), generator=gen).item() < 0.5)
    if clustered:
        n_clusters = _int(gen, 2, 5)
        centres = _normal(gen, n_clusters, dim)
        which = torch.randint(0, n_clusters, (k,), generator=gen)
        means = centres[which] + _uniform(gen, 0.05, 0.3) * _normal(gen, k, dim)
    else:
        means = _normal(gen, k, dim)
    if anisotropic:
        stds = w0 * torch.exp(0.7 * _normal(gen, k, dim))
        rotation = _rotation(gen, dim)
    else:
        stds, rotation = w0 * torch.exp(0.3 * _normal(gen, k)), None
    layout = f"{n_clusters} clusters" if clustered else "spread"
    return _Parts(means, stds, _weights(gen, k), rotation, f"{layout}, width {w0:.2g}")


def _beads(points: torch.Tensor, gen: torch.Generator, spacing: float) -> tuple[torch.Tensor, str]:
    """Isotropic widths [K] for components `spacing` apart on a curve: overlapping or separate beads."""
    ratio = _log_uniform(gen, 0.2, 1.0)
    return torch.full((points.shape[0],), ratio * spacing, dtype=F64), f"width/spacing {ratio:.2f}"


def _rings(gen: torch.Generator) -> _Parts:
    n_rings = _int(gen, 1, 3)
    k_outer = _int(gen, 16, 40)
    means, spacing = [], 2 * math.pi / k_outer
    for j in range(1, n_rings + 1):
        radius = j / n_rings
        k = max(6, round(k_outer * radius))
        angle = 2 * math.pi * (torch.arange(k, dtype=F64) + _uniform(gen, 0, 1)) / k
        means.append(radius * torch.stack([torch.cos(angle), torch.sin(angle)], 1))
    means = torch.cat(means)
    stds, width = _beads(means, gen, spacing)
    weights = torch.exp(0.2 * _normal(gen, means.shape[0]))
    return _Parts(means, stds, weights, None, f"{n_rings} ring{'s' * (n_rings > 1)}, {width}")


def _spiral(gen: torch.Generator) -> _Parts:
    arms = _int(gen, 1, 3)
    turns = _uniform(gen, 1.0, 2.0)
    per_arm = _int(gen, 20, 45) // arms + 10
    s = torch.sqrt(torch.linspace(0.02, 1.0, per_arm, dtype=F64))  # uniform in arc length
    means = []
    for j in range(arms):
        angle = 2 * math.pi * (turns * s + j / arms)
        means.append(s[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], 1))
    means = torch.cat(means)
    spacing = 2 * math.pi * turns / per_arm  # arc length per step at radius ~ 1 / 2 .. 1
    stds, width = _beads(means, gen, 0.6 * spacing)
    weights = torch.exp(0.2 * _normal(gen, means.shape[0]))
    return _Parts(means, stds, weights, None, f"{arms} arm{'s' * (arms > 1)}, {turns:.1f} turns, {width}")


def _checkerboard(gen: torch.Generator) -> _Parts:
    n = _int(gen, 3, 5)
    cell = 1.0
    fine = bool(torch.rand((), generator=gen).item() < 0.5)
    means, stds = [], []
    for row in range(n):
        for col in range(n):
            if (row + col) % 2:
                continue
            centre = torch.tensor([col - (n - 1) / 2, row - (n - 1) / 2], dtype=F64) * cell
            if fine:  # 2 x 2 anisotropic components filling the square
                for dx in (-0.25, 0.25):
                    for dy in (-0.25, 0.25):
                        means.append(centre + torch.tensor([dx, dy], dtype=F64) * cell)
                        widths = [_uniform(gen, 0.08, 0.16), _uniform(gen, 0.08, 0.16)]
                        stds.append(cell * torch.tensor(widths, dtype=F64))
            else:
                means.append(centre)
                stds.append(torch.full((2,), _uniform(gen, 0.2, 0.3) * cell, dtype=F64))
    rotation = _plane_rotation(_uniform(gen, 0, math.pi / 2))
    means = torch.stack(means) @ rotation.T
    weights = torch.exp(0.1 * _normal(gen, means.shape[0]))
    detail = f"{n}x{n}, " + ("4 anisotropic per square" if fine else "one broad per square")
    return _Parts(means, torch.stack(stds), weights, rotation, detail)


def _curve(gen: torch.Generator) -> _Parts:
    k = _int(gen, 30, 70)
    x = torch.linspace(-1.0, 1.0, k, dtype=F64) + 0.3 / k * _normal(gen, k)
    if torch.rand((), generator=gen).item() < 0.5:
        freq = _uniform(gen, 1.0, 3.0)
        y, kind = 0.5 * torch.sin(freq * math.pi * x), f"sine x{freq:.1f}"
    else:
        y, kind = _uniform(gen, 0.6, 1.2) * x * x - 0.4, "parabola"
    means = torch.stack([x, y], 1)
    width = _uniform(gen, 0.01, 0.04)
    weights = torch.exp(0.3 * _normal(gen, k))
    return _Parts(means, torch.full((k,), width, dtype=F64), weights, None, f"{kind}, width {width:.3f}")


def _grid(gen: torch.Generator) -> _Parts:
    n, m = _int(gen, 3, 7), _int(gen, 3, 7)
    gx, gy = torch.meshgrid(torch.arange(n, dtype=F64), torch.arange(m, dtype=F64), indexing="ij")
    means = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    k = n * m
    if torch.rand((), generator=gen).item() < 0.5:
        stds, kind = torch.full((k,), _log_uniform(gen, 0.05, 0.25), dtype=F64), "isotropic"
    else:
        stds, kind = torch.stack([torch.full((k,), _log_uniform(gen, 0.04, 0.3)),
                                  torch.full((k,), _log_uniform(gen, 0.04, 0.3))], 1).to(F64), "anisotropic"
    rotation = _plane_rotation(_uniform(gen, 0, math.pi / 2))
    return _Parts(means @ rotation.T, stds, _weights(gen, k), rotation, f"{n}x{m}, {kind}")


_STRUCTURED_2D: dict[str, Callable[[torch.Generator], _Parts]] = {
    "rings": _rings, "spiral": _spiral, "checkerboard": _checkerboard, "curve": _curve, "grid": _grid,
}


def _embedded(gen: torch.Generator) -> _Parts:
    names = list(_STRUCTURED_2D)
    inner_name = names[_int(gen, 0, len(names) - 1)]
    inner = _STRUCTURED_2D[inner_name](gen)
    dim = _int(gen, 3, 10)
    k = inner.means.shape[0]
    tiny = _uniform(gen, 0.002, 0.01)
    plane = inner.stds if inner.stds.dim() == 2 else inner.stds[:, None].expand(k, 2)
    stds = torch.cat([plane, torch.full((k, dim - 2), tiny, dtype=F64)], 1)
    inner_rot = torch.eye(dim, dtype=F64)
    if inner.rotation is not None:
        inner_rot[:2, :2] = inner.rotation
    outer = _rotation(gen, dim)
    means = torch.cat([inner.means, torch.zeros(k, dim - 2, dtype=F64)], 1) @ outer.T
    detail = f"{inner_name} in {dim}-D, extra width {tiny:.3f}; {inner.detail}"
    return _Parts(means, stds, inner.weights, outer @ inner_rot, detail)


_BUILDERS: dict[str, Callable[[torch.Generator], _Parts]] = {
    "gmm": lambda gen: _random_gmm(gen, anisotropic=False),
    "gmm-aniso": lambda gen: _random_gmm(gen, anisotropic=True),
    **_STRUCTURED_2D,
    "embedded": _embedded,
}
