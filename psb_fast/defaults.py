"""The sampler defaults: one smooth rule of the NFE, stored as data in psb_fast/defaults.json.

`PhaseSampler(bridge, nfe)` (probability flow with the hop) takes T, order, grid and solver
variant from `default_setting(nfe)`, for every NFE >= 1. The rule has few parameters, fitted by
the defaults study and written by one command (never by hand; studies/ is in the repository, not
in the package):

    python -m studies.make_defaults    # benchmarks/results/defaults_study/*.json -> psb_fast/defaults.json

The rule (docs of the fit: studies/defaults_study.py):

    hop time      1 - T = clip(a * nfe^-b, tau_min, tau_max)      (rounded to 6 decimals)
    grid          the power-q grid from t0 to T (q fixed; q = 1 is uniform in t)
    order         orders[i] for from_nfe[i] <= nfe < from_nfe[i + 1], lowered to what the NFE
                  can use (`Setting.effective`: at most nfe - 2 earlier outputs)
    variant       one solver variant for every NFE

so the setting changes smoothly with the NFE (only the order steps, where the higher order was
measured to be better) and no NFE falls back to another family of settings.

Schema ("format": "psb_fast.defaults/3"):

    {"format": ..., "command": <the command above>, "about": <text>,
     "rule": {"variant": str, "q": float,
              "tau": {"a": float, "b": float, "min": float, "max": float},
              "order": {"from_nfe": [1, n2, ...] (increasing ints, first 1), "orders": [int 0..3, ...]}},
     "provenance": {<stage>: {"results", "command", "problems", ...}},
     "scores": {"fit": {...}, "validate": {"<nfe>": {...}}, "trained": {"<nfe>": {...}}, "test": {...}}}

The file is checked when read: a malformed one raises ValueError naming the field.
"""

from __future__ import annotations

import copy
import math
import os
from functools import lru_cache
from numbers import Real
from pathlib import Path

import torch

from .files import read_json
from .settings import VARIANTS, Setting

FORMAT = "psb_fast.defaults/3"
PATH = Path(__file__).with_name("defaults.json")
KEYS = ("format", "command", "about", "rule", "provenance", "scores")
TAU_DECIMALS = 6


def default_setting(nfe: int) -> Setting:
    """The default setting for this NFE (an int >= 1): the rule of psb_fast/defaults.json."""
    return rule_setting(_package_defaults()["rule"], nfe)


def default_entry(nfe: int) -> dict:
    """{"nfe", "setting" (a Setting), "source": "rule", "stage": "fit", "pick" (the rule in words),
    "scores" (the file's scores recorded at this NFE, by stage; may be empty)} (a copy)."""
    setting = default_setting(nfe)
    payload = _package_defaults()
    scores = {stage: copy.deepcopy(rec[str(nfe)]) for stage, rec in payload["scores"].items()
              if isinstance(rec, dict) and isinstance(rec.get(str(nfe)), dict)}
    return {"nfe": nfe, "setting": setting, "source": "rule", "stage": "fit",
            "pick": describe_rule(payload["rule"]), "scores": scores}


def rule_setting(rule: dict, nfe: int) -> Setting:
    """The setting a checked rule (module docstring) gives at this NFE."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an int >= 1, got {nfe!r}")
    tau = rule["tau"]
    hop = min(max(tau["a"] * nfe ** -tau["b"], tau["min"]), tau["max"])
    T = round(1.0 - hop, TAU_DECIMALS)
    order_rule = rule["order"]
    order = order_rule["orders"][sum(n <= nfe for n in order_rule["from_nfe"]) - 1]
    return Setting(T, rule["q"], order, None, rule["variant"]).effective(nfe)


def describe_rule(rule: dict) -> str:
    """The rule in one line, e.g. "data-corrector, q 1, 1 - T = clip(1.2 nfe^-0.8, 0.01, 0.6), order
    1 from NFE 1, 2 from NFE 6"."""
    tau, order = rule["tau"], rule["order"]
    steps = ", ".join(f"{o} from NFE {n}" for n, o in zip(order["from_nfe"], order["orders"], strict=True))
    return (f"{rule['variant']}, q {rule['q']:g}, 1 - T = clip({tau['a']:.4g} nfe^-{tau['b']:.4g}, "
            f"{tau['min']:g}, {tau['max']:g}), order {steps}")


def tuned_grid(nfe: int, t0: float, T: float) -> torch.Tensor:
    """The default grid for this NFE (its power q) mapped to [t0, T], float64 [nfe]."""
    return default_setting(nfe).replace(T=T).grid(nfe, t0)


def load_defaults(path: str | os.PathLike = PATH) -> dict:
    """Read and check a defaults file; returns its payload (module docstring)."""
    return check_defaults(read_json(path, "defaults file"), str(path))


def check_defaults(payload: object, where: str = "defaults") -> dict:
    """Check a defaults payload (module docstring) and return it."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{where}: expected a JSON object with \"format\": {FORMAT!r}")
    missing = [k for k in KEYS if k not in payload]
    unknown = sorted(set(payload) - set(KEYS))
    if missing or unknown:
        raise ValueError(f"{where}: keys must be {list(KEYS)}; missing {missing}, unknown {unknown}")
    for key in ("provenance", "scores"):
        if not isinstance(payload[key], dict):
            raise ValueError(f"{where}: {key} must be an object, got {payload[key]!r}")
    check_rule(payload["rule"], f"{where}: rule")
    return payload


def check_rule(rule: object, where: str = "rule") -> None:
    """Raise ValueError naming the field unless `rule` is a valid rule (module docstring)."""
    if not isinstance(rule, dict) or set(rule) != {"variant", "q", "tau", "order"}:
        got = sorted(rule) if isinstance(rule, dict) else rule
        raise ValueError(f"{where}: must be an object with keys variant, q, tau, order, got {got!r}")
    if rule["variant"] not in VARIANTS:
        raise ValueError(f"{where}: variant must be one of {VARIANTS}, got {rule['variant']!r}")
    if not _finite(rule["q"]) or not rule["q"] > 0:
        raise ValueError(f"{where}: q must be a finite number > 0, got {rule['q']!r}")
    tau = rule["tau"]
    if not isinstance(tau, dict) or set(tau) != {"a", "b", "min", "max"}:
        raise ValueError(f"{where}: tau must be an object with keys a, b, min, max, got {tau!r}")
    for key in ("a", "b", "min", "max"):
        if not _finite(tau[key]):
            raise ValueError(f"{where}: tau.{key} must be a finite number, got {tau[key]!r}")
    if not (tau["a"] > 0 and tau["b"] >= 0 and 0 < tau["min"] <= tau["max"] < 1):
        raise ValueError(f"{where}: tau needs a > 0, b >= 0 and 0 < min <= max < 1, got {tau}")
    order = rule["order"]
    if not isinstance(order, dict) or set(order) != {"from_nfe", "orders"}:
        raise ValueError(f"{where}: order must be an object with keys from_nfe, orders, got {order!r}")
    starts, orders = order["from_nfe"], order["orders"]
    ints = isinstance(starts, list) and isinstance(orders, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in starts + orders)
    if not ints or not starts or len(starts) != len(orders) or starts[0] != 1 or any(
            b <= a for a, b in zip(starts, starts[1:], strict=False)) or any(not 0 <= o <= 3 for o in orders):
        raise ValueError(f"{where}: order.from_nfe must be increasing ints starting at 1 and order.orders "
                         f"as many ints in 0..3, got {order!r}")


def _finite(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


@lru_cache(maxsize=1)
def _package_defaults() -> dict:
    return load_defaults(PATH)
