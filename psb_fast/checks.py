"""Argument checks of scalars, bools and ints, shared by the whole package (the sampler, settings,
grids, ops, tuning, learn, likelihood, data, models, oracles): each returns the checked value or
raises one ValueError or TypeError that names the argument, the bad value and what was expected.

    count(name, value, lo, hi)     an int in [lo, hi] (hi None: >= lo), bools refused
    flag(name, value)              a bool
    choice(name, value, choices)   one of a tuple of names
    finite(name, value)            a finite float (a real number or a one-element real tensor)
    number(name, value)            a finite float from a real number only (settings, grids: ValueError)
    step_size(name, value)         a finite float >= 0
    interval(name, value, lo, hi)  a finite float in an interval (open or closed at each end)
    finite_list(name, values)      a sequence or 1-D tensor of finite numbers as a list of floats

The ops' tensor checks (storage dtype, autograd, overlap) are in psb_fast.backends; seeds are
checked by psb_fast.seeds.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from numbers import Real

import torch

from .backends import real_scalar


def count(name: str, value: object, lo: int, hi: int | None = None) -> int:
    """value as an int in [lo, hi] (hi None: no upper bound): a Python/NumPy int or an integer
    one-element tensor, not a bool. ValueError otherwise."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < lo or (hi is not None and number > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an int {'in ' if hi is not None else ''}{bound}, got {value!r}")
    return number


def flag(name: str, value: object) -> bool:
    """value, which must be a bool (TypeError otherwise: 0/1 or "yes" are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def choice(name: str, value: object, choices: Sequence[str]) -> str:
    """value, which must be one of `choices` (ValueError naming them otherwise)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def finite(name: str, value: object) -> float:
    """value as a finite float: a real number or a one-element real tensor (TypeError for other
    types, ValueError for NaN or Inf)."""
    number = real_scalar(name, value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def number(name: str, value: object) -> float:
    """value as a finite float from a Python/NumPy real number (not a bool, not a tensor): the
    values of a setting or a grid, where any other value is a ValueError."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def step_size(name: str, value: object) -> float:
    """value as a finite float >= 0 (`finite`, then ValueError below 0)."""
    h = finite(name, value)
    if h < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {h}")
    return h


def interval(name: str, value: object, lo: float, hi: float, *, open_lo: bool = False,
             open_hi: bool = True) -> float:
    """value as a float in [lo, hi) by default (open_lo, open_hi: which ends are excluded), which
    also makes it finite (`finite`'s types; ValueError naming the interval otherwise)."""
    x = real_scalar(name, value)
    above = x > lo if open_lo else x >= lo
    below = x < hi if open_hi else x <= hi
    if not (math.isfinite(x) and above and below):
        left, right = "(" if open_lo else "[", ")" if open_hi else "]"
        raise ValueError(f"{name} must be in {left}{lo:g}, {hi:g}{right}, got {x}")
    return x


def finite_list(name: str, values: object) -> list[float]:
    """A sequence (or 1-D tensor) of finite numbers as a list of floats (`finite` per entry,
    named name[j])."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        values = values.tolist()
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    return [finite(f"{name}[{j}]", c) for j, c in enumerate(values)]

