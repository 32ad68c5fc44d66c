"""Exact-drift Gaussian-mixture oracle: what a perfectly trained AGM network outputs.

For data x1 drawn from a Gaussian mixture, the posterior of x1 given the phase state
m_t = (x_t, v_t) is again a Gaussian mixture, so E[x1 | m], the score and the network
target E[f | m] / N(t) (docs/math.md §6.3) are available in closed form. Used by the tests, the
sampler tuning and the benchmarks as a model with zero training error.

Math per coordinate j (all coordinates share the per-t coefficients of `PhaseBridge`):
m_j | x1 ~ N(c x1_j, Sigma), c = (cx, cv). Whitening with the Cholesky factor L of Sigma
(w = L^-1 m_j, u = L^-1 c, never Sigma^-1 itself, which is huge near t -> 1) gives
w | x1 ~ N(u x1_j, I). Its sufficient statistic is the least-squares estimate
xhat_j = u.w / a with precision a = |u|^2 = c^T Sigma^-1 c, xhat | x1 ~ N(x1, I / a); the
part of w orthogonal to u does not depend on x1. So E[x1 | m] = E[x1 | xhat], the mixture's
exact denoiser at noise variance 1 / a (`GaussianMixture.denoise`). For component k,
x1 ~ N(mu_k, R diag(s_k^2) R^T) (R = I and s_kd = s_k for an isotropic mixture); in R's frame
(xhat' = R^T xhat, mu'_k = R^T mu_k) every axis d is independent:

    log r_k = log pi_k - 1/2 sum_d log(1 + a s_kd^2) - sum_d a (xhat' - mu'_k)_d^2 / (2 (1 + a s_kd^2))
    E[x1 | m, k]' = xhat' + (mu'_k - xhat') / (1 + a s_k^2)      (elementwise in d)

At t = 0 (c = 0, a = 0) the posterior is the prior mixture itself.

Everything else is linear in x1, so E[. | m] evaluates it at x1_hat = E[x1 | m], with the
noise eps = (eps_x, eps_v) = w - u x1_hat. Near t -> 1 the residual w - u xhat is a tiny
difference of huge numbers; it is formed instead as its component along n = (-u_v, u_x)/|u|,
(n.w) n with n.w |u| = (cx v - cv x) / (Lxx Lvv) (no cancellation), and
eps = (n.w) n - u (x1_hat - xhat). Then, with tau = 1 - t, P = 4/tau, g = p tau (docs/math.md §5.2):

    E[a | m] = 4 (x1_hat - x - tau v) / tau^2 = 4 tau^2 x1_hat - P (AA eps_x + Lvv eps_v)
    grad_v log p_t(m) = ell eps_v
    E[f | m] = E[a | m] - 0.5 g^2 ell eps_v  (probODE);   E[a | m]  (SDE)

Near t -> 1, E[f | m] vanishes like tau^2 while its parts in the first form are O(1); the
second form keeps it to ~1e-14 relative (checked against 50-digit arithmetic).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import checks
from .bridge import Coefficients, PhaseBridge, check_t, split_phase
from .settings import T_END  # the largest end time of `ode_solution`

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Posterior(NamedTuple):
    """Per-row coefficients (0-d or [B, 1]); x1_hat = E[x1 | m] and eps_x, eps_v at x1_hat ([B, D])."""

    co: Coefficients
    x1_hat: torch.Tensor
    eps_x: torch.Tensor
    eps_v: torch.Tensor


def _as_float64(name: str, value: torch.Tensor | list | tuple, ndim: int) -> torch.Tensor:
    """`value` as a finite float64 CPU tensor with `ndim` dims and no empty dim."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
        tensor = value.detach().to("cpu", torch.float64)
    else:
        try:  # lists straight to float64 (not via the float32 default dtype)
            tensor = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a real tensor or nested list, got {value!r}") from err
    if tensor.dim() != ndim or tensor.numel() == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-d tensor, got shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        bad = tensor[~torch.isfinite(tensor)][0].item()
        raise ValueError(f"{name} must be finite, got {bad}")
    return tensor


class GaussianMixture:
    """Gaussian mixture sum_k pi_k N(mu_k, R diag(s_k^2) R^T) over R^D.

    Args:
        means: mu, [K, D]. stds: s, [K] (isotropic: s_k the same on every axis) or [K, D]
            (per-axis std of each component, along the columns of `rotation`), all > 0.
        weights: pi, [K] (>= 0, positive sum; normalized here); uniform when None.
        rotation: R, [D, D] orthogonal (R^T R = I to 1e-8), shared by all components; None is
            the identity. Component k has covariance R diag(s_k^2) R^T, so its axes are R's columns.
    Attributes: means [K, D], stds (as given: [K] or [K, D]), axis_stds [K, D] (stds per axis),
    weights [K] (sum 1), rotation [D, D] or None, all float64 on the CPU.
    """

    def __init__(
        self,
        means: torch.Tensor | list,
        stds: torch.Tensor | list,
        weights: torch.Tensor | list | None = None,
        rotation: torch.Tensor | list | None = None,
    ) -> None:
        means = _as_float64("means", means, 2)
        n_comp, dim = means.shape
        try:  # [K] or [K, D]; anything else is reported by _as_float64 as not 1-d
            stds_ndim = 2 if torch.as_tensor(stds).dim() == 2 else 1
        except (TypeError, ValueError, RuntimeError):
            stds_ndim = 1
        stds = _as_float64("stds", stds, stds_ndim)
        if stds.shape not in ((n_comp,), (n_comp, dim)):
            raise ValueError(
                f"stds must have shape [{n_comp}] or [{n_comp}, {dim}] (one per mean, or per mean and axis), "
                f"got {tuple(stds.shape)}"
            )
        if not bool((stds > 0).all()):
            raise ValueError(f"stds must be > 0, got {stds.min().item()}")
        if weights is None:
            weights = torch.ones(n_comp, dtype=torch.float64)
        weights = _as_float64("weights", weights, 1)
        if weights.shape != (n_comp,):
            raise ValueError(f"weights must have shape [{n_comp}] (one per mean), got {tuple(weights.shape)}")
        if not bool((weights >= 0).all()):
            raise ValueError(f"weights must be >= 0, got {weights.min().item()}")
        if not weights.sum().item() > 0:
            raise ValueError(f"weights must have a positive sum, got {weights.sum().item()}")
        if rotation is not None:
            rotation = _as_float64("rotation", rotation, 2)
            if rotation.shape != (dim, dim):
                raise ValueError(f"rotation must have shape [{dim}, {dim}], got {tuple(rotation.shape)}")
            gap = (rotation.T @ rotation - torch.eye(dim, dtype=torch.float64)).abs().max().item()
            if gap > 1e-8:
                raise ValueError(f"rotation must be orthogonal (max |R^T R - I| <= 1e-8), got {gap:.3g}")
        self.means, self.stds, self.rotation = means, stds, rotation
        self.axis_stds = stds if stds.dim() == 2 else stds[:, None].expand(n_comp, dim).contiguous()
        self.weights = weights / weights.sum()
        # Means in the rotated frame (mu' = R^T mu, as rows: mu R); isotropic mixtures need no frame.
        self._means_rot = means if rotation is None or self.isotropic else means @ rotation

    @property
    def dim(self) -> int:
        """D, the data dimension."""
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        """K, the number of components."""
        return self.means.shape[0]

    @property
    def isotropic(self) -> bool:
        """True when every component is s_k^2 I (stds given as [K]); the rotation is then irrelevant."""
        return self.stds.dim() == 1

    def __repr__(self) -> str:
        kind = "" if self.isotropic else ", anisotropic" + ("" if self.rotation is None else ", rotated")
        return f"GaussianMixture(n_components={self.n_components}, dim={self.dim}{kind})"

    def covariances(self) -> torch.Tensor:
        """Component covariances R diag(s_k^2) R^T, [K, D, D] float64."""
        cov = torch.diag_embed(self.axis_stds**2)
        if self.rotation is None or self.isotropic:
            return cov
        return self.rotation @ cov @ self.rotation.T

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x1, [n, D] float64 on the CPU (component, then noise, from `generator`)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, self.dim), generator=generator, dtype=torch.float64)
        if self.isotropic:
            return self.means[idx] + self.stds[idx, None] * z
        noise = self.axis_stds[idx] * z
        if self.rotation is not None:
            noise = noise @ self.rotation.T
        return self.means[idx] + noise

    def denoise(self, y: torch.Tensor, a: torch.Tensor | float, *, residual: bool = False) -> torch.Tensor:
        """E[x | y] for y = x + a^(-1/2) z, x ~ this mixture, z ~ N(0, I): the exact denoiser.

        y: [B, D] (any float dtype and device); a: the precision of y about x (1 / noise variance),
        a float, a 0-d tensor, or per row [B] or [B, 1], all >= 0 and finite; a = 0 gives the prior
        mean. Returns [B, D] float64 on y's device. In the frame of `rotation` (y' = R^T y):

            log r_k = log pi_k - 1/2 sum_d log(1 + a s_kd^2) - sum_d a (y' - mu'_k)_d^2 / (2 (1 + a s_kd^2))
            E[x | y]' = sum_k r_k (a s_k^2 y' + mu'_k) / (1 + a s_k^2)   (elementwise in d)

        For an observation y = alpha x + sigma z: E[x | y] = denoise(y / alpha, alpha^2 / sigma^2).
        With residual=True, returns E[x | y] - y = sum_k r_k (mu_k - y) / (1 + a s_k^2) instead, formed
        without cancellation (accurate where a is huge and E[x | y] is within a hair of y).
        """
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[1] != self.dim:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must be a [B, {self.dim}] tensor, got {shape}")
        y = y.to(torch.float64)
        if isinstance(a, bool) or not isinstance(a, (int, float, torch.Tensor)):
            raise TypeError(f"a must be a float or a tensor, got {type(a).__name__}")
        if not isinstance(a, torch.Tensor):  # the common case (one noise level), checked without tensors
            if not (math.isfinite(a) and a >= 0):
                raise ValueError(f"a must be finite and >= 0, got {a}")
            a_col = torch.full((1, 1), float(a), dtype=torch.float64, device=y.device)
            return self._denoise(y, a_col)[1 if residual else 0]
        a = a.to(device=y.device, dtype=torch.float64) if not a.is_complex() else a
        if a.is_complex():
            raise TypeError(f"a must be real, got dtype {a.dtype}")
        if a.numel() == 1:
            a = a.reshape(())
        elif a.dim() == 2 and a.shape[1] == 1:
            a = a[:, 0]
        if not (a.dim() == 0 or a.shape == (y.shape[0],)):
            raise ValueError(f"a must be a scalar or of shape [{y.shape[0]}] or [{y.shape[0]}, 1], "
                             f"got {tuple(a.shape)}")
        if not bool((torch.isfinite(a) & (a >= 0)).all()):
            bad = a[~(torch.isfinite(a) & (a >= 0))].reshape(-1)[0].item()
            raise ValueError(f"a must be finite and >= 0, got {bad}")
        return self._denoise(y, a.reshape(-1, 1))[1 if residual else 0]

    def _denoise(self, y: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`denoise` without the checks: y [B, D] float64, a [B, 1] or [1, 1] float64 on y's device.

        Returns (E[x | y], E[x | y] - y), each [B, D], both formed without cancellation: the mean as
        sum_k r_k (a s_k^2 y + mu_k) / (1 + a s_k^2) (exact at a = 0 for any y), the shift as
        sum_k r_k (mu_k - y) / (1 + a s_k^2) (small and accurate where a is huge).
        """
        weights = self.weights.to(y.device)
        if self.isotropic:
            means, stds = self.means.to(y.device), self.stds.to(y.device)
            a_s2 = a * stds**2  # [B or 1, K]
            sq = ((y * y).sum(1, keepdim=True) - 2 * y @ means.T + (means * means).sum(1)).clamp_min(0.0)
            logits = torch.log(weights) - 0.5 * self.dim * torch.log1p(a_s2) - 0.5 * a * sq / (1 + a_s2)
            resp = torch.softmax(logits, dim=1)
            shrink = resp / (1 + a_s2)  # r_k / (1 + a s_k^2), [B, K]
            towards = shrink @ means
            mean = towards + y * (shrink * a_s2).sum(1, keepdim=True)
            return mean, towards - y * shrink.sum(1, keepdim=True)
        rot = None if self.rotation is None else self.rotation.to(y.device)
        means = self._means_rot.to(y.device)
        var = self.axis_stds.to(y.device) ** 2  # [K, D]
        yr = y if rot is None else y @ rot
        if a.shape[0] > 1 and bool((a == a[0]).all()):  # e.g. a sampler's t as a [B] tensor
            a = a[:1]
        if a.shape[0] == 1:  # one precision for the whole batch: everything by [B, D] x [D, K] products
            a_s2 = a * var  # [K, D]
            shrink = 1 / (1 + a_s2)  # [K, D]
            prec = a * shrink  # a / (1 + a s_kd^2)
            sq = (yr * yr) @ prec.T - 2 * yr @ (prec * means).T + (prec * means * means).sum(1)
            sq = sq.clamp_min(0.0)  # sum_d a (y' - mu'_k)_d^2 / (1 + a s_kd^2), [B, K]
            logits = torch.log(weights) - 0.5 * torch.log1p(a_s2).sum(1) - 0.5 * sq
            resp = torch.softmax(logits, dim=1)
            towards = resp @ (means * shrink)
            mean = towards + yr * (resp @ (a_s2 * shrink))
            shift = towards - yr * (resp @ shrink)
        else:  # a per row: [rows, K, D] blocks of at most ~2^22 elements
            mean, shift = torch.empty_like(yr), torch.empty_like(yr)
            rows = max(1, (1 << 22) // max(1, means.numel()))
            for lo in range(0, yr.shape[0], rows):
                yb, ab = yr[lo : lo + rows, None, :], a[lo : lo + rows, :, None]  # [b, 1, D], [b, 1, 1]
                a_s2 = ab * var  # [b, K, D]
                diff = means - yb
                logits = torch.log(weights) - 0.5 * (torch.log1p(a_s2) + ab * diff * diff / (1 + a_s2)).sum(2)
                shrink = torch.softmax(logits, dim=1)[:, :, None] / (1 + a_s2)  # r_k / (1 + a s_kd^2)
                mean[lo : lo + rows] = (shrink * (means + a_s2 * yb)).sum(1)
                shift[lo : lo + rows] = (shrink * diff).sum(1)
        if rot is None:
            return mean, shift
        return mean @ rot.T, shift @ rot.T

    def _posterior(self, bridge: PhaseBridge, m: torch.Tensor, t: torch.Tensor | float) -> _Posterior:
        """Coefficients at t and E[x1 | m_t = m] (module docstring), all float64."""
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[1] != 2 * self.dim:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"m must be a [B, {2 * self.dim}] tensor (x | v), got {shape}")
        x, v = (part.to(torch.float64) for part in split_phase(m))
        t = check_t(torch.as_tensor(t, dtype=torch.float64, device=m.device))
        if t.dim() == 1 and t.shape[0] == m.shape[0]:
            co = bridge.coefficients(t.unsqueeze(1))
        elif t.dim() == 0:
            co = bridge.coefficients(t)
        else:
            raise ValueError(f"t must be a scalar or of shape [{m.shape[0]}], got {tuple(t.shape)}")
        # Whitened mean direction u = L^-1 c, precision a = |u|^2, statistic u.w = c^T Sigma^-1 m.
        lxx_lvv = co.lxx * co.lvv
        ux = co.cx / co.lxx
        uv = (co.cv * co.lxx - co.lxv * co.cx) / lxx_lvv
        a = ux * ux + uv * uv
        wx = x / co.lxx
        wv = (v - co.lxv * wx) / co.lvv
        informed = a > 0  # False only at t = 0, where c = 0 and w carries no information on x1
        a_safe = torch.where(informed, a, 1.0)
        xhat = torch.where(informed, (ux * wx + uv * wv) / a_safe, 0.0)
        # w - u xhat = (n.w) n, n = (-uv, ux) / |u|, n.w |u| = (cx v - cv x) / (Lxx Lvv).
        nw_over_a = (co.cx * v - co.cv * x) / (lxx_lvv * a_safe)
        ex = torch.where(informed, -uv * nw_over_a, wx)
        ev = torch.where(informed, ux * nw_over_a, wv)
        # xhat | x1 ~ N(x1, I / a): E[x1 | m] is the mixture's denoiser at xhat.
        x1_hat, delta = self._denoise(xhat, a.reshape(-1, 1))  # delta = x1_hat - xhat
        return _Posterior(co, x1_hat, ex - ux * delta, ev - uv * delta)

    def posterior_mean(self, bridge: PhaseBridge, m: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """E[x1 | m_t = m], [B, D] float64. m: [B, 2D] = [x | v]; t: scalar or [B] in [0, 1)."""
        return self._posterior(bridge, m, t).x1_hat

    def score(self, bridge: PhaseBridge, m: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """grad_v log p_t(m) = ell eps_v at x1 = E[x1 | m], [B, D] float64 (m, t as in `drift`)."""
        post = self._posterior(bridge, m, t)
        return post.co.ell * post.eps_v

    def expected_f(self, bridge: PhaseBridge, m: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """E[f | m_t = m] (un-normalized, docs/math.md §5.2), [B, D] float64: dv/dt of the sampling flow.

        probODE: E[a | m] - 0.5 g^2 grad_v log p_t(m);  SDE: E[a | m];
        E[a | m] = 4 (x1_hat - x - tau v) / tau^2, evaluated without cancellation (module doc).
        """
        return _expected_f(self._posterior(bridge, m, t), bridge.mode)

    def drift(self, bridge: PhaseBridge, m: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The perfect network output F = E[f | m] / N(t), [B, D] float64 (normalized units).

        m: [B, 2D] = [x | v] (any float dtype, any device); t: scalar or [B] in [0, 1).
        """
        post = self._posterior(bridge, m, t)
        return _expected_f(post, bridge.mode) / post.co.normalizer

    def as_model(self, bridge: PhaseBridge) -> Model:
        """A callable model(m, t) -> F ([B, D], m's dtype) for the samplers; t: [B] tensor or scalar."""

        def model(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.drift(bridge, m, t).to(m.dtype)

        return model


def _expected_f(post: _Posterior, mode: str) -> torch.Tensor:
    """E[f | m] = 4 tau^2 x1_hat - P AA eps_x - (P Lvv [+ 0.5 g^2 ell if probODE]) eps_v, [B, D]."""
    co = post.co
    eps_v_coef = co.P * co.lvv
    if mode == "probODE":
        eps_v_coef = eps_v_coef + 0.5 * co.g**2 * co.ell
    return 4 * co.tau**2 * post.x1_hat - co.P * co.AA * post.eps_x - eps_v_coef * post.eps_v


def ode_solution(
    mixture: GaussianMixture,
    bridge: PhaseBridge,
    m0: torch.Tensor,
    t0: float,
    t1: float,
    rtol: float = 1e-11,
    atol: float = 1e-11,
) -> torch.Tensor:
    """m(t1) of the exact sampling flow dx/dt = v, dv/dt = N(t) F(m, t) = E[f | m] from m(t0) = m0.

    m0: [B, 2D] = [x | v]; t0, t1 in [0, 0.999] (either order). The whole batch is one system,
    solved by scipy's DOP853 at (rtol, atol) on one intra-op thread (restored afterwards).
    Returns [B, 2D] float64 on m0's device.
    Raises RuntimeError if the solver fails. For probODE bridges this is the exact
    probability-flow map; for SDE bridges it is the mean-drift flow (no noise).
    """
    from scipy.integrate import solve_ivp

    t0 = checks.interval("t0", t0, 0.0, T_END, open_hi=False)
    t1 = checks.interval("t1", t1, 0.0, T_END, open_hi=False)
    if not isinstance(m0, torch.Tensor) or m0.dim() != 2 or m0.shape[1] != 2 * mixture.dim:
        shape = tuple(m0.shape) if isinstance(m0, torch.Tensor) else type(m0).__name__
        raise ValueError(f"m0 must be a [B, {2 * mixture.dim}] tensor (x | v), got {shape}")
    if t0 == t1:
        return m0.detach().to(torch.float64, copy=True)
    shape = tuple(m0.shape)
    y0 = m0.detach().to("cpu", torch.float64).reshape(-1).numpy()

    def rhs(t: float, y):
        m = torch.from_numpy(y).view(shape)
        f = mixture.expected_f(bridge, m, torch.tensor(t, dtype=torch.float64))
        return torch.cat([m[:, mixture.dim :], f], dim=1).reshape(-1).numpy()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each step's tensors are small: intra-op threads only add overhead
    try:
        sol = solve_ivp(rhs, (t0, t1), y0, method="DOP853", t_eval=[t1], rtol=rtol, atol=atol)
    finally:
        torch.set_num_threads(threads)
    if not sol.success:
        raise RuntimeError(f"ode_solution: solve_ivp failed from t0={t0} to t1={t1}: {sol.message}")
    return torch.from_numpy(sol.y[:, -1].copy()).view(shape).to(m0.device)


def mixture_2d_grid(n: int = 3, spacing: float = 1.2, std: float = 0.15) -> GaussianMixture:
    """n x n grid of equal-weight modes, spacing apart, centred at 0 (default: |x| <= 1.2 + 3 std)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    axis = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * spacing
    gx, gy = torch.meshgrid(axis, axis, indexing="ij")
    means = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    return GaussianMixture(means, torch.full((n * n,), float(std), dtype=torch.float64))


def mixture_2d_ring(n: int = 8, radius: float = 1.2, std: float = 0.1) -> GaussianMixture:
    """n equal-weight modes evenly spaced on a circle of `radius` around 0."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    angle = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    means = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return GaussianMixture(means, torch.full((n,), float(std), dtype=torch.float64))


def mixture_random(
    dim: int, k: int, seed: int, std_range: tuple[float, float] = (0.1, 0.3)
) -> GaussianMixture:
    """A reproducible random mixture: means ~ U[-1, 1]^dim, stds ~ U[std_range],
    weights ~ U[0.5, 1.5] (normalized), all drawn from torch.Generator seeded with `seed`.
    """
    for name, value in (("dim", dim), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    lo, hi = std_range
    if not 0 < lo <= hi:
        raise ValueError(f"std_range must satisfy 0 < low <= high, got {std_range}")
    gen = torch.Generator().manual_seed(seed)
    means = 2 * torch.rand((k, dim), generator=gen, dtype=torch.float64) - 1
    stds = lo + (hi - lo) * torch.rand(k, generator=gen, dtype=torch.float64)
    weights = 0.5 + torch.rand(k, generator=gen, dtype=torch.float64)
    return GaussianMixture(means, stds, weights)
