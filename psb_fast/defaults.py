"""The per-NFE sampler defaults: the data file psb_fast/defaults.json, read and checked here.

`PhaseSampler(bridge, nfe)` (probability flow with the hop) takes T, order, grid and solver
variant from `default_setting(nfe)`. The file is data, written by one command from the defaults
study's results (never by hand; studies/ is in the repository, not in the package):

    python -m studies.make_defaults    # benchmarks/results/defaults_study/*.json -> psb_fast/defaults.json

Schema ("format": "psb_fast.defaults/2"):

    {"format": ..., "command": <the command above>, "about": <text>,
     "stages": {<stage>: {"results", "command", "problems", "scores": <what the numbers are>}},
     "entries": {"<nfe>": {
         "setting": {"T", "q", "order", "fractions" (list or null), "variant"},   # psb_fast.settings.Setting
         "source": "tuned" | "published",        # published: equal to published_setting(nfe)
         "stage": "search",                      # the study stage that chose the setting
         "pick": <how, e.g. "searched", "interpolated", "interpolated (alternate)", "fallback: published">,
         "scores": {"search": {...}, "validate": [...], "trained": [...]}}}}

Stages (studies/defaults_study.py): "search" scores candidates at anchor NFEs on generated
exact-drift problems of the tune split; "validate" checks each NFE's pick and its alternate on the
validate split; "trained" checks them on trained models. Entries cover NFE 1..N without gaps; an
NFE above N uses entry N's T, q, order and variant on the power-q grid. A "published" entry must
equal published_setting(nfe) (T to 1e-9, the rest exactly) and then is that setting exactly (T =
published_T(nfe), e.g. 0.8200000000000001 at NFE 16, stored as 0.82). The file is checked when
read: a malformed one raises ValueError naming the entry and the field.
"""

from __future__ import annotations

import copy
import json
import math
import os
from functools import lru_cache
from pathlib import Path

import torch

from . import grids
from .settings import Setting, published_setting

FORMAT = "psb_fast.defaults/2"
PATH = Path(__file__).with_name("defaults.json")
SOURCES = ("tuned", "published")
STAGES = ("search",)
ENTRY_KEYS = ("setting", "source", "stage", "pick", "scores")


def default_setting(nfe: int) -> Setting:
    """The default setting for this NFE (an int >= 1); above the last entry, its T, q and order on
    the power-q grid."""
    entry = default_entry(nfe)
    setting = entry["setting"]
    return setting if entry["nfe"] == nfe else setting.replace(fractions=None)


def default_entry(nfe: int) -> dict:
    """The defaults file's entry for this NFE: {"nfe" (the entry's NFE: min(nfe, last)), "setting"
    (a Setting), "source", "stage", "pick", "scores"} (a copy; module docstring)."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an int >= 1, got {nfe!r}")
    entries = _package_defaults()
    n = min(nfe, max(entries))
    return {"nfe": n, **copy.deepcopy(entries[n])}


def tuned_grid(nfe: int, t0: float, T: float) -> torch.Tensor:
    """The default grid for this NFE (its q and fractions) mapped to [t0, T], float64 [nfe]."""
    return default_setting(nfe).replace(T=T).grid(nfe, t0)


def make_grid(name: str, n: int, t0: float, T: float) -> torch.Tensor:
    """`psb_fast.grids.make_grid` with "tuned" too: the n times of the named grid, float64 [n]."""
    if grids.parse_grid(name)[0] == "tuned":
        return tuned_grid(n, t0, T)
    return grids.make_grid(name, n, t0, T)


def load_defaults(path: str | os.PathLike = PATH) -> dict[int, dict]:
    """Read and check a defaults file: {nfe: entry} with each entry's "setting" a Setting."""
    try:
        with open(path, encoding="utf-8") as fh:
            payload = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return check_defaults(payload, str(path))


def check_defaults(payload: object, where: str = "defaults") -> dict[int, dict]:
    """Check a defaults payload (module docstring) and return {nfe: entry} with Settings."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{where}: expected a JSON object with \"format\": {FORMAT!r}")
    raw = payload.get("entries")
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{where}: 'entries' must be a non-empty object mapping NFE -> entry")
    if not all(isinstance(k, str) and k.isdigit() and k == str(int(k)) for k in raw):
        raise ValueError(f"{where}: entry keys must be NFEs written as integers, got {sorted(raw)}")
    nfes = sorted(int(k) for k in raw)
    if nfes != list(range(1, len(nfes) + 1)):
        raise ValueError(f"{where}: entries must cover NFE 1..N without gaps, got {nfes}")
    return {nfe: _check_entry(raw[str(nfe)], nfe, f"{where}: NFE {nfe}") for nfe in nfes}


def _check_entry(entry: object, nfe: int, where: str) -> dict:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: an entry must be a JSON object, got {entry!r}")
    missing = [k for k in ("setting", "source", "stage") if k not in entry]
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if missing or unknown:
        raise ValueError(f"{where}: entry keys must be {list(ENTRY_KEYS)} (setting, source and stage "
                         f"required); missing {missing}, unknown {unknown}")
    try:
        setting = Setting.from_json(entry["setting"], strict=True)
        setting.check(nfe, 0.0)
    except ValueError as err:
        raise ValueError(f"{where}: setting: {err}") from None
    if entry["source"] not in SOURCES:
        raise ValueError(f"{where}: source must be one of {SOURCES}, got {entry['source']!r}")
    if entry["stage"] not in STAGES:
        raise ValueError(f"{where}: stage must be one of {STAGES}, got {entry['stage']!r}")
    if "pick" in entry and not isinstance(entry["pick"], str):
        raise ValueError(f"{where}: pick must be a string, got {entry['pick']!r}")
    if "scores" in entry and not isinstance(entry["scores"], dict):
        raise ValueError(f"{where}: scores must be an object, got {entry['scores']!r}")
    if entry["source"] == "published":
        published = published_setting(nfe)
        if not (math.isclose(setting.T, published.T, rel_tol=0, abs_tol=1e-9)
                and setting.replace(T=published.T) == published):
            raise ValueError(f"{where}: source 'published' needs the published setting "
                             f"({published.label}, power grid), got {setting.label}")
        setting = published
    return {**entry, "setting": setting}


@lru_cache(maxsize=1)
def _package_defaults() -> dict[int, dict]:
    return load_defaults(PATH)
