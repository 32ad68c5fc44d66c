"""Relative error of Lvv, ell, AA and N(t) against the 50-digit oracle: naive float64 vs PhaseBridge.

"naive" evaluates the closed forms of docs/math.md §2.4 as written in float64 (Lvv = sqrt(Svv - Lxv^2),
AA = Lxx/tau + Lxv); "ours" is PhaseBridge.coefficients. The oracle
(psb_fast.reference.high_precision) solves the Lyapunov ODE by a 50-digit matrix exponential,
independent of the closed forms. Usage: python benchmarks/coefficient_accuracy.py
"""

from __future__ import annotations

import math

import mpmath as mp
import torch

from psb_fast import PhaseBridge
from psb_fast.reference.high_precision import coefficients_mp

TAUS = (1.0, 0.5, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
FIELDS = ("lvv", "ell", "AA", "normalizer")


def naive(bridge: PhaseBridge, t: float) -> dict[str, float]:
    """The closed forms in t (docs/math.md §2.4, §4.1), evaluated as written in float64."""
    p2, c, varx, varv = bridge.p**2, bridge.c, bridge.varx, bridge.varv
    tau = 1.0 - t
    L = math.log(tau)
    sxx = tau**2 * (
        30 * varx * (t**3 - 3 * t**2 + 3 * t + 3) ** 2 - 60 * p2 * (t - 1) ** 3 * L
        - t * (60 * c * (t**5 - 6 * t**4 + 15 * t**3 - 15 * t**2 + 9)
               - 30 * varv * t * (t**2 - 3 * t + 3) ** 2
               + p2 * (10 * t**5 - 60 * t**4 + 150 * t**3 - 200 * t**2 + 150 * t - 60))
    ) / 270
    sxv = tau / 270 * (
        30 * c * (8 * t**6 - 48 * t**5 + 120 * t**4 - 135 * t**3 + 45 * t**2 + 27 * t - 9)
        + 150 * p2 * (t - 1) ** 3 * L
        + t * (-120 * varx * (t**5 - 6 * t**4 + 15 * t**3 - 15 * t**2 + 9)
               - 30 * varv * (4 * t**5 - 24 * t**4 + 60 * t**3 - 75 * t**2 + 45 * t - 9)
               + p2 * (40 * t**5 - 240 * t**4 + 600 * t**3 - 770 * t**2 + 510 * t - 150))
    )
    svv = (
        varv * (-4 * t**3 + 12 * t**2 - 12 * t + 3) ** 2 / 9 - 8 * p2 * (t - 1) ** 3 * L / 9
        + t * (-120 * c * (4 * t**5 - 24 * t**4 + 60 * t**3 - 75 * t**2 + 45 * t - 9)
               + 240 * varx * t * (t**2 - 3 * t + 3) ** 2
               + p2 * (-80 * t**5 + 480 * t**4 - 1200 * t**3 + 1525 * t**2 - 975 * t + 255)) / 135
    )
    lxx = math.sqrt(sxx)
    lxv = sxv / lxx
    lvv = math.sqrt(max(svv - lxv**2, 0.0))
    ell = -1.0 / lvv if lvv > 0 else -math.inf
    g, P = bridge.p * tau, 4.0 / tau
    AA = lxx / tau + lxv
    normalizer = math.sqrt((P * AA) ** 2 + (P * lvv - 0.5 * g**2 * ell) ** 2) / tau
    return {"lvv": lvv, "ell": ell, "AA": AA, "normalizer": normalizer}


def rel(value: float, ref: mp.mpf) -> float:
    if not math.isfinite(value):
        return math.inf
    return float(abs((mp.mpf(value) - ref) / ref))


def main() -> None:
    bridge = PhaseBridge()
    print(f"{bridge}: relative error vs the 50-digit Lyapunov oracle (t = 1 - tau in float64)")
    print(f"{'tau':>7} " + " ".join(f"{f + ' naive':>17} {f + ' ours':>16}" for f in FIELDS))
    for tau in TAUS:
        t = 1.0 - tau
        ref = coefficients_mp(mp.mpf(t))
        ours = bridge.coefficients(torch.tensor(t, dtype=torch.float64))
        nv = naive(bridge, t)
        cells = [f"{rel(nv[f], ref[f]):>17.1e} {rel(float(getattr(ours, f)), ref[f]):>16.1e}" for f in FIELDS]
        print(f"{tau:>7.0e} " + " ".join(cells))


if __name__ == "__main__":
    main()
