"""Learned step times and hop time per NFE (docs/math.md §7.5): the grid fitted to one model by
gradient through the sampler, kept only where it beats the grid search on held-out draws.

`psb_fast.tune(model, bridge, nfes, m0, learn=True)` runs `psb_fast.tuning.tune_learned`:

1. m0's rows are split into tuning, validation and evaluation draws (`Learn.val_share`,
   `Learn.eval_share`; disjoint, in that order). The model's converged solution (the target,
   `tuning.reference_solution`) is made once for all rows.
2. The grid search (`psb_fast.tune`) runs on the tuning draws only; its pick per NFE is the start.
3. `learn_setting` moves every grid time and the hop time T (order and variant stay the start's)
   to lower the mean squared error of the sampler's output against the target on the tuning draws,
   by Adam on the gradient through the whole sampler, and keeps the times with the lowest RMSE on
   the validation draws (early stopping).
4. Both settings run on the evaluation draws (`tuning.run_settings`, the production loop); the
   learned one is kept only when its RMSE there is lower and the paired difference of the per-draw
   squared errors is below zero by more than `Learn.keep_z` standard errors (the errors are heavy
   tailed: a few draws near a boundary between modes carry most of them, so a lower RMSE on a few
   hundred draws alone does not reproduce); the entry says which was kept, the ratio and z.

Parametrization (ordered by construction). In u = -log(1 - t), where the tables' coefficients
stay bounded up to t = 1 (§7.4), u_0 = -log(1 - t0) is fixed, the hop time is
u_T = u_0 + (u_max - u_0) sigmoid(s) with u_max = -log(1 - T_MAX), and the grid's increments are
(u_T - u_0) softmax(z): n - 1 positive steps summing to the span. Adjacent log-increments are kept
within MAX_LOG_GAP of the largest one (a step ratio far inside grids.MAX_STEP_RATIO).

Gradients. The step tables (Phi, C, D) and the hop weights at every grid time are built by the
production builders (`psb_fast.variants`, §7.3-§7.4: one implementation of the coefficients);
their Jacobian in u_1..u_{n-1} is taken by forward differences of step FD_STEP in u, each node's
column from the few steps it enters, all in one vectorized build (the tables are smooth in the
times at a fixed RK4 step count and Gauss-Legendre panel count). The tables enter the sampler as
base + J (u - u_now), so autograd sees their exact value and this Jacobian. The loop here
(`sample_grid`) is the sampler's update (§7.4, `variants.Steps`) written out of place for
autograd; tests/test_learn.py checks it equal to `tuning.run_settings` to float64 rounding.
`Learn.jacobian` sets how far the model is differentiated: "full" (through the state and the
time it is called at, the true gradient), "time" (through its time input only, the state
detached) or "none" (model outputs held constant: only the coefficients and the linear
propagation of the state are differentiated).

Soft teacher forcing (LD3, `Learn.teacher_ball` = r > 0): each tuning draw's start is free to move
within a ball of radius r sqrt(dim m) around its prior draw (a per-draw offset, optimized with the
times and projected back onto the ball), so the times are not bent to fit draws the student cannot
follow exactly. Validation and evaluation always start from the draws themselves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import checks
from .bridge import PhaseBridge, probode_hop_weights, split_phase
from .settings import Setting
from .variants import _make_tables, variant

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Largest hop time a learned setting may reach (tuning.T_MAX).
T_MAX = 0.995
#: Step in u = -log(1 - t) of the forward differences of the tables.
FD_STEP = 1e-6
#: Log-increments in u are kept within this of the largest (adjacent steps differ by <= ~200x).
MAX_LOG_GAP = math.log(200.0)
JACOBIANS = ("full", "time", "none")


@dataclass(frozen=True)
class Learn:
    """What `tune(..., learn=Learn(...))` does per NFE (`learn=True`: these defaults).

    steps: most Adam iterations; lr: Adam's step on the parameters (s, z) (module docstring);
    batch: tuning draws per iteration (None: all of them); val_every: iterations between
    validation checks; patience: checks without a better validation RMSE before stopping;
    jacobian: "full", "time" or "none" (module docstring); teacher_ball: the soft teacher-forcing
    radius r (0: off); val_share, eval_share: shares of m0's rows held out for early stopping and
    for the keep-or-not decision (the rest tunes); keep_z: standard errors by which the learned
    setting must win on the evaluation draws (module docstring); seed: of the minibatch order.
    """

    steps: int = 150
    lr: float = 0.01
    batch: int | None = None
    val_every: int = 5
    patience: int = 8
    jacobian: str = "full"
    teacher_ball: float = 0.0
    val_share: float = 0.2
    eval_share: float = 0.4
    keep_z: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks.count("steps", self.steps, 1)
        if self.batch is not None:
            checks.count("batch", self.batch, 1)
        checks.count("val_every", self.val_every, 1)
        checks.count("patience", self.patience, 1)
        checks.count("seed", self.seed, 0)
        checks.choice("jacobian", self.jacobian, JACOBIANS)
        for name, low, high in (("lr", "> 0", None), ("teacher_ball", ">= 0", None), ("keep_z", ">= 0", None),
                                ("val_share", "> 0", 1.0), ("eval_share", "> 0", 1.0)):
            value = checks.finite(name, getattr(self, name))
            if (value < 0 or (low == "> 0" and value == 0)) or (high is not None and value >= high):
                expected = f"{low}" + ("" if high is None else f" and < {high:g}")
                raise ValueError(f"{name} must be {expected}, got {value!r}")
        if self.val_share + self.eval_share >= 0.9:
            raise ValueError(f"val_share + eval_share must leave at least 10% of m0 to tune, got "
                             f"{self.val_share} + {self.eval_share}")


@dataclass
class Learned:
    """What `learn_setting` found: the setting (None when the learned grid is not a valid one),
    the start's and the best validation RMSE, the tuning RMSE at the start and at the best
    iterate, the iterations run, the seconds, and the curve [(iteration, tuning RMSE of that
    iteration's batch, validation RMSE)] at each check."""

    setting: Setting | None
    start_val: float
    best_val: float
    start_train: float
    best_train: float
    iterations: int
    seconds: float
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    note: str = ""


# ----------------------------------------------------------------------------- times <-> parameters


def _u_of(t: torch.Tensor) -> torch.Tensor:
    return -torch.log1p(-t)


def _t_of(u: torch.Tensor) -> torch.Tensor:
    return -torch.expm1(-u)


class GridParams:
    """The ordered grid of one NFE as parameters (s, z) (module docstring); `u()` the n times in u."""

    def __init__(self, grid: torch.Tensor, t0: float) -> None:
        u = _u_of(grid.to(torch.float64).cpu())
        self.u0, self.u_max = float(u[0]), float(_u_of(torch.tensor(T_MAX, dtype=torch.float64)))
        frac = min(max((float(u[-1]) - self.u0) / (self.u_max - self.u0), 1e-6), 1 - 1e-6)
        self.s = torch.tensor([math.log(frac / (1 - frac))], dtype=torch.float64, requires_grad=True)
        self.z = torch.log(u.diff()).clone().requires_grad_(True)
        self.t0 = t0

    def parameters(self) -> list[torch.Tensor]:
        return [self.s, self.z]

    def u(self) -> torch.Tensor:
        """The n grid times in u, float64 CPU, differentiable in (s, z); u[0] = u(t0) exactly."""
        u_T = self.u0 + (self.u_max - self.u0) * torch.sigmoid(self.s)
        steps = (u_T - self.u0) * torch.softmax(self.z, 0)
        inner = self.u0 + torch.cumsum(steps, 0)[:-1]
        return torch.cat([torch.full_like(u_T, self.u0), inner, u_T])

    @torch.no_grad()
    def clamp(self) -> None:
        """Keep the log-increments within MAX_LOG_GAP of the largest."""
        self.z.clamp_(min=float(self.z.max()) - MAX_LOG_GAP)

    @torch.no_grad()
    def grid(self) -> torch.Tensor:
        """The grid times t, float64 [n], t_0 = t0 exactly."""
        t = _t_of(self.u())
        t[0] = self.t0
        return t


def setting_of(grid: torch.Tensor, start: Setting) -> Setting:
    """A Setting for these grid times (float64 [n], from t0 to T): T = the last time, fractions of
    the times in the power-q coordinate of `start` (its q, order and variant)."""
    t = grid.to(torch.float64).cpu()
    q = start.q
    a, b = float(t[0]) ** (1 / q), float(t[-1]) ** (1 / q)
    r = ((t ** (1 / q) - a) / (b - a)).tolist()
    r[0], r[-1] = 0.0, 1.0
    return start.replace(T=float(t[-1]), fractions=tuple(r))


# ----------------------------------------------------------------------------- differentiable tables


@dataclass
class GridTables:
    """One setting's step tables and hop weights, float64 on the state's device, differentiable in
    the grid times: Phi [S, 2, 2], C [S, 2, order + 1], D [S, 2, order + 2] or None, hop [n, 3]
    the weights (a_F, a_x, a_v) of x1_hat at each grid time (the data form's sources; the hop at T)."""

    Phi: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor | None
    hop: torch.Tensor


def _hop_weights(bridge: PhaseBridge, t: torch.Tensor) -> torch.Tensor:
    """(a_F, a_x, a_v) of x1_hat at the times t (float64 [n]) -> [n, 3] (docs/math.md §8.1)."""
    co = bridge.coefficients(t)
    return torch.stack(probode_hop_weights(co.normalizer, co.P, co.hop_aa, co.hop_bb, co.hop_den), -1)


def grid_tables(bridge: PhaseBridge, u: torch.Tensor, order: int, name: str,
                device: torch.device | str = "cpu") -> GridTables:
    """The tables at the grid u (float64 [n] in u = -log(1 - t), u[0] fixed), as
    base + J (u - u_now): their value and their forward-difference Jacobian in u_1..u_{n-1}.

    Node k enters steps k - 1 .. k + order only (as an end, a predictor node or the corrector's
    new node), so its column is built from the sub-grid t_a .. t_b around it (a = k - 1 - order,
    b = k + order + 1, clipped), whose steps there have the full grid's history lengths; every
    sub-grid goes through one build with the whole grid (one RK4 step count for all)."""
    u_now = u.detach().cpu()
    n, S = len(u_now), len(u_now) - 1
    grids, spans = [_t_of(u_now)], []
    for k in range(1, n):
        a, b = max(0, k - 1 - order), min(n - 1, k + order + 1)
        shifted = u_now[a : b + 1].clone()
        shifted[k - a] += FD_STEP
        grids += [_t_of(u_now[a : b + 1]), _t_of(shifted)]
        spans.append((a, max(0, k - 1), min(S - 1, k + order)))
    made = _make_tables(bridge, variant(name), grids, [order] * len(grids), None)
    base = made[0]
    parts = {"Phi": base.Phi, "C": base.C, "D": base.D}
    jac = {key: None if value is None else torch.zeros(n - 1, *value.shape, dtype=torch.float64)
           for key, value in parts.items()}
    for col, (a, first, last) in enumerate(spans):
        plain, moved = made[1 + 2 * col], made[2 + 2 * col]
        for key, J in jac.items():
            if J is not None:
                diff = getattr(moved, key) - getattr(plain, key)
                J[col, first : last + 1] = diff[first - a : last + 1 - a]
    t_now = _t_of(u_now)
    hop = _hop_weights(bridge, torch.cat([t_now, _t_of(u_now[1:] + FD_STEP)]))
    jac_hop = torch.zeros(n - 1, n, 3, dtype=torch.float64)
    jac_hop[torch.arange(n - 1), torch.arange(1, n)] = hop[n:] - hop[1:n]
    du = ((u - u.detach())[1:] / FD_STEP).to(device)

    def live(value: torch.Tensor | None, J: torch.Tensor | None) -> torch.Tensor | None:
        if value is None:
            return None
        return value.to(device) + torch.tensordot(du, J.to(device), 1)

    return GridTables(live(base.Phi, jac["Phi"]), live(base.C, jac["C"]), live(base.D, jac["D"]),
                      live(hop[:n], jac_hop))


# ----------------------------------------------------------------------------- the differentiable loop


def sample_grid(
    model: Model, m0: torch.Tensor, times: torch.Tensor, tables: GridTables, order: int, name: str,
    jacobian: str = "full",
) -> torch.Tensor:
    """The probODE sampler with the hop (docs/math.md §7.4, §10.3) out of place, float64 state:
    x1 [B, C, ...] from m0 [B, 2C, ...] at the grid `times` ([n] float64, may require grad) with
    `tables` (`grid_tables`). The model is called in m0's dtype with a [B] time; `jacobian` says
    how far it is differentiated (module docstring)."""
    record = variant(name)
    x, v = (part.to(torch.float64) for part in split_phase(m0))
    Phi, C, D, hop = tables.Phi, tables.C, tables.D, tables.hop
    n, B = len(times), m0.shape[0]
    history: list[torch.Tensor] = []  # Y_i, Y_{i-1}, ... newest first
    F = None
    for i in range(n):
        t_i = times[i] if jacobian != "none" else times[i].detach()
        m_in = torch.cat([x, v], 1)
        if jacobian != "full":
            m_in = m_in.detach()
        F = model(m_in.to(m0.dtype), t_i.to(m0.device, m0.dtype).expand(B)).to(torch.float64)  # F_i
        if jacobian == "none":
            F = F.detach()
        Y = F if record.form == "F" else hop[i, 0] * F + hop[i, 1] * x + hop[i, 2] * v  # Y_i
        history.insert(0, Y)
        if D is not None and i > 0:  # correct step i - 1 with Y_i (evaluated at the predicted state)
            q = min(i - 1, order)
            x = x + sum(D[i - 1, 0, j] * history[j] for j in range(q + 2))
            v = v + sum(D[i - 1, 1, j] * history[j] for j in range(q + 2))
        del history[order + 1 :]
        if i == n - 1:  # t_i = T: the hop follows
            break
        q = min(i, order)  # m_{i+1} = Phi_i m_i + sum_j C_{i,j} Y_{i-j}
        x, v = (Phi[i, 0, 0] * x + Phi[i, 0, 1] * v + sum(C[i, 0, j] * history[j] for j in range(q + 1)),
                Phi[i, 1, 0] * x + Phi[i, 1, 1] * v + sum(C[i, 1, j] * history[j] for j in range(q + 1)))
    return hop[-1, 0] * F + hop[-1, 1] * x + hop[-1, 2] * v  # x1 = a_F F + a_x x + a_v v at T


def _rmse(x1: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (x1 - target.to(x1.device, torch.float64)).pow(2).mean().sqrt()


# ----------------------------------------------------------------------------- learning one NFE


def learn_setting(
    model: Model, bridge: PhaseBridge, nfe: int, start: Setting,
    m_tune: torch.Tensor, target_tune: torch.Tensor, m_val: torch.Tensor, target_val: torch.Tensor,
    options: Learn | None = None, t0: float = 1e-5, progress: bool = True,
) -> Learned:
    """Learn the nfe grid times and T from `start` (module docstring): Adam on the MSE against
    target_tune ([B, C, ...], x1 from m_tune) through `sample_grid`, the iterate with the lowest
    RMSE on (m_val, target_val) kept (iterates whose grid fails the spacing check of
    psb_fast.grids are never kept). Returns a `Learned` whose setting has the start's q, order and
    variant and free fractions (None, with a note, when no iterate beat the start)."""
    from .progress import progress_bar

    options = Learn() if options is None else options
    start = Setting.coerce(start)
    nfe = checks.count("nfe", nfe, 2)
    start.check(nfe, t0)
    begin = time.perf_counter()
    params = GridParams(start.grid(nfe, t0), t0)
    device = m_tune.device
    gen = torch.Generator().manual_seed(options.seed)
    opt = torch.optim.Adam(params.parameters(), lr=options.lr)
    offset = None
    if options.teacher_ball > 0:
        offset = torch.zeros_like(m_tune, dtype=torch.float32, requires_grad=True)
        opt.add_param_group({"params": [offset], "lr": options.teacher_ball / 10})
        radius = options.teacher_ball * math.sqrt(m_tune[0].numel())

    def validate() -> float:
        """RMSE on the validation draws; inf for a grid that is not a valid setting (spacing)."""
        try:
            setting_of(params.grid(), start).check(nfe, t0)
        except ValueError:
            return math.inf
        with torch.no_grad():
            u = params.u()
            tables = grid_tables(bridge, u, start.order, start.variant, device)
            x1 = sample_grid(model, m_val, _t_of(u), tables, start.order, start.variant, "none")
            return float(_rmse(x1, target_val))

    best_val = start_val = validate()
    best_state = [p.detach().clone() for p in params.parameters()]
    curve: list[tuple[int, float, float]] = []
    train_at_best = start_train = math.nan
    stale, it, note = 0, 0, ""
    bar = progress_bar(total=options.steps, desc=f"learn NFE {nfe}", unit="step", disable=not progress)
    B = m_tune.shape[0]
    batch = B if options.batch is None else min(options.batch, B)
    with torch.enable_grad():
        while it < options.steps:
            rows = torch.randperm(B, generator=gen)[:batch].to(device) if batch < B else None
            m_b = m_tune if rows is None else m_tune[rows]
            target_b = target_tune if rows is None else target_tune[rows]
            if offset is not None:
                m_b = m_b + (offset if rows is None else offset[rows]).to(m_b.dtype)
            u = params.u()
            tables = grid_tables(bridge, u, start.order, start.variant, device)
            x1 = sample_grid(model, m_b, _t_of(u), tables, start.order, start.variant, options.jacobian)
            loss = (x1 - target_b.to(x1.device, torch.float64)).pow(2).mean()
            wrt = params.parameters() + ([offset] if offset is not None else [])
            grads = torch.autograd.grad(loss, wrt)
            if not all(bool(torch.isfinite(g).all()) for g in grads):
                note = f"stopped at iteration {it}: non-finite gradient"
                break
            opt.zero_grad(set_to_none=True)
            for p, g in zip(wrt, grads, strict=True):
                p.grad = g
            opt.step()
            params.clamp()
            if offset is not None:
                with torch.no_grad():
                    norms = offset.flatten(1).norm(dim=1).clamp(min=1e-30)
                    offset.mul_((radius / norms).clamp(max=1.0).reshape(-1, *(1,) * (offset.dim() - 1)))
            it += 1
            train = math.sqrt(float(loss.detach()))
            if it == 1:
                start_train = train_at_best = train
            bar.update(1)
            if it % options.val_every == 0 or it == options.steps:
                val = validate()
                curve.append((it, train, val))
                if val < best_val:
                    best_val, train_at_best, stale = val, train, 0
                    best_state = [p.detach().clone() for p in params.parameters()]
                else:
                    stale += 1
                bar.set_postfix_str(f"train {train:.3e} val {val:.3e} best {best_val:.3e} "
                                    f"(start {start_val:.3e})")
                if stale >= options.patience:
                    note = f"early stop at iteration {it}"
                    break
    bar.close()
    with torch.no_grad():
        params.s.copy_(best_state[0])
        params.z.copy_(best_state[1])
    setting = setting_of(params.grid(), start) if best_val < start_val else None
    if setting is None:
        note = "no iterate beat the start on the validation draws"
    return Learned(setting, start_val, best_val, start_train, train_at_best, it,
                   time.perf_counter() - begin, curve, note)


# ----------------------------------------------------------------------------- tune(..., learn=...)


def paired_z(a: torch.Tensor, b: torch.Tensor) -> float:
    """z = mean(a - b) / (std(a - b) / sqrt(B)) of per-draw errors a, b [B] on the same draws
    (negative: a is lower); 0 when they are equal on every draw."""
    diff = (a - b).to(torch.float64)
    se = float(diff.std()) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
    return float(diff.mean()) / se if se > 0 else 0.0


def split_rows(B: int, options: Learn) -> tuple[slice, slice, slice]:
    """The tuning, validation and evaluation rows of a batch of B prior draws (disjoint, in order)."""
    n_eval = round(B * options.eval_share)
    n_val = round(B * options.val_share)
    n_tune = B - n_eval - n_val
    if min(n_eval, n_val, n_tune) < 4:
        raise ValueError(f"m0 must hold enough rows for tuning, validation and evaluation draws (at least 4 "
                         f"each with val_share={options.val_share}, eval_share={options.eval_share}), got "
                         f"{B} rows")
    return slice(0, n_tune), slice(n_tune, n_tune + n_val), slice(n_tune + n_val, B)
