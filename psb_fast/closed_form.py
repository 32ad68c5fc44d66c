"""Exact closed forms of the phase-bridge covariance, re-expanded in tau = 1 - t.

docs/math.md §2.4 gives Sigma(t) as polynomials in t plus log(tau) terms. Evaluated as written they
lose every digit of det(Sigma) and of Sxx + tau*Sxv near t -> 1 (both vanish like a high
power of tau while their parts stay O(1)). Here those formulas are transcribed
literally, then expanded *exactly* (rational arithmetic) in powers of tau and L = log(tau),
with the parameters varx, varv, c, p^2 kept symbolic (docs/math.md §3.2, §3.3). Products such as
det = Sxx*Svv - Sxv^2 are formed on the exact expansions, so the cancelling low powers of
tau disappear exactly before any floating-point number is involved.

A `Poly` maps exponent tuples (varx, varv, c, p2, tau, L) to `Fraction` coefficients.
`collapse` binds the parameters and returns {(tau power, L power): float} for evaluation.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

_NVARS = 6
_VARX, _VARV, _C, _P2, _TAU, _L = range(_NVARS)


class Poly:
    """Sparse multivariate polynomial with exact rational coefficients."""

    __slots__ = ("terms",)

    def __init__(self, terms: dict[tuple[int, ...], Fraction] | None = None) -> None:
        self.terms = {k: v for k, v in (terms or {}).items() if v != 0}

    @staticmethod
    def const(value: int | Fraction) -> Poly:
        return Poly({(0,) * _NVARS: Fraction(value)})

    @staticmethod
    def var(index: int) -> Poly:
        exps = [0] * _NVARS
        exps[index] = 1
        return Poly({tuple(exps): Fraction(1)})

    @staticmethod
    def _lift(other: Poly | int | Fraction) -> Poly:
        return other if isinstance(other, Poly) else Poly.const(other)

    def __add__(self, other: Poly | int | Fraction) -> Poly:
        out = dict(self.terms)
        for k, v in Poly._lift(other).terms.items():
            out[k] = out.get(k, Fraction(0)) + v
        return Poly(out)

    __radd__ = __add__

    def __neg__(self) -> Poly:
        return Poly({k: -v for k, v in self.terms.items()})

    def __sub__(self, other: Poly | int | Fraction) -> Poly:
        return self + (-Poly._lift(other))

    def __rsub__(self, other: Poly | int | Fraction) -> Poly:
        return Poly._lift(other) - self

    def __mul__(self, other: Poly | int | Fraction) -> Poly:
        out: dict[tuple[int, ...], Fraction] = {}
        for ka, va in self.terms.items():
            for kb, vb in Poly._lift(other).terms.items():
                k = tuple(a + b for a, b in zip(ka, kb, strict=True))
                out[k] = out.get(k, Fraction(0)) + va * vb
        return Poly(out)

    __rmul__ = __mul__

    def __truediv__(self, other: int) -> Poly:
        return Poly({k: v / other for k, v in self.terms.items()})

    def __pow__(self, n: int) -> Poly:
        out = Poly.const(1)
        for _ in range(n):
            out = out * self
        return out


@lru_cache(maxsize=2)
def covariance_polys(variable: str = "tau") -> dict[str, Poly]:
    """Closed forms of Sxx, Sxv, Svv (docs/math.md §2.4) and the derived exact expansions.

    variable: "tau" expands in powers of tau = 1 - t (exact cancellation as t -> 1);
    "t" expands in powers of t (exact cancellation as t -> 0, e.g. det Sigma0 when p^2 is
    much larger than it). The expansion variable sits in the tau slot of the exponents.
    Returns polys for "sxx", "sxv", "svv", "det" (= Sxx Svv - Sxv^2) and
    "aa_num" (= Sxx + tau Sxv, so that AA = Lxx/tau + Lxv = aa_num / (tau Lxx)).
    """
    if variable not in ("tau", "t"):
        raise ValueError(f"variable must be 'tau' or 't', got {variable!r}")
    varx, varv, c, p2 = (Poly.var(i) for i in (_VARX, _VARV, _C, _P2))
    L = Poly.var(_L)
    if variable == "tau":
        tau = Poly.var(_TAU)
        t = 1 - tau
    else:
        t = Poly.var(_TAU)
        tau = 1 - t
    sxx = tau**2 * (
        30 * varx * (t**3 - 3 * t**2 + 3 * t + 3) ** 2
        - 60 * p2 * (t - 1) ** 3 * L
        - t * (
            60 * c * (t**5 - 6 * t**4 + 15 * t**3 - 15 * t**2 + 9)
            - 30 * varv * t * (t**2 - 3 * t + 3) ** 2
            + p2 * (10 * t**5 - 60 * t**4 + 150 * t**3 - 200 * t**2 + 150 * t - 60)
        )
    ) / 270
    sxv = tau * (
        30 * c * (8 * t**6 - 48 * t**5 + 120 * t**4 - 135 * t**3 + 45 * t**2 + 27 * t - 9)
        + 150 * p2 * (t - 1) ** 3 * L
        + t * (
            -120 * varx * (t**5 - 6 * t**4 + 15 * t**3 - 15 * t**2 + 9)
            - 30 * varv * (4 * t**5 - 24 * t**4 + 60 * t**3 - 75 * t**2 + 45 * t - 9)
            + p2 * (40 * t**5 - 240 * t**4 + 600 * t**3 - 770 * t**2 + 510 * t - 150)
        )
    ) / 270
    svv = (
        varv * (-4 * t**3 + 12 * t**2 - 12 * t + 3) ** 2 / 9
        - 8 * p2 * (t - 1) ** 3 * L / 9
        + t * (
            -120 * c * (4 * t**5 - 24 * t**4 + 60 * t**3 - 75 * t**2 + 45 * t - 9)
            + 240 * varx * t * (t**2 - 3 * t + 3) ** 2
            + p2 * (-80 * t**5 + 480 * t**4 - 1200 * t**3 + 1525 * t**2 - 975 * t + 255)
        )
        / 135
    )
    return {
        "sxx": sxx,
        "sxv": sxv,
        "svv": svv,
        "det": sxx * svv - sxv * sxv,
        "aa_num": sxx + tau * sxv,
    }


def collapse(
    poly: Poly, varx: float, varv: float, c: float, p2: float
) -> dict[tuple[int, int], float]:
    """Bind the parameters: {(variable power, L power): float coefficient}, zero terms dropped."""
    params = (Fraction(varx), Fraction(varv), Fraction(c), Fraction(p2))
    out: dict[tuple[int, int], Fraction] = {}
    for k, v in poly.terms.items():
        term = v
        for value, e in zip(params, k[:4], strict=True):
            term *= value**e
        key = (k[_TAU], k[_L])
        out[key] = out.get(key, Fraction(0)) + term
    return {k: float(v) for k, v in sorted(out.items()) if v != 0}
