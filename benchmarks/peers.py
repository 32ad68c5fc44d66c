"""Peer samplers driven by exact Gaussian-mixture drifts: VP diffusion, flow matching and CLD.

Every peer's network target is a posterior expectation under a linear-Gaussian corruption of the
data, so for a Gaussian mixture it has a closed form (the peers' counterpart of
`psb_fast.oracles.GaussianMixture.drift`): for an observation y = a x + sigma z (z ~ N(0, I)),
y / a = x + (sigma / a) z, so E[x | y] = mix.denoise(y / a, a^2 / sigma^2), the mixture's exact
denoiser (`GaussianMixture.denoise`, the one home of the mixture posterior).

Peers (each with its own prior draw; all tensors float64, x of shape [B, D]):

- VP diffusion (Song et al. 2021), linear beta schedule beta(t) = 0.1 + 19.9 t on t in [1e-3, 1]:
  x_t = alpha_t x0 + sigma_t z, log alpha_t = -0.1 t / 2 - 19.9 t^2 / 4, sigma_t^2 = 1 - alpha_t^2,
  lambda = log(alpha / sigma). Prior x_1 ~ N(0, I). Model: E[x0 | x_t]. Samplers DDIM (eta = 0) and
  DPM-Solver++(2M) (multistep, data prediction, first-order final step below 15 steps as in the
  official code), both on the grid uniform in lambda from t = 1 to 1e-3; NFE = number of steps.
  Reference: the probability-flow ODE dx/dlambda = alpha (E[x0 | x] - alpha x).
- Flow matching / rectified flow: x_t = (1 - t) z + t x1, t: 0 -> 1, prior z ~ N(0, I); velocity
  E[x1 - z | x_t] = sum_k r_k ((1 - t) mu_k - (1 - t - t s_k^2) x) / D_k (a = t, sigma = 1 - t;
  regular at t = 1). Euler (NFE = steps) and Heun (2 NFE per step, the last step Euler because
  its end is t = 1, so NFE = 2 steps - 1). Reference: the same ODE.
- CLD (Dockhorn et al. 2022): u = (x, v), du = beta [[0, 1/M], [-1, -Gamma/M]] u dt + (0, sqrt(2 Gamma
  beta)) dW with M^-1 = 4, critical damping Gamma^2 = 4 M (Gamma = 2 / sqrt(M^-1) = 1), beta = 4
  (constant), v0 ~ N(0, gamma M I), gamma = 0.04 (the paper's CIFAR-10 settings); prior
  (x, v) ~ N(0, diag(1, M)); end time eps = 1e-3. Model: the exact v-score grad_v log p_t(x, v).
  Sampler SSCS (the official code: linear striding; per step an analytic half step of the OU part,
  an Euler step v += 2 Gamma beta (score + v / M) dt with the score at the step's start time, another
  half step; then the final Euler "denoising" step of the reverse SDE's mean, whose x part needs no
  score, so NFE = steps; the official code spends one evaluation on it). SSCS is a stochastic
  sampler (no pathwise error); the probability-flow ODE du/dt = beta (A u - Gamma (0, score)),
  from t = 1 down to eps, is the CLD reference flow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from psb_fast.oracles import GaussianMixture

#: A peer model: model(state, t) -> its network target (E[x0 | x_t], velocity or v-score), float64.
PeerModel = Callable[[torch.Tensor, float], torch.Tensor]


def _check_state(name: str, value: torch.Tensor, width: int) -> torch.Tensor:
    """`value` as a float64 [B, width] tensor."""
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[1] != width:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a [B, {width}] tensor, got {shape}")
    return value.to(torch.float64)


def _check_nfe(nfe: int, low: int = 1) -> int:
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < low:
        raise ValueError(f"nfe must be an int >= {low}, got {nfe!r}")
    return nfe


def mixture_posterior_mean(mix: GaussianMixture, y: torch.Tensor, a: float, sigma: float) -> torch.Tensor:
    """E[x | y] for y = a x + sigma z, x ~ mix, z ~ N(0, I); y: [B, D]; a, sigma > 0 scalars. [B, D].

    = mix.denoise(y / a, a^2 / sigma^2); a = 0 (y carries no information) gives the prior mean.
    """
    y = _check_state("y", y, mix.dim)
    if not (math.isfinite(a) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"a must be finite and sigma > 0, got a={a}, sigma={sigma}")
    if a == 0:
        return mix.denoise(torch.zeros_like(y), 0.0)
    return mix.denoise(y / a, (a / sigma) ** 2)


# ---------------------------------------------------------------------------------------------- VP


@dataclass(frozen=True)
class VPSchedule:
    """Linear-beta VP schedule beta(t) = beta_min + (beta_max - beta_min) t, sampled on [eps, 1]."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    eps: float = 1e-3

    def log_alpha(self, t: float) -> float:
        """log alpha_t = -beta_min t / 2 - (beta_max - beta_min) t^2 / 4."""
        return -0.5 * self.beta_min * t - 0.25 * (self.beta_max - self.beta_min) * t * t

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """(alpha_t, sigma_t), sigma_t = sqrt(1 - alpha_t^2) without cancellation at small t."""
        la = self.log_alpha(t)
        return math.exp(la), math.sqrt(-math.expm1(2 * la))

    def lam(self, t: float) -> float:
        """Half log-SNR lambda_t = log(alpha_t / sigma_t)."""
        la = self.log_alpha(t)
        return la - 0.5 * math.log(-math.expm1(2 * la))

    def t_of_lam(self, lam: float) -> float:
        """Inverse of `lam`: t with lambda_t = lam (root of a quadratic in t)."""
        L = math.log1p(math.exp(-2 * lam))  # = -2 log alpha_t
        db = self.beta_max - self.beta_min
        return 2 * L / (self.beta_min + math.sqrt(self.beta_min**2 + 2 * db * L))

    def grid(self, n_steps: int) -> list[float]:
        """n_steps + 1 times from 1 down to eps, uniform in lambda (DPM-Solver's "logSNR" grid)."""
        _check_nfe(n_steps)
        lo, hi = self.lam(1.0), self.lam(self.eps)
        return [1.0] + [self.t_of_lam(lo + (hi - lo) * i / n_steps) for i in range(1, n_steps)] + [self.eps]


def vp_model(mix: GaussianMixture, schedule: VPSchedule) -> PeerModel:
    """model(x_t, t) = E[x0 | x_t] (the exact data-prediction network), [B, D] float64."""

    def model(x: torch.Tensor, t: float) -> torch.Tensor:
        alpha, sigma = schedule.alpha_sigma(t)
        return mixture_posterior_mean(mix, x, alpha, sigma)

    return model


def ddim(model: PeerModel, schedule: VPSchedule, x1: torch.Tensor, nfe: int) -> torch.Tensor:
    """DDIM (eta = 0) from x_1 ~ N(0, I) to x_eps in `nfe` steps on `schedule.grid`; [B, D]."""
    return _dpm_solver_pp(model, schedule, x1, _check_nfe(nfe), order=1)


def dpm_solver_pp_2m(model: PeerModel, schedule: VPSchedule, x1: torch.Tensor, nfe: int) -> torch.Tensor:
    """DPM-Solver++(2M) from x_1 to x_eps in `nfe` steps (first step first order; last step first
    order when nfe < 15, the official `lower_order_final`); [B, D]."""
    return _dpm_solver_pp(model, schedule, x1, _check_nfe(nfe), order=2)


def _dpm_solver_pp(model: PeerModel, schedule: VPSchedule, x1: torch.Tensor, n: int, order: int):
    x = x1.to(torch.float64, copy=True)
    ts = schedule.grid(n)
    lams = [schedule.lam(t) for t in ts]
    prev = None  # (x0 prediction, step h) of the previous step
    for i in range(n):
        t, s = ts[i], ts[i + 1]
        _, sigma_t = schedule.alpha_sigma(t)
        alpha_s, sigma_s = schedule.alpha_sigma(s)
        h = lams[i + 1] - lams[i]
        x0 = model(x, t)
        second = order == 2 and prev is not None and not (i == n - 1 and n < 15)
        if second:
            r = prev[1] / h
            d = (1 + 0.5 / r) * x0 - (0.5 / r) * prev[0]
        else:
            d = x0
        x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * d
        prev = (x0, h)
    return x


def vp_ode_solution(
    model: PeerModel, schedule: VPSchedule, x1: torch.Tensor, rtol: float = 1e-10, atol: float = 1e-10
) -> torch.Tensor:
    """x_eps of the VP probability-flow ODE from x_1 (scipy DOP853 in lambda); [B, D] float64."""

    def rhs(lam: float, x: torch.Tensor) -> torch.Tensor:
        t = schedule.t_of_lam(lam)
        alpha, _ = schedule.alpha_sigma(t)
        return alpha * (model(x, t) - alpha * x)

    return _solve(rhs, x1, schedule.lam(1.0), schedule.lam(schedule.eps), rtol, atol)


# ---------------------------------------------------------------------------------- flow matching


def fm_model(mix: GaussianMixture) -> PeerModel:
    """model(x_t, t) = E[x1 - z | x_t] for x_t = (1 - t) z + t x1, t in [0, 1]; [B, D] float64."""

    def model(x: torch.Tensor, t: float) -> torch.Tensor:
        x = _check_state("x", x, mix.dim)
        if t <= 0.0:  # x_0 = z carries no information on x1
            return mix.weights.to(x.device) @ mix.means.to(x.device) - x
        if t >= 1.0:  # x_1 = x1: E[x1 - z | x1] = x1
            return x.clone()
        # x / t = x1 + ((1 - t) / t) z; with y = x / t, E[x1 | x] = y + res and the velocity is
        # (E[x1 | x] - x) / (1 - t) = res / (1 - t) + y (res small and exact as t -> 1).
        res = mix.denoise(x / t, (t / (1 - t)) ** 2, residual=True)
        return res / (1 - t) + x / t

    return model


def fm_euler(model: PeerModel, z: torch.Tensor, nfe: int) -> torch.Tensor:
    """Euler on the uniform grid t: 0 -> 1, `nfe` steps; [B, D]."""
    n = _check_nfe(nfe)
    x = z.to(torch.float64, copy=True)
    for i in range(n):
        x = x + model(x, i / n) / n
    return x


def heun_steps(nfe: int) -> int:
    """Steps of `fm_heun` within an NFE budget: 2 per step, the last step Euler (2 n - 1 <= nfe)."""
    return (_check_nfe(nfe) + 1) // 2


def fm_heun(model: PeerModel, z: torch.Tensor, nfe: int) -> tuple[torch.Tensor, int]:
    """Heun (trapezoidal predictor-corrector) on the uniform grid t: 0 -> 1 within `nfe` evaluations;
    the last step is Euler. Returns (x at t = 1 [B, D], NFE used = 2 steps - 1)."""
    n = heun_steps(nfe)
    x = z.to(torch.float64, copy=True)
    used = 0
    for i in range(n):
        t, h = i / n, 1 / n
        d = model(x, t)
        used += 1
        if i == n - 1:
            x = x + h * d
        else:
            d2 = model(x + h * d, t + h)
            used += 1
            x = x + 0.5 * h * (d + d2)
    return x, used


def fm_ode_solution(
    model: PeerModel, z: torch.Tensor, rtol: float = 1e-10, atol: float = 1e-10
) -> torch.Tensor:
    """x at t = 1 of dx/dt = model(x, t) from x(0) = z (scipy DOP853); [B, D] float64."""
    return _solve(lambda t, x: model(x, t), z, 0.0, 1.0, rtol, atol)


# --------------------------------------------------------------------------------------------- CLD


@dataclass(frozen=True)
class CLD:
    """Critically damped Langevin diffusion with constant beta; time t in [eps, 1]."""

    m_inv: float = 4.0
    gamma: float = 0.04
    beta: float = 4.0
    eps: float = 1e-3

    @property
    def M(self) -> float:
        return 1.0 / self.m_inv

    @property
    def Gamma(self) -> float:
        """Critical damping Gamma^2 = 4 M."""
        return 2.0 / math.sqrt(self.m_inv)

    @property
    def kappa(self) -> float:
        """Decay rate of the (double) eigenvalue -kappa of the drift matrix, kappa = Gamma / (2 M)."""
        return math.sqrt(self.m_inv)

    def mean_map(self, t: float) -> tuple[float, float]:
        """(c_x, c_v): E[(x_t, v_t) | x0] = (c_x, c_v) x0 (v0 has mean 0). With s = beta t,
        exp(A s) = e^(-kappa s) [[1 + kappa s, s / M], [-s, 1 - kappa s]]."""
        s = self.beta * t
        e = math.exp(-self.kappa * s)
        return e * (1 + self.kappa * s), -e * s

    def covariance(self, t: float) -> tuple[float, float, float]:
        """(Sxx, Sxv, Svv) of (x_t, v_t) given x0: Sigma_inf + Phi (Sigma_0 - Sigma_inf) Phi^T with
        Sigma_inf = diag(1, M), Sigma_0 = diag(0, gamma M). 1 - Phi_xx^2 is formed with expm1/log1p; at
        small t the two O(t^2) terms of Sxx leave gamma times their size (about 1.4 digits lost)."""
        s, k, M = self.beta * t, self.kappa, self.M
        e = math.exp(-k * s)
        pxx, pxv, pvx, pvv = e * (1 + k * s), e * s / M, -e * s, e * (1 - k * s)
        dv = (self.gamma - 1.0) * M  # Sigma_0 - Sigma_inf = diag(-1, dv)
        sxx = -math.expm1(2 * (math.log1p(k * s) - k * s)) + dv * pxv * pxv
        sxv = -pxx * pvx + dv * pxv * pvv
        svv = M - pvx * pvx + dv * pvv * pvv
        return sxx, sxv, svv

    def prior(self, n: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(x, v) ~ N(0, diag(1, M)) at t = 1: [n, 2 dim] float64 = [x | v]."""
        u = torch.randn((n, 2 * dim), generator=generator, dtype=torch.float64)
        u[:, dim:] *= math.sqrt(self.M)
        return u


def cld_model(mix: GaussianMixture, cld: CLD) -> PeerModel:
    """model(u, t) = grad_v log p_t(x, v), u = [x | v] [B, 2D]; returns [B, D] float64.

    Per coordinate (x_t, v_t) | x0 ~ N(c x0, Sigma) with L = chol(Sigma); whitening w = L^-1 u,
    q = L^-1 c reduces it to y = (q.w) / |q|^2 = x0 + z / |q| (the oracle's construction), so
    x0_hat = E[x0 | u] = mix.denoise(y, |q|^2) and the score is -(Sigma^-1 (u - c x0_hat))_v =
    -eps_v / Lvv, eps = w - q x0_hat; the part of w orthogonal to q is formed from
    (c_x v - c_v x) / (Lxx Lvv) and x0_hat - y by `denoise(..., residual=True)`, without cancellation.
    """

    def model(u: torch.Tensor, t: float) -> torch.Tensor:
        u = _check_state("u", u, 2 * mix.dim)
        x, v = u[:, : mix.dim], u[:, mix.dim :]
        cx, cv = cld.mean_map(t)
        sxx, sxv, svv = cld.covariance(t)
        lxx = math.sqrt(sxx)
        lxv = sxv / lxx
        lvv = math.sqrt(svv - lxv * lxv)
        qx, qv = cx / lxx, (cv - lxv * cx / lxx) / lvv
        prec = qx * qx + qv * qv
        wx = x / lxx
        wv = (v - lxv * wx) / lvv
        y = (qx * wx + qv * wv) / prec
        shift = mix.denoise(y, prec, residual=True)  # x0_hat - y
        nw_over_prec = (cx * v - cv * x) / (lxx * lvv * prec)
        eps_v = qx * nw_over_prec - qv * shift
        return -eps_v / lvv

    return model


def _ou_half(cld: CLD, u: torch.Tensor, ds: float, generator: torch.Generator | None) -> torch.Tensor:
    """Exact step of the reverse OU part du = ([[0, -1/M], [1, -Gamma/M]] u) ds + (0, sqrt(2 Gamma)) dW
    over ds (beta-scaled time): mean exp(A ds) u, covariance Sigma_inf - Phi Sigma_inf Phi^T."""
    d = u.shape[1] // 2
    x, v = u[:, :d], u[:, d:]
    k, M = cld.kappa, cld.M
    e = math.exp(-k * ds)
    pxx, pxv, pvx, pvv = e * (1 + k * ds), -e * ds / M, e * ds, e * (1 - k * ds)
    qxx = -math.expm1(2 * (math.log1p(k * ds) - k * ds)) - M * pxv * pxv
    qxv = -pxx * pvx - M * pxv * pvv
    qvv = M - pvx * pvx - M * pvv * pvv
    lxx = math.sqrt(qxx)
    lxv = qxv / lxx
    lvv = math.sqrt(max(qvv - lxv * lxv, 0.0))
    zx = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    zv = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return torch.cat([pxx * x + pxv * v + lxx * zx, pvx * x + pvv * v + lxv * zx + lvv * zv], dim=1)


def cld_sscs(
    model: PeerModel, cld: CLD, u1: torch.Tensor, nfe: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """SSCS from the prior u1 = [x | v] at t = 1 in `nfe` steps (linear striding to eps), then the
    denoising step's x update (no evaluation). Returns x [B, D] float64."""
    n = _check_nfe(nfe)
    u = u1.to(torch.float64, copy=True)
    d = u.shape[1] // 2
    taus = [(1.0 - cld.eps) * i / n for i in range(n + 1)]  # reverse time; model time t = 1 - tau
    b, G = cld.beta, cld.Gamma
    for i in range(n):
        dt = taus[i + 1] - taus[i]
        u = _ou_half(cld, u, 0.5 * b * dt, generator)
        score = model(u, 1.0 - taus[i])
        u[:, d:] += 2 * G * b * dt * (score + cld.m_inv * u[:, d:])
        u = _ou_half(cld, u, 0.5 * b * dt, generator)
    # Denoising: the mean of one Euler-Maruyama step of the reverse SDE over [eps, 0]; its x part
    # -beta v / M does not involve the score, so it costs no evaluation.
    return u[:, :d] - cld.eps * b * cld.m_inv * u[:, d:]


def cld_ode_solution(
    model: PeerModel, cld: CLD, u1: torch.Tensor, rtol: float = 1e-10, atol: float = 1e-10
) -> torch.Tensor:
    """u at t = eps of the CLD probability-flow ODE du/dt = beta (A u - Gamma (0, score)) from u1 at
    t = 1 (scipy DOP853); [B, 2D] float64."""
    d = u1.shape[1] // 2
    b, G, m_inv = cld.beta, cld.Gamma, cld.m_inv

    def rhs(t: float, u: torch.Tensor) -> torch.Tensor:
        x, v = u[:, :d], u[:, d:]
        return b * torch.cat([m_inv * v, -x - G * m_inv * v - G * model(u, t)], dim=1)

    return _solve(rhs, u1, 1.0, cld.eps, rtol, atol)


# ------------------------------------------------------------------------------------------ shared


def _solve(
    rhs: Callable[[float, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    t0: float,
    t1: float,
    rtol: float,
    atol: float,
) -> torch.Tensor:
    """y(t1) of dy/dt = rhs(t, y) for the whole batch as one system (scipy DOP853)."""
    from scipy.integrate import solve_ivp

    shape = tuple(y0.shape)
    start = y0.detach().to("cpu", torch.float64).reshape(-1).numpy()

    def f(t: float, y):
        return rhs(t, torch.from_numpy(y).view(shape)).reshape(-1).numpy()

    sol = solve_ivp(f, (t0, t1), start, method="DOP853", t_eval=[t1], rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed from t={t0} to t={t1}: {sol.message}")
    return torch.from_numpy(sol.y[:, -1].copy()).view(shape)
