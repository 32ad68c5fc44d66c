"""PhaseSampler's steps (docs/math.md §7, §9, §10.3): the per-step scalars, built once per sampler,
and one `step(i, m, F_i)` per solver for `psb_fast.loop.integrate`.

- "ode":  every solver variant's update runs on `psb_fast.variants.Steps` (the fused `phase_step`);
- "sde":  the exact-noise step (§9.2);  "em": Euler-Maruyama (§9.3);
- "sscs": compat SSCS (§9.4): the first half step is a before-evaluation hook (`sscs_first_half`,
  so F is evaluated at the step's midpoint), the step is v += h N F and the second half step.

The steps call the fused ops' unchecked entry points (`psb_fast.ops.phase_step._phase_step_unchecked`,
...): the sampler checks its arguments once per sample() call, and every scalar here (multistep
coefficients, noise factors, normalizers, hop weights) is computed in float64 when the sampler is
made. Noise: `noise(m, k, kind, t, h) -> (seed, xi)` supplies draw k of a run: a seed for the
backend's own generator (`seeded_noise`), or the normals themselves (`graph_noise`: drawn from
torch's CUDA generator inside a CUDA graph, so every replay gets fresh numbers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cached_property

import torch

from .bridge import Coefficients, PhaseBridge, probode_hop_weights, sde_hop_weights
from .loop import Hook
from .ops.phase_step import _phase_hop_unchecked, _phase_step_unchecked
from .ops.sde_step import SDEScalars, _sde_scalars, _sde_step_unchecked
from .seeds import step_seed

Noise = Callable[[torch.Tensor, int, str, float, float], tuple[int, tuple[torch.Tensor, torch.Tensor] | None]]
Step = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class StepPlan:
    """What the loop needs per step, as float64 Python scalars (built by `make_plan`).

    t_step[i], h[i]: start and size of step i (i < n_steps; n_steps = nfe - 1 with the hop, nfe
    without, the last step then ending at t_end). t_eval[i]: time of evaluation i (the grid time;
    for SSCS the midpoint t_i + h_i / 2 of step i). sde[i]: `SDEScalars` of step i ("sde", "em"); sscs[i] =
    (first half step, h_i N(t_i + h_i/2), second half step). T_hop, hop_weights: the hop's time
    (T, or t0 when nfe = 1) and (a_F, a_x, a_v) there. Made on first use (by guidance and
    trajectories only): eval_co, bridge.coefficients at the evaluation times (guidance redraws),
    and eval_hop_weights[i], the hop weights there (x1 estimates along the way).
    """

    bridge: PhaseBridge
    t_step: tuple[float, ...]
    h: tuple[float, ...]
    t_eval: tuple[float, ...]
    sde: tuple[SDEScalars, ...]
    sscs: tuple[tuple[SDEScalars, float, SDEScalars], ...]
    T_hop: float
    hop_weights: tuple[float, float, float]

    @cached_property
    def eval_co(self) -> Coefficients:
        return self.bridge.coefficients(torch.tensor(self.t_eval, dtype=torch.float64))

    @cached_property
    def eval_hop_weights(self) -> tuple[tuple[float, float, float], ...]:
        co = self.eval_co
        if self.bridge.mode == "probODE":
            fold, columns = probode_hop_weights, (co.normalizer, co.P, co.hop_aa, co.hop_bb, co.hop_den)
        else:
            fold, columns = sde_hop_weights, (co.normalizer, co.P, co.tau)
        return tuple(fold(*row) for row in zip(*(c.tolist() for c in columns), strict=True))

    @property
    def nfe(self) -> int:
        return len(self.t_eval)

    @property
    def n_steps(self) -> int:
        return len(self.h)

    def hop(self, m: torch.Tensor, F: torch.Tensor, backend: str, views=None) -> torch.Tensor:
        """x1 = a_F F + a_x x + a_v v at T_hop (docs/math.md §8), a new tensor in m's dtype;
        views: (x, v) of m when the caller has them."""
        return _hop(self.bridge, m, F, self.T_hop, self.hop_weights, backend, views)

    def x1_hat(self, i: int, m: torch.Tensor, F: torch.Tensor, backend: str) -> torch.Tensor:
        """The hop's estimate of x1 at evaluation time i from m and F_i (m is not modified)."""
        return _hop(self.bridge, m, F, self.t_eval[i], self.eval_hop_weights[i], backend)

    def coefficients_at(self, i: int) -> Coefficients:
        """bridge.coefficients at evaluation time i (0-d float64 tensors)."""
        return Coefficients(**{f.name: getattr(self.eval_co, f.name)[i] for f in fields(Coefficients)})


def make_plan(bridge: PhaseBridge, grid: torch.Tensor, tables, solver: str) -> StepPlan:
    """The StepPlan of a sampler: `grid` its nfe times, `tables` its step tables
    (`psb_fast.variants.step_tables(bridge, grid, order, variant, t_end)`; for the SDE solvers
    those of "multistep" at order 0), solver "ode", "sde", "em" or "sscs"."""
    times = grid.tolist()
    t_step, h = tables.t.tolist(), tables.h.tolist()
    Cx, Cv = tables.C[:, 0, 0].tolist(), tables.C[:, 1, 0].tolist()  # order 0 (the exact SDE step)
    S = len(h)
    t_eval = list(times)
    if solver == "sscs":
        t_eval[:S] = [t + 0.5 * dt for t, dt in zip(t_step, h, strict=True)]
    if solver in ("em", "sscs"):  # N at each step's evaluation time (t_i; SSCS: the midpoint)
        N = bridge.coefficients(torch.tensor(t_eval[:S], dtype=torch.float64)).normalizer.tolist()
    sde, sscs = [], []
    for i in range(S):
        if solver == "sde":
            sde.append(_sde_scalars("exact", bridge, t_step[i], h[i], Cx[i], Cv[i]))
        elif solver == "em":
            sde.append(_sde_scalars("em", bridge, t_step[i], h[i], N=N[i]))
        elif solver == "sscs":
            half = 0.5 * h[i]
            sscs.append((_sde_scalars("sscs_half", bridge, t_step[i], half), h[i] * N[i],
                         _sde_scalars("sscs_half", bridge, t_step[i] + half, half)))
    T_hop = times[-1]  # = T, or t0 when nfe == 1
    return StepPlan(
        bridge=bridge, t_step=tuple(t_step), h=tuple(h), t_eval=tuple(t_eval), sde=tuple(sde),
        sscs=tuple(sscs), T_hop=T_hop,
        hop_weights=bridge.hop_weights(T_hop) if tables.hop is None else tuple(tables.hop[-1].tolist()),
    )


def _hop(bridge: PhaseBridge, m, F, t: float, weights, backend: str, views=None) -> torch.Tensor:
    if backend == "float64":
        return bridge.estimate_x1(m, F, t)  # float64
    return _phase_hop_unchecked(m, F, weights, backend, views)


# ----------------------------------------------------------------------------- the solvers' steps


def solver_step(
    plan: StepPlan, solver: str, backend: str, noise: Noise,
    views: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Step:
    """step(i, m, F_i) of an SDE solver ("sde", "em", "sscs") for one run on m; views:
    split_phase(m), made once per run for the "cpu" backend. ("ode": `psb_fast.variants.Steps`.)"""
    if solver in ("sde", "em"):
        kind = "exact" if solver == "sde" else "em"

        def sde_step(i: int, m: torch.Tensor, F: torch.Tensor) -> None:
            # sde: m <- Phi(h) m + (Cx, Cv) F + chol(Q) xi;  em: x += h v, v += h N F + g sqrt(h) xi_v
            step = plan.sde[i]
            seed, xi = noise(m, i, kind, plan.t_step[i], step.h)
            _sde_step_unchecked(m, F, step, seed, 0, xi, backend, views)

        return sde_step

    def sscs_step(i: int, m: torch.Tensor, F: torch.Tensor) -> None:
        _, v_coef, second = plan.sscs[i]
        _phase_step_unchecked(m, [F], 0.0, [0.0], [v_coef], backend, views)  # v += h N(t_i + h/2) F
        seed, xi = noise(m, 2 * i + 1, "sscs_half", plan.t_eval[i], second.h)
        _sde_step_unchecked(m, None, second, seed, 0, xi, backend, views)  # second half, from the midpoint

    return sscs_step


def sscs_first_half(
    plan: StepPlan, backend: str, noise: Noise, views: tuple[torch.Tensor, torch.Tensor] | None = None
) -> Hook:
    """SSCS's first half step of each step, a before-evaluation hook: x += s v plus its noise, from
    t_i to the midpoint t_i + h_i/2 where F is then evaluated."""

    def half_step(i: int, m: torch.Tensor) -> None:
        if i < plan.n_steps:
            first = plan.sscs[i][0]
            seed, xi = noise(m, 2 * i, "sscs_half", plan.t_step[i], first.h)
            _sde_step_unchecked(m, None, first, seed, 0, xi, backend, views)

    return half_step


# ----------------------------------------------------------------------------- noise


def seeded_noise(seed: int) -> Noise:
    """Draw k of a run seeded with `seed`: the backend's own generator keyed by step_seed(seed, k)."""

    def noise(m: torch.Tensor, k: int, kind: str, t: float, h: float):
        return step_seed(seed, k), None

    return noise


def graph_noise(m: torch.Tensor, k: int, kind: str, t: float, h: float):
    """Draw k under CUDA-graph capture: normals from torch's graph-safe CUDA generator."""
    x_shape = (m.shape[0], m.shape[1] // 2, *m.shape[2:])
    return 0, (torch.randn(x_shape, device=m.device), torch.randn(x_shape, device=m.device))
