"""Sampler settings: the one `Setting` type, the end time T_END, the published settings and the
tuned-settings files (`save_tuned`, `load_tuned`: what `psb_fast.tune` writes and
`PhaseSampler.from_tuned` reads).

A `Setting` is what the probability-flow sampler needs besides the NFE and t0: the hop time T,
the grid power q with optional free grid fractions (psb_fast.grids), the solver order and the
solver variant. The package defaults (psb_fast/defaults.json, read by psb_fast.defaults), a
`psb_fast.tune` result, the tuning studies (studies/) and `published_setting(nfe)` are all
Settings; every check on T, q, order and fractions happens here (and in psb_fast.grids).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import total_ordering

import torch

from . import checks
from .files import read_json
from .grids import check_fractions, grid_name, power_grid
from .multistep import MAX_ORDER
from .variants import VARIANTS

#: End time of sampling without the hop, and of the exact and high-NFE reference solutions.
T_END = 0.999
#: Published settings (AGM, CIFAR-10 with hop): NFE -> T; order 2 on the rev-quad grid (q = 2).
PUBLISHED_T = {5: 0.4, 10: 0.7, 20: 0.9}
PUBLISHED_Q = 2.0
PUBLISHED_ORDER = 2
#: Keys of a setting's JSON object (`Setting.to_json`).
JSON_KEYS = ("T", "q", "order", "fractions", "variant")
#: Format tag of the tuned-settings files (`save_tuned`).
TUNED_FORMAT = "psb_fast.tuned/1"


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
        T = checks.number("T", self.T)
        if not 0 < T < 1:
            raise ValueError(f"T must be in (0, 1), got {self.T!r}")
        q = checks.number("q", self.q)
        if not q > 0:
            raise ValueError(f"q (the grid power) must be finite and > 0, got {self.q!r}")
        order = checks.count("order", self.order, 0, MAX_ORDER)
        fractions = None if self.fractions is None else check_fractions(self.fractions)
        checks.choice("variant", self.variant, VARIANTS)
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


# ----------------------------------------------------------------------------- tuned-settings files


def save_tuned(result: Mapping[int, dict], path: str | os.PathLike) -> None:
    """Write a `psb_fast.tune` result as JSON ({"format", "settings": {"<nfe>": {...}}})."""
    settings = _check_tuned(result, str(path))
    payload = {"format": TUNED_FORMAT, "settings": {str(n): settings[n] for n in sorted(settings)}}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1)
        fh.write("\n")


def load_tuned(path: str | os.PathLike) -> dict[int, dict]:
    """Read a file written by `save_tuned`: {nfe: {"T", "q", "order"[, "fractions"], ...}}.

    Raises ValueError naming the file and the problem if it is not UTF-8 JSON (psb_fast.files), if
    two keys name one NFE ("10" and "010"), or if a setting is malformed (NFE not an int >= 1
    written in digits, T not in (0, 1), q not finite > 0, order not an int in 0..3, fractions not
    nfe numbers rising strictly from 0 to 1, variant unknown): `Setting.from_json` checks each
    entry. `PhaseSampler.from_tuned` maps an entry to its sampler.
    """
    payload = read_json(path, "tuned-settings file")
    if not isinstance(payload, dict) or payload.get("format") != TUNED_FORMAT:
        raise ValueError(f"{path}: expected a JSON object with format {TUNED_FORMAT!r}")
    settings = payload.get("settings")
    if not isinstance(settings, dict) or not settings:
        raise ValueError(f"{path}: 'settings' must be a non-empty object mapping NFE -> setting")
    parsed: dict[int, dict] = {}
    spelled: dict[int, str] = {}
    for key, value in settings.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ValueError(f"{path}: NFE key {key!r} is not an integer written in digits")
        nfe = int(key)
        if nfe in parsed:
            raise ValueError(f"{path}: NFE keys {spelled[nfe]!r} and {key!r} both mean NFE {nfe}; keep one")
        parsed[nfe], spelled[nfe] = value, key
    return _check_tuned(parsed, str(path))


def _check_tuned(result: object, where: str) -> dict[int, dict]:
    if not isinstance(result, Mapping) or not result:
        raise ValueError(f"{where}: tuned settings must be a non-empty dict NFE -> setting")
    out = {}
    for nfe, entry in result.items():
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"{where}: NFE must be an int >= 1, got {nfe!r}")
        if not isinstance(entry, dict) or not {"T", "q", "order"} <= set(entry):
            raise ValueError(f"{where}: NFE {nfe}: each setting needs keys 'T', 'q', 'order', got {entry!r}")
        try:
            setting = Setting.from_json(entry)
            setting.check(nfe, 0.0)
        except ValueError as err:
            raise ValueError(f"{where}: NFE {nfe}: {err}") from None
        clean = {k: v for k, v in entry.items() if k not in ("T", "q", "order", "fractions")}
        if setting.fractions is not None:
            clean["fractions"] = list(setting.fractions)
        out[nfe] = {"T": setting.T, "q": setting.q, "order": setting.order, **clean}
    return out
