"""PhaseBridge: the per-t coefficients of the phase stochastic bridge (docs/math.md §2, §3, §4).

Every per-t number the package uses (means, Cholesky factor, score scale, normalizer, label
and hop coefficients) is computed here, in float64, from the exact tau-expansions of
`closed_form`. Kernels, the reference and the samplers read them from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .backends import real_scalar
from .closed_form import collapse, covariance_polys

MODES = ("probODE", "SDE")
# Accepted parameter ranges (closed). The float64 math breaks far outside them: the exact
# expansions of det Sigma carry p^4 terms, which overflow float64 (OverflowError) from
# p ~ 6.9e76, and with extreme variances and |k| -> 1 the normalizer overflows from p ~ 1e50
# (e.g. varx = 1e100, varv = 1e-100). Inside the box every coefficient is finite with
# Lvv > 0 for all t in [0, 1), down to tau = 2^-53 (checked at its corners, k up to 1 - 2^-53).
P_RANGE = (1e-30, 1e30)
VAR_RANGE = (1e-60, 1e60)


@dataclass(frozen=True)
class Coefficients:
    """Per-t coefficients, float64 tensors of t's shape (symbols of docs/math.md §4.1).

    cx, cv: mean of (x_t, v_t) given x1 is (cx x1, cv x1).
    sxx, sxv, svv: covariance Sigma(t); lxx, lxv, lvv: its lower Cholesky factor.
    ell = -1/Lvv (grad_v log p(m | x1) = ell eps_v); g = p tau; P = 4/tau.
    AA = Lxx/tau + Lxv; normalizer = N(t) of the model's mode.
    label_x1, label_eps_x, label_eps_v: label = label_x1 x1 + label_eps_x eps_x
        + label_eps_v eps_v (docs/math.md §5.2, already divided by N).
    hop_aa, hop_bb: the hop's aa, bb (docs/math.md §8.1); hop_den = 4 tau^2 + P (aa cx + bb cv).
    """

    tau: torch.Tensor
    cx: torch.Tensor
    cv: torch.Tensor
    sxx: torch.Tensor
    sxv: torch.Tensor
    svv: torch.Tensor
    lxx: torch.Tensor
    lxv: torch.Tensor
    lvv: torch.Tensor
    ell: torch.Tensor
    g: torch.Tensor
    P: torch.Tensor
    AA: torch.Tensor
    normalizer: torch.Tensor
    label_x1: torch.Tensor
    label_eps_x: torch.Tensor
    label_eps_v: torch.Tensor
    hop_aa: torch.Tensor
    hop_bb: torch.Tensor
    hop_den: torch.Tensor

    def to(self, dtype: torch.dtype) -> Coefficients:
        """All fields cast to `dtype` (e.g. for float32 element math)."""
        return Coefficients(**{f.name: getattr(self, f.name).to(dtype) for f in fields(self)})


def check_t(t: torch.Tensor | float, name: str = "t") -> torch.Tensor:
    """Validate a time in [0, 1): finite, in range. Returns it as a float64 tensor."""
    if not isinstance(t, torch.Tensor):
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"{name} must be a float or a tensor, got {type(t).__name__}")
        t = torch.tensor(float(t), dtype=torch.float64)
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a real tensor, got dtype {t.dtype}")
    t64 = t.detach().to(torch.float64)
    bad = ~torch.isfinite(t64) | (t64 < 0) | (t64 >= 1)
    if bool(bad.any()):
        value = t64[bad].flatten()[0].item()
        raise ValueError(f"{name} must be finite and in [0, 1), got {value}")
    return t64


def _evaluate(terms: dict[tuple[int, int], float], z: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """sum_jb C_jb z^j L^b for an exact expansion in z (tau or t) and L = log(tau)."""
    acc = torch.zeros_like(z)
    for (j, b), coef in terms.items():
        acc = acc + coef * z**j * L**b
    return acc


# Below this t the expansion in t is used, above it the expansion in tau: each is free of
# cancellation on its side (det Sigma -> det Sigma0 as t -> 0, det ~ tau^5 as t -> 1).
T_SWITCH = 0.5


class PhaseBridge:
    """The phase stochastic bridge with prior N(0, Sigma0) and diffusion g(t) = p (1 - t).

    Args:
        p: diffusion scale, in P_RANGE = [1e-30, 1e30]. k: prior x-v correlation is -k
            (|k| < 1). varx, varv: prior variances, in VAR_RANGE = [1e-60, 1e60].
            mode: "probODE" (default) or "SDE".
    Numbers may be Python/NumPy reals or one-element real tensors. Raises TypeError for
    other types and ValueError (naming the parameter) for values outside these ranges.
    """

    def __init__(
        self,
        p: float = 3.0,
        k: float = 0.2,
        varx: float = 1.0,
        varv: float = 1.0,
        mode: str = "probODE",
    ) -> None:
        p, k = _parameter("p", p), _parameter("k", k)
        varx, varv = _parameter("varx", varx), _parameter("varv", varv)
        ranges = (("p", p, P_RANGE), ("varx", varx, VAR_RANGE), ("varv", varv, VAR_RANGE))
        for name, value, (lo, hi) in ranges:
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
            if not lo <= value <= hi:
                raise ValueError(
                    f"{name} must be in [{lo:g}, {hi:g}] (the range in which the coefficients are "
                    f"checked finite), got {value}"
                )
        if not abs(k) < 1:
            raise ValueError(f"k must satisfy |k| < 1, got {k}")
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.p, self.k, self.mode = float(p), float(k), mode
        self.varx, self.varv = float(varx), float(varv)
        self.c = self.k * math.sqrt(self.varx * self.varv)
        args = (self.varx, self.varv, self.c, self.p**2)
        self._terms = {
            variable: {name: collapse(poly, *args) for name, poly in covariance_polys(variable).items()}
            for variable in ("tau", "t")
        }

    def __repr__(self) -> str:
        return (
            f"PhaseBridge(p={self.p}, k={self.k}, varx={self.varx}, varv={self.varv}, "
            f"mode={self.mode!r})"
        )

    def key(self) -> tuple:
        """Hashable identity of the bridge (for caches)."""
        return (self.p, self.k, self.varx, self.varv, self.mode)

    def coefficients(self, t: torch.Tensor | float) -> Coefficients:
        """All per-t coefficients in float64, on t's device, of t's shape.

        Raises ValueError if any t is outside [0, 1), NaN or Inf.
        """
        t = check_t(t)
        tau = 1.0 - t
        L = torch.log(tau)
        near_zero = t < T_SWITCH

        def expanded(name: str) -> torch.Tensor:
            return torch.where(
                near_zero,
                _evaluate(self._terms["t"][name], t, L),
                _evaluate(self._terms["tau"][name], tau, L),
            )

        sxx, sxv, svv = expanded("sxx"), expanded("sxv"), expanded("svv")
        # Lvv^2 = det / Sxx with det expanded exactly (det ~ tau^5 as t -> 1: docs/math.md §3.1).
        lvv = torch.sqrt(expanded("det") / sxx)
        lxx = torch.sqrt(sxx)
        lxv = sxv / lxx
        ell = -1.0 / lvv
        # AA = (Sxx + tau Sxv) / (tau Lxx), the numerator expanded exactly (~ tau^5 log tau).
        AA = expanded("aa_num") / (tau * lxx)
        g = self.p * tau
        P = 4.0 / tau
        t2 = t * t
        cx = t2 * (t2 - 4 * t + 6) / 3
        cv = 4 * t * (t2 - 3 * t + 3) / 3
        # docs/math.md §5.2: f = 4 tau^2 x1 - P AA eps_x + eps_v_coef eps_v; N(t) as in the compat code.
        if self.mode == "probODE":
            eps_v_coef = -P * lvv - 0.5 * g**2 * ell
            n_vv = P * lvv - 0.5 * g**2 * ell
            BB = lvv + 0.5 * g**2 * ell / P
        else:
            eps_v_coef = -P * lvv
            n_vv = P * lvv
            BB = lvv
        normalizer = torch.sqrt((P * AA) ** 2 + n_vv**2) / tau
        # docs/math.md §8.1 hop: bb = BB / Lvv, aa = (AA - bb Lxv) / Lxx.
        hop_bb = BB / lvv
        hop_aa = (AA - hop_bb * lxv) / lxx
        hop_den = 4 * tau**2 + P * (hop_aa * cx + hop_bb * cv)
        return Coefficients(
            tau=tau, cx=cx, cv=cv, sxx=sxx, sxv=sxv, svv=svv, lxx=lxx, lxv=lxv, lvv=lvv,
            ell=ell, g=g, P=P, AA=AA, normalizer=normalizer,
            label_x1=4 * tau**2 / normalizer,
            label_eps_x=-P * AA / normalizer,
            label_eps_v=eps_v_coef / normalizer,
            hop_aa=hop_aa, hop_bb=hop_bb, hop_den=hop_den,
        )

    def prior_cholesky(self) -> tuple[float, float, float]:
        """(Lxx, Lxv, Lvv) of Sigma0 = [[varx, -c], [-c, varv]] (compat: correlation -k)."""
        lxx = math.sqrt(self.varx)
        lxv = -self.c / lxx
        lvv = math.sqrt(self.varv - lxv**2)
        return lxx, lxv, lvv

    def sample_prior(
        self,
        shape_of_x: tuple[int, ...] | torch.Size,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """m0 ~ N(0, Sigma0) per coordinate, as [B, 2C, ...] = [x0 | v0] along dim 1.

        shape_of_x: the shape of one batch of x, [B, C, ...] (at least 2 dims, positive ints).
        generator: a torch.Generator on `device`, or None. dtype: a floating torch.dtype (None:
        torch's default dtype).
        """
        if isinstance(shape_of_x, (str, bytes)) or not hasattr(shape_of_x, "__iter__"):
            raise TypeError(f"shape_of_x must be a sequence of ints, got {type(shape_of_x).__name__}")
        shape = tuple(shape_of_x)
        if len(shape) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(
                f"shape_of_x must be [B, C, ...] with at least 2 positive ints, got {shape}"
            )
        dtype = dtype or torch.get_default_dtype()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        lxx, lxv, lvv = self.prior_cholesky()
        xi = torch.randn((2, *shape), generator=generator, device=device, dtype=torch.float64)
        x0 = lxx * xi[0]
        v0 = lxv * xi[0] + lvv * xi[1]
        return torch.cat([x0, v0], dim=1).to(dtype)

    def estimate_x1(
        self, m: torch.Tensor, F: torch.Tensor, t: torch.Tensor | float
    ) -> torch.Tensor:
        """The sampling hop (docs/math.md §8): x1 estimated from m = [x | v] and the output F at t.

        m: [B, 2C, ...]; F: [B, C, ...] in normalized units; t: scalar or [B].
        Computed in float64, returned in F's dtype.
        """
        x, v = split_phase(m)
        if F.shape != x.shape:
            raise ValueError(f"F must have shape {tuple(x.shape)}, got {tuple(F.shape)}")
        co = self.coefficients(_per_row(t, m))
        shape = (-1,) + (1,) * (x.dim() - 1)

        def r(a):
            return a.to(m.device).reshape(shape)

        x64, v64 = x.double(), v.double()
        f = r(co.normalizer) * F.double()
        if self.mode == "probODE":
            x1 = (f + r(co.P) * (r(co.hop_aa) * x64 + r(co.hop_bb) * v64)) / r(co.hop_den)
        else:
            x1 = (f / r(co.P) + v64) * r(co.tau) + x64
        return x1.to(F.dtype)

    def hop_weights(self, t: torch.Tensor | float) -> tuple[float, float, float]:
        """(a_F, a_x, a_v) with the hop (docs/math.md §8) x1_hat = a_F F + a_x x + a_v v at one time t.

        The scalars of `estimate_x1` folded in float64 (so a fused hop does 3 multiply-adds per
        element); the "cpu" and "triton" hops read them from here. t: a float or one-element tensor.
        """
        co = self.coefficients(t)
        N, P, tau = co.normalizer.item(), co.P.item(), co.tau.item()
        if self.mode == "probODE":
            return probode_hop_weights(N, P, co.hop_aa.item(), co.hop_bb.item(), co.hop_den.item())
        return sde_hop_weights(N, P, tau)


def probode_hop_weights(
    normalizer: float, P: float, hop_aa: float, hop_bb: float, hop_den: float
) -> tuple[float, float, float]:
    """(a_F, a_x, a_v) of the probODE hop x1_hat = (N F + P (aa x + bb v)) / den (docs/math.md §8.1).

    Scalars at T from `PhaseBridge.coefficients`: N = normalizer, P = 4 / tau, aa = hop_aa,
    bb = hop_bb, den = hop_den; folded in float64.
    """
    return normalizer / hop_den, P * hop_aa / hop_den, P * hop_bb / hop_den


def sde_hop_weights(normalizer: float, P: float, tau: float) -> tuple[float, float, float]:
    """(a_F, a_x, a_v) of the SDE hop x1_hat = (N F / P + v) tau + x (docs/math.md §8.2)."""
    return normalizer * tau / P, 1.0, tau


def _parameter(name: str, value: object) -> float:
    """A bridge parameter as a finite float (real number or one-element real tensor)."""
    value = real_scalar(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def split_phase(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (x, v) of m = [B, 2C, ...] (concatenated along dim 1)."""
    if m.dim() < 2 or m.shape[1] % 2:
        raise ValueError(f"m must be [B, 2C, ...] with an even dim 1, got {tuple(m.shape)}")
    c = m.shape[1] // 2
    return m[:, :c], m[:, c:]


def _per_row(t: torch.Tensor | float, m: torch.Tensor) -> torch.Tensor:
    """t as a float64 [B] tensor for the batch of m."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.dim() == 0:
        t = t.expand(m.shape[0])
    if t.shape != (m.shape[0],):
        raise ValueError(f"t must be a scalar or of shape [{m.shape[0]}], got {tuple(t.shape)}")
    return t
