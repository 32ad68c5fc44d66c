"""High-precision oracle for Sigma(t), independent of the closed forms (docs/math.md §2.3, §2.4).

The Lyapunov ODE dSigma/dt = A Sigma + Sigma A^T + diag(0, g^2) is rewritten in log-time
s = -log(tau) with X = Sxx/tau^2, Y = Sxv/tau, Z = Svv, where it becomes linear with
constant coefficients and forcing p^2 e^{-3s}:

    X' = 2X + 2Y,   Y' = Z - 4X - 3Y,   Z' = -8Y - 8Z + p^2 e^{-3s}.

Appending the forcing w = p^2 e^{-3s} (w' = -3w) as a fourth state gives a homogeneous
system solved exactly by a 50-digit matrix exponential (mpmath). Quantities that cancel
in float64 (det Sigma, Svv - Sxv^2/Sxx, Lxx/tau + Lxv) are formed at 50 digits.
"""

try:
    import mpmath as mp
except ImportError as exc:  # mpmath ships with the dev extra
    raise ImportError("psb_fast.reference.high_precision needs mpmath: pip install -e \".[dev]\"") from exc

DPS = 50  # working precision in decimal digits


def sigma_mp(t, p=3.0, k=0.2, varx=1.0, varv=1.0):
    """(tau, Sxx, Sxv, Svv) at t as mpf, from the log-time matrix exponential."""
    with mp.workdps(DPS):
        t = mp.mpf(t)
        tau = 1 - t
        s = -mp.log(tau)
        c = mp.mpf(k) * mp.sqrt(mp.mpf(varx) * mp.mpf(varv))
        M = mp.matrix([[2, 2, 0, 0], [-4, -3, 1, 0], [0, -8, -8, 1], [0, 0, 0, -3]])
        y0 = mp.matrix([mp.mpf(varx), -c, mp.mpf(varv), mp.mpf(p) ** 2])
        y = mp.expm(M * s) * y0
        return tau, y[0] * tau**2, y[1] * tau, y[2]


def coefficients_mp(t, p=3.0, k=0.2, varx=1.0, varv=1.0, mode="probODE"):
    """Dict of the cancellation-prone coefficients at 50 digits."""
    with mp.workdps(DPS):
        tau, sxx, sxv, svv = sigma_mp(t, p, k, varx, varv)
        lxx = mp.sqrt(sxx)
        lxv = sxv / lxx
        lvv = mp.sqrt(svv - lxv**2)
        ell = -1 / lvv
        g = mp.mpf(p) * tau
        P = 4 / tau
        AA = lxx / tau + lxv
        n_vv = P * lvv - g**2 * ell / 2 if mode == "probODE" else P * lvv
        normalizer = mp.sqrt((P * AA) ** 2 + n_vv**2) / tau
        return {"sxx": sxx, "sxv": sxv, "svv": svv, "lxx": lxx, "lxv": lxv, "lvv": lvv,
                "ell": ell, "AA": AA, "normalizer": normalizer}
