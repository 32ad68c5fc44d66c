"""Sampler settings: the one `Setting` type, the end time T_END and the published settings.

A `Setting` is what the probability-flow sampler needs besides the NFE and t0: the hop time T,
the grid power q with optional free grid fractions (psb_fast.grids), the solver order and the
solver variant. The package defaults (psb_fast/defaults.json, read by psb_fast.defaults), a
`psb_fast.tune` result, the tuning studies (studies/) and `published_setting(nfe)` are all
Settings; every check on T, q, order and fractions happens here (and in psb_fast.grids).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import total_ordering
from numbers import Real

import torch

from .grids import check_fractions, grid_name, power_grid

#: End time of sampling without the hop, and of the exact and high-NFE reference solutions.
T_END = 0.999
#: Solver variants (docs/math.md §7.4, psb_fast.variants): "multistep" extrapolates the network
#: output F (the published algorithm), "data" the hop's estimate x1_hat; "-corrector" adds the
#: UniPC-style corrector that reuses the next evaluation.
VARIANTS = ("multistep", "data", "multistep-corrector", "data-corrector")
#: Published settings (AGM, CIFAR-10 with hop): NFE -> T; order 2 on the rev-quad grid (q = 2).
PUBLISHED_T = {5: 0.4, 10: 0.7, 20: 0.9}
PUBLISHED_Q = 2.0
PUBLISHED_ORDER = 2
#: Keys of a setting's JSON object (`Setting.to_json`).
JSON_KEYS = ("T", "q", "order", "fractions", "variant")


def published_T(nfe: int) -> float:
    """T of the published settings, linearly interpolated in NFE between 5, 10 and 20 (clamped)."""
    keys = sorted(PUBLISHED_T)
    if nfe <= keys[0]:
        return PUBLISHED_T[keys[0]]
    if nfe >= keys[-1]:
        return PUBLISHED_T[keys[-1]]
    lo = max(k for k in keys if k <= nfe)
    hi = min(k for k in keys if k >= nfe)
    if lo == hi:
        return PUBLISHED_T[lo]
    w = (nfe - lo) / (hi - lo)
    return (1 - w) * PUBLISHED_T[lo] + w * PUBLISHED_T[hi]


def published_setting(nfe: int) -> Setting:
    """The published sampler at this NFE: T = published_T(nfe), q = 2 (rev-quad), order 2."""
    return Setting(float(published_T(nfe)), PUBLISHED_Q, PUBLISHED_ORDER)


@total_ordering
@dataclass(frozen=True)
class Setting:
    """One sampler setting (immutable, hashable, ordered like the tuple (T, q, order, fractions)).

    T: the hop time (last grid time), in (0, 1). q: the grid power, finite > 0 (2: the published
    rev-quad grid). order: the multistep order, an int 0..3. fractions: None (the power-q grid
    r_i = i/(n-1)) or free grid nodes 0 = r_0 < ... < r_{n-1} = 1 in the power-q coordinate (then
    the setting is for n = len(fractions) NFE only). variant: the solver variant, one of VARIANTS.
    Values are checked and normalized (floats, int, tuple) on construction; a bad one raises
    ValueError naming the field.
    """

    T: float
    q: float = PUBLISHED_Q
    order: int = PUBLISHED_ORDER
    fractions: tuple[float, ...] | None = None
    variant: str = VARIANTS[0]

    def __post_init__(self) -> None:
        T = _real("T", self.T)
        if not 0 < T < 1:
            raise ValueError(f"T must be in (0, 1), got {self.T!r}")
        q = _real("q", self.q)
        if not q > 0:
            raise ValueError(f"q (the grid power) must be finite and > 0, got {self.q!r}")
        try:
            order = None if isinstance(self.order, bool) else operator.index(self.order)
        except TypeError:
            order = None
        if order is None or not 0 <= order <= 3:
            raise ValueError(f"order must be an int in 0..3, got {self.order!r}")
        fractions = None if self.fractions is None else check_fractions(self.fractions)
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name, value in (("T", T), ("q", q), ("order", order), ("fractions", fractions)):
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ grids

    def check(self, nfe: int, t0: float = 1e-5) -> None:
        """Raise ValueError unless this setting makes a grid of nfe points from t0 (t0 < T; nfe =
        len(fractions) when there are fractions)."""
        self.grid(nfe, t0)

    def grid(self, nfe: int, t0: float = 1e-5) -> torch.Tensor:
        """The nfe evaluation times from t0 to T, float64 [nfe] (psb_fast.grids.power_grid)."""
        return power_grid(nfe, t0, self.T, self.q, self.fractions)

    @property
    def grid_name(self) -> str | None:
        """The grid's name for `PhaseSampler(grid=...)` ("rev-quad" or "power-<q>"), or None for a
        free grid (it has no name: pass its times)."""
        return None if self.fractions is not None else grid_name(self.q)

    def sampler_kwargs(self, nfe: int | None = None, t0: float = 1e-5) -> dict:
        """PhaseSampler arguments T, order, grid (its name; for a free grid the times, which need nfe
        and t0) and variant: `PhaseSampler(bridge, nfe, **setting.sampler_kwargs(nfe))`."""
        if self.fractions is None:
            return {"T": self.T, "order": self.order, "grid": self.grid_name, "variant": self.variant}
        if nfe is None:
            raise ValueError("a setting with free grid fractions needs nfe (and t0) for its grid times")
        return {"T": self.T, "order": self.order, "grid": self.grid(nfe, t0), "variant": self.variant}

    def effective(self, nfe: int) -> Setting:
        """The same sampler at this NFE with the order lowered to the most it uses: step i of the
        nfe - 1 steps uses min(i, order) earlier outputs, so an order above nfe - 2 changes nothing."""
        order = min(self.order, max(nfe - 2, 0))
        return self if order == self.order else self.replace(order=order)

    def replace(self, **changes) -> Setting:
        """A copy with some fields changed (checked again)."""
        fields = {name: getattr(self, name) for name in JSON_KEYS}
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"Setting has no field(s) {sorted(unknown)}")
        return Setting(**{**fields, **changes})

    # ------------------------------------------------------------------ display and ordering

    @property
    def label(self) -> str:
        """A short description, e.g. "T 0.7, q 2, order 2" or "T 0.9062, q 1.25, order 2, free grid"."""
        text = f"T {self.T:.5g}, q {self.q:g}, order {self.order}"
        if self.fractions is not None:
            text += ", free grid"
        if self.variant != VARIANTS[0]:
            text += f", {self.variant}"
        return text

    def _key(self) -> tuple:
        return (self.T, self.q, self.order, self.fractions or (), self.variant)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Setting):
            return NotImplemented
        return self._key() < other._key()

    # ------------------------------------------------------------------ serialization

    def to_json(self) -> dict:
        """{"T", "q", "order", "fractions" (a list or None), "variant"}: plain JSON values."""
        fractions = None if self.fractions is None else list(self.fractions)
        return {"T": self.T, "q": self.q, "order": self.order, "fractions": fractions,
                "variant": self.variant}

    @classmethod
    def from_json(cls, data: Mapping, strict: bool = False) -> Setting:
        """A Setting from a JSON object: "T", "q", "order" required, "fractions" (list or null) and
        "variant" (default "multistep") optional, so a `psb_fast.tune` entry reads as it is. Other
        keys (a tune entry's "rmse", ...) are ignored, or with strict=True refused."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a setting must be a JSON object with keys T, q, order, got {data!r}")
        missing = [k for k in ("T", "q", "order") if k not in data]
        if missing:
            raise ValueError(f"a setting needs the keys 'T', 'q', 'order'; {missing} missing: {dict(data)!r}")
        unknown = sorted(set(data) - set(JSON_KEYS))
        if strict and unknown:
            raise ValueError(f"unknown setting key(s) {unknown}; expected {list(JSON_KEYS)}")
        variant = data.get("variant", VARIANTS[0])
        return cls(data["T"], data["q"], data["order"], data.get("fractions"), variant)

    def as_tuple(self) -> tuple:
        """The compact form of the studies' result files: (T, q, order), plus the fractions for a
        free grid (multistep variant only). `Setting.coerce` reads it back."""
        if self.variant != VARIANTS[0]:
            raise ValueError(f"the tuple form holds multistep settings only, not variant {self.variant!r}")
        return (self.T, self.q, self.order) + ((self.fractions,) if self.fractions is not None else ())

    @classmethod
    def coerce(cls, value: object) -> Setting:
        """A Setting from a Setting, a JSON object (`from_json`) or a sequence (T, q, order[,
        fractions or None]) (`as_tuple`, and lists read back from JSON)."""
        if isinstance(value, Setting):
            return value
        if isinstance(value, Mapping):
            return cls.from_json(value)
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and 3 <= len(value) <= 4:
            T, q, order, *rest = value
            return cls(T, q, order, rest[0] if rest else None)
        raise ValueError(
            f"a setting must be a Setting, a JSON object or (T, q, order[, fractions]), got {value!r}"
        )


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)
