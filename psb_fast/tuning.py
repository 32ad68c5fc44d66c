"""Per-NFE tuning of the probability-flow sampler: hop time T, grid power q, solver order, variant.

A setting (`psb_fast.settings.Setting(T, q, order, fractions, variant)`) means: the power grid
t_i = (t0^(1/q) + i/(n-1) (T^(1/q) - t0^(1/q)))^q with n = NFE points (q = 2 is the published
"rev-quad", q = 1 uniform), the update of `order` (0..3) and `variant` (docs/math.md §7.1, §7.4)
between them, and the hop (docs/math.md §8.1) at T. A setting with `fractions` replaces the
uniform i/(n-1) by free fractions 0 = r_0 < ... < r_{n-1} = 1 (`psb_fast.grids.power_grid`);
`optimize_grid` searches them. The functions here take Settings, or tuples (T, q, order[,
fractions]) (`Setting.coerce`).

`tune` picks, per NFE, the setting with the smallest pathwise RMSE of the sampler's output
against a high-accuracy solution from the same prior draws (for a user's own model:
REFERENCE_SETTING at `reference_nfe`). The search is coarse-to-fine: the product Ts x qs x
orders x variants on a sub-batch, then the best few and a finer T neighbourhood of each on the
whole batch. The defaults study (studies/defaults_study.py) runs the same machinery on generated
exact-drift problems and trained models to produce the package defaults (psb_fast/defaults.json).

Every setting of one NFE runs in PhaseSampler's loop (`psb_fast.loop.integrate`), batched: the
prior batch is repeated once per setting and each row gets its own time (`model(m, t)` with a
per-row t, as in training) and its own step tables and hop weights, so a sweep costs NFE model
calls per chunk of `max_rows` rows (settings of one variant share a chunk). The state is kept in
float64 (the model is called in m0's dtype); for the multistep variant the outputs equal the
reference `sample_ode`'s to float64 rounding.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

import torch
from tqdm.auto import tqdm

from .bridge import PhaseBridge, probode_hop_weights
from .defaults import default_setting
from .loop import Hooks, ModelCall, Multistep, hop_rows, integrate, multistep_rows
from .multistep import multistep_coefficients
from .settings import T_END, VARIANTS, Setting, published_setting
from .variant_tables import VariantTables, variant_tables_many
from .variants import VariantSteps, variant_form

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

T_MAX = 0.995
#: Hop-time candidates per NFE: tau = 1 - T of the package default at that NFE times these.
TAU_FACTORS: tuple[float, ...] = (1.6, 1.25, 1.0, 0.8, 0.64, 0.5)
DEFAULT_QS: tuple[float, ...] = (1.5, 2.0)
DEFAULT_ORDERS: tuple[int, ...] = (1, 2)
#: The corrector variants (docs/math.md §7.4): the least sensitive to their settings.
DEFAULT_VARIANTS: tuple[str, ...] = ("multistep-corrector", "data-corrector")
#: The target of `tune`: the order-3 corrector to T_END on the uniform grid, at reference_nfe
#: (on the demo's trained model NFE 400 is within 2.2e-5 of NFE 1600; the q = 2 grid at NFE 200,
#: the earlier target, was 2.6e-3 away: `python -m studies.trained_models`).
REFERENCE_SETTING = Setting(T_END, 1.0, 3, None, "multistep-corrector")
#: Rows (prior draws x settings) per model call when max_rows is None: ROW_ELEMENTS / numel(x).
ROW_ELEMENTS = 1 << 20
FORMAT = "psb_fast.tuned/1"


# ----------------------------------------------------------------------------- the batched sampler


@lru_cache(maxsize=8192)
def _coefficients(bridge_key: tuple, nfe: int, t0: float, setting: Setting):
    grid = setting.grid(nfe, t0)
    co = multistep_coefficients(_bridge(bridge_key), grid, setting.order)
    return grid, co


@lru_cache(maxsize=16)
def _bridge(bridge_key: tuple) -> PhaseBridge:
    """The bridge of a key, made once (making one collapses its closed forms: milliseconds)."""
    return PhaseBridge(*bridge_key)


def _setting_tables(bridge: PhaseBridge, nfe: int, settings: Sequence[Setting], t0: float):
    """times [C, nfe], h [C, nfe-1], Cx/Cv [C, nfe-1, 4] (zero-padded to order 3), T [C]."""
    C, S = len(settings), max(nfe - 1, 0)
    times = torch.empty(C, nfe, dtype=torch.float64)
    h = torch.zeros(C, S, dtype=torch.float64)
    Cx = torch.zeros(C, S, 4, dtype=torch.float64)
    Cv = torch.zeros(C, S, 4, dtype=torch.float64)
    for c, setting in enumerate(settings):
        grid, co = _coefficients(bridge.key(), nfe, float(t0), setting)
        times[c] = grid
        if S:
            h[c] = co.h
            Cx[c, :, : setting.order + 1] = co.Cx
            Cv[c, :, : setting.order + 1] = co.Cv
    return times, h, Cx, Cv, times[:, -1].clone()


_VARIANT_TABLES: dict[tuple, VariantTables] = {}


def _variant_tables(
    bridge: PhaseBridge, nfe: int, settings: Sequence[Setting], t0: float
) -> list[VariantTables]:
    """`variant_tables` of each setting (one form), the missing ones made in one call, cached."""
    form = variant_form(settings[0].variant)[0]
    keys = [(bridge.key(), nfe, float(t0), s.replace(variant=VARIANTS[0]), form) for s in settings]
    missing = sorted({k for k in keys if k not in _VARIANT_TABLES})
    if missing:
        if len(_VARIANT_TABLES) > 20000:
            _VARIANT_TABLES.clear()
        grids, orders = [k[3].grid(nfe, t0) for k in missing], [k[3].order for k in missing]
        made = variant_tables_many(bridge, grids, orders, form)
        _VARIANT_TABLES.update(zip(missing, made, strict=True))
    return [_VARIANT_TABLES[k] for k in keys]


def run_settings(
    model: Model,
    bridge: PhaseBridge,
    m0: torch.Tensor,
    nfe: int,
    settings: Sequence[Setting],
    t0: float = 1e-5,
    max_rows: int | None = None,
    on_done: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Hop outputs x1_hat of the probODE sampler for every setting, float64 [C, B, C_x, ...].

    Equal (to rounding) to `reference.sampler.sample_ode(model, m0, bridge, setting.grid(nfe, t0),
    setting.order, hop=True)` per setting (a Setting or (T, q, order[, fractions]); all are checked
    before the first model call).
    max_rows: rows per model call (settings are batched whole; None -> len(m0), i.e. one
    setting per call). Raising it batches settings (the model must accept a per-row t).
    on_done: called with the number of settings just finished after each model-call batch
    (progress reporting).
    """
    if bridge.mode != "probODE":
        raise ValueError(f"tuning needs a probODE bridge, got mode={bridge.mode!r}")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an int >= 1, got {nfe!r}")
    settings = [Setting.coerce(s) for s in settings]
    for setting in settings:
        setting.check(nfe, t0)
    if not settings:
        raise ValueError("settings must not be empty")
    B = m0.shape[0]
    per_chunk = max(1, (max_rows or B) // B)
    # Settings of one variant share a chunk (one loop); outputs go back in the given order.
    order_of = sorted(range(len(settings)), key=lambda c: VARIANTS.index(settings[c].variant))
    outs: list[torch.Tensor | None] = [None] * len(settings)
    start = 0
    while start < len(order_of):
        variant = settings[order_of[start]].variant
        stop = start
        while (stop < len(order_of) and stop - start < per_chunk
               and settings[order_of[stop]].variant == variant):
            stop += 1
        chunk = [settings[c] for c in order_of[start:stop]]
        run = _run_chunk if variant == VARIANTS[0] else _run_variant_chunk
        for c, out in zip(order_of[start:stop], run(model, bridge, m0, nfe, chunk, t0), strict=True):
            outs[c] = out
        if on_done is not None:
            on_done(len(chunk))
        start = stop
    return torch.stack(outs, dim=0)


def _run_chunk(model, bridge, m0, nfe, settings, t0) -> torch.Tensor:
    """The hop outputs of `settings` from the prior batch m0, [C, B, C_x, ...] float64.

    The sampler's loop (`psb_fast.loop.integrate`, as in PhaseSampler) on one float64 state that
    stacks the settings (row c B + b: setting c, prior draw b): each row has its own evaluation
    times and multistep coefficients (`loop.multistep_rows`), and the model is called once per
    evaluation on all rows (in m0's dtype, with a per-row t).
    """
    times, h, Cx, Cv, T = _setting_tables(bridge, nfe, settings, t0)
    C, B = len(settings), m0.shape[0]
    rows, unit = C * B, (1,) * (m0.dim() - 1)
    order = max(setting.order for setting in settings)

    def per_row(a: torch.Tensor) -> torch.Tensor:  # [C, ...] -> [..., C B, 1, ...] on m0's device
        a = a.to(m0.device).repeat_interleave(B, dim=0)
        return a.movedim(0, -1).reshape(*a.shape[1:], rows, *unit).contiguous()

    h_rows, Cx_rows, Cv_rows = per_row(h), per_row(Cx[..., : order + 1]), per_row(Cv[..., : order + 1])
    steps = [(None, h_rows[i], Cx_rows[i, : min(i, order) + 1], Cv_rows[i, : min(i, order) + 1])
             for i in range(nfe - 1)]
    co = bridge.coefficients(T)  # the hop's weights at each setting's T, folded in float64
    weights = [per_row(w) for w in probode_hop_weights(co.normalizer, co.P, co.hop_aa, co.hop_bb, co.hop_den)]
    return _run_rows(model, m0, times, Multistep(steps, order, multistep_rows), None, weights)


def _run_rows(model, m0: torch.Tensor, times: torch.Tensor, step, correct, hop_weights) -> torch.Tensor:
    """The loop on one float64 state stacking C settings (row c B + b: setting c, prior draw b),
    then the hop with per-row weights; times: [C, nfe] evaluation times. [C, B, C_x, ...]."""
    C, nfe = times.shape
    B, unit = m0.shape[0], (1,) * (m0.dim() - 1)
    m = m0.detach().to(torch.float64).repeat((C,) + unit)  # m_0 of every row
    t_rows = times.to(m0.device).repeat_interleave(B, dim=0).T.to(m0.dtype).contiguous()  # [nfe, C B]
    F = integrate(m, evaluate=ModelCall(model, None, t_rows.unbind(0), m0.dtype, m), step=step,
                  nfe=nfe, n_steps=nfe - 1, hooks=Hooks(), correct=correct)
    x1 = hop_rows(m, F, hop_weights)  # x1 = a_F F + a_x x + a_v v at each row's T
    return x1.reshape(C, B, *x1.shape[1:])


def _run_variant_chunk(model, bridge, m0, nfe, settings, t0) -> torch.Tensor:
    """As `_run_chunk` for settings of one other variant (psb_fast.variants), [C, B, C_x, ...]:
    `VariantSteps` with per-row tables (orders zero-padded to the largest)."""
    form, corrector = variant_form(settings[0].variant)
    tables = _variant_tables(bridge, nfe, settings, t0)
    C, B = len(settings), m0.shape[0]
    rows, unit = C * B, (1,) * (m0.dim() - 1)
    order = max(setting.order for setting in settings)
    S = max(nfe - 1, 0)

    def per_row(a: torch.Tensor) -> torch.Tensor:  # [C] -> [C B, 1, ...] on m0's device
        return a.to(m0.device).repeat_interleave(B).reshape(rows, *unit)

    def padded(name: str, width: int) -> torch.Tensor:  # [C, S, 2, width]
        out = torch.zeros(C, S, 2, width, dtype=torch.float64)
        for c, tab in enumerate(tables):
            value = getattr(tab, name)
            out[c, :, :, : value.shape[-1]] = value
        return out

    Phi, Cs, Ds = padded("Phi", 2), padded("C", order + 1), padded("D", order + 2)
    step_rows = []
    for i in range(S):
        q = min(i, order)
        phi = tuple(per_row(Phi[:, i, r, k]) for r in (0, 1) for k in (0, 1))
        c = [(per_row(Cs[:, i, 0, j]), per_row(Cs[:, i, 1, j])) for j in range(q + 1)]
        d = None
        if corrector:
            d = [(per_row(Ds[:, i, 0, j]), per_row(Ds[:, i, 1, j])) for j in range(q + 2)]
        step_rows.append((phi, c, d))
    times = torch.stack([setting.grid(nfe, t0) for setting in settings])  # [C, nfe]
    # hop weights per row at every evaluation time (the data form's x1 estimates) or at T only
    at = times if form == "data" else times[:, -1:]
    co = bridge.coefficients(at)
    weights = probode_hop_weights(co.normalizer, co.P, co.hop_aa, co.hop_bb, co.hop_den)  # each [C, len]
    hop_at = [tuple(per_row(w[:, i]) for w in weights) for i in range(at.shape[1])]
    steps = VariantSteps(step_rows, order, form, hop_at if form == "data" else None)
    return _run_rows(model, m0, times, steps.step, steps.correct, hop_at[-1])  # hop: the corrected state


def rmse(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pathwise RMSE per setting: sqrt(mean over samples and coordinates), [C] float64 (CPU)."""
    diff = outputs.to(torch.float64) - target.to(outputs.device, torch.float64).unsqueeze(0)
    return diff.reshape(diff.shape[0], -1).pow(2).mean(1).sqrt().cpu()


def settings_rmse(
    model: Model, bridge: PhaseBridge, m0: torch.Tensor, target: torch.Tensor, nfe: int,
    settings: Sequence[Setting], t0: float = 1e-5, max_rows: int | None = None,
    on_done: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """RMSE of every setting's output against `target` (x1 from the same m0), [C] float64."""
    return rmse(run_settings(model, bridge, m0, nfe, settings, t0, max_rows, on_done), target)


def reference_solution(
    model: Model, bridge: PhaseBridge, m0: torch.Tensor, nfe: int = 400, t0: float = 1e-5,
    max_rows: int | None = None,
) -> torch.Tensor:
    """The high-NFE target: REFERENCE_SETTING (order-3 corrector, uniform grid to T = 0.999, with
    the hop) at `nfe`. float64 [B, ...]."""
    return run_settings(model, bridge, m0, nfe, [REFERENCE_SETTING], t0, max_rows)[0]


def hop_times(nfe: int, factors: Sequence[float] = TAU_FACTORS) -> list[float]:
    """`tune`'s hop-time candidates at one NFE: 1 - tau f for the package default's tau = 1 - T."""
    tau = 1.0 - default_setting(nfe).T
    return sorted({round(1.0 - min(max(tau * f, 1.0 - T_MAX), 0.9), 5) for f in factors})


# ----------------------------------------------------------------------------- the search


def refine_candidates(
    best: Iterable[Setting], Ts: Sequence[float], t0: float = 1e-5,
    t_steps: int = 4, q_step: float = 0.125, q_points: int = 5,
) -> list[Setting]:
    """Finer settings around each of `best`, same order and variant: T between its neighbours in Ts
    (uniform in log(1 - T), t_steps per coarse interval); q + j q_step for the q_points
    values of j centred on 0 (default q, q +- 0.125, q +- 0.25). Power-q grids only (fractions of
    `best` are not carried over)."""
    Ts = sorted({float(T) for T in Ts})
    out: set[Setting] = set()
    for setting in map(Setting.coerce, best):
        T, q = setting.T, setting.q
        k = min(range(len(Ts)), key=lambda i: abs(Ts[i] - T))
        lo = min(Ts[max(k - 1, 0)], T)
        hi = max(Ts[min(k + 1, len(Ts) - 1)], T)
        T_cands = {float(T), lo, hi}
        if hi > lo:
            u_lo, u_hi, n = -math.log1p(-lo), -math.log1p(-hi), 2 * t_steps
            T_cands |= {round(-math.expm1(-(u_lo + (u_hi - u_lo) * j / n)), 6) for j in range(1, n)}
        half = q_points // 2
        q_cands = {round(q + j * q_step, 4) for j in range(-half, q_points - half)}
        for T_c in T_cands:
            for q_c in q_cands:
                if t0 < T_c < 1 and q_c > 0:
                    out.add(setting.replace(T=T_c, q=q_c, fractions=None))
    return sorted(out)


def fractions_from_log_gaps(log_gaps: Sequence[float], decimals: int = 5) -> tuple[float, ...]:
    """Fractions 0 = r_0 < ... < r_n = 1 from n log-gaps: r_i = cumsum(exp(log_gaps))_i / sum,
    rounded to `decimals` (so settings are exactly reproducible from JSON)."""
    gaps = [math.exp(g) for g in log_gaps]
    total, acc, out = sum(gaps), 0.0, [0.0]
    for g in gaps[:-1]:
        acc += g
        out.append(round(acc / total, decimals))
    return tuple(out + [1.0])


def log_gaps(nfe: int, fractions: Sequence[float] | None) -> list[float]:
    """Inverse of `fractions_from_log_gaps` (None -> the uniform grid: all zeros), nfe - 1 values."""
    if fractions is None:
        return [0.0] * (nfe - 1)
    return [math.log(b - a) for a, b in zip(fractions[:-1], fractions[1:], strict=False)]


def optimize_grid(
    objective: Callable[[list[Setting]], torch.Tensor],
    nfe: int,
    start: Setting,
    step: float = 0.4,
    min_step: float = 0.1,
    max_iter: int = 30,
    T_max: float = T_MAX,
) -> tuple[Setting, float, int]:
    """Compass search over the hop time and the free grid of one NFE, at fixed q and order.

    Coordinates: u = -log(1 - T) and the nfe - 1 log-gaps of the fractions (a gap g_i is the
    share r_{i+1} - r_i of the power-q coordinate; `fractions_from_log_gaps`). Each iteration
    evaluates all 2 nfe moves of +-step along one coordinate in ONE objective call (a list of
    settings -> [C] values, lower is better, e.g. the log-RMSE against exact targets), takes
    the best if it lowers the objective, else halves the step; stops below min_step or after
    max_iter iterations. The objective must be deterministic (fixed prior draws).

    Returns (the best setting, with fractions, its objective value, iterations run).
    """
    if nfe < 3:
        raise ValueError(f"a free grid needs nfe >= 3 (an interior node), got {nfe}")
    start = Setting.coerce(start)
    theta = [-math.log1p(-start.T)] + log_gaps(nfe, start.fractions)
    u_max = -math.log1p(-T_max)

    def setting(th: list[float]) -> Setting:
        T_th = round(-math.expm1(-min(max(th[0], 1e-3), u_max)), 5)
        fractions = fractions_from_log_gaps([min(max(g, -5.0), 5.0) for g in th[1:]])
        return start.replace(T=T_th, fractions=fractions)

    best = float(objective([setting(theta)])[0])
    it = 0
    while it < max_iter and step >= min_step:
        it += 1
        moves = [theta[:k] + [theta[k] + sgn * step] + theta[k + 1:]
                 for k in range(len(theta)) for sgn in (1, -1)]
        values = objective([setting(th) for th in moves])
        i = int(values.argmin())
        if float(values[i]) < best - 1e-6:
            theta, best = moves[i], float(values[i])
        else:
            step /= 2
    return setting(theta), best, it


def tune(
    model: Model,
    bridge: PhaseBridge,
    nfes: Iterable[int],
    m0: torch.Tensor,
    Ts: Sequence[float] | None = None,
    qs: Sequence[float] | None = None,
    orders: Sequence[int] | None = None,
    reference_nfe: int = 400,
    variants: Sequence[str] | None = None,
    progress: bool = True,
    t0: float = 1e-5,
    refine: bool = True,
    top_k: int = 3,
    coarse_rows: int | None = 256,
    max_rows: int | None = None,
    target: torch.Tensor | None = None,
    free_grid: bool = False,
) -> dict[int, dict]:
    """Choose (T, q, order, variant[, fractions]) per NFE for `model` by the RMSE against its own
    high-NFE solution.

    model(m, t) -> F as for `PhaseSampler.sample`; m0: a prior batch ([B, 2C, ...], e.g.
    bridge.sample_prior with a fixed generator). Use B >= 1000 where you can: at low NFE the
    error is dominated by the few samples that the sampler sends to another mode than the
    exact flow, and with a few hundred rows the search picks settings that happen to spare
    those particular samples (a winner's curse; the tuned gain then fails to reproduce).

    Search: the product Ts x qs x orders x variants (defaults: `hop_times(nfe)` around the
    package default's T, DEFAULT_QS, DEFAULT_ORDERS, DEFAULT_VARIANTS) on the first
    `coarse_rows` rows of m0 (None: all), then, with refine, the `top_k` best and a finer T/q
    neighbourhood of each (`refine_candidates`) on all of m0; the published setting and the
    package default are candidates in both stages, so the chosen RMSE is at most theirs on m0.
    reference_nfe: NFE of the target solution (REFERENCE_SETTING); or pass the target itself
    ([B, C, ...], x1 from the same m0). max_rows: see `run_settings` (None: ROW_ELEMENTS / the
    number of elements of one data point, at least len(m0)).
    free_grid: then, for NFE >= 3, move T and every grid node (`optimize_grid` on the log-RMSE
    over all of m0) and add the "fractions" of the grid; this fits nfe parameters to m0, so
    check the result on fresh prior draws.

    Returns {nfe: {"T", "q", "order", ["variant",] ["fractions",] "rmse", "published": [T, q,
    order], "published_rmse", "ratio", "default": <the package default's setting JSON>,
    "default_rmse"}} (errors on all of m0; ratio = rmse / published_rmse).
    """
    nfes = sorted({int(n) for n in nfes})
    if not nfes or nfes[0] < 1:
        raise ValueError(f"nfes must be a non-empty set of ints >= 1, got {nfes}")
    qs = tuple(DEFAULT_QS if qs is None else qs)
    orders = tuple(DEFAULT_ORDERS if orders is None else orders)
    variants = tuple(DEFAULT_VARIANTS if variants is None else variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variants must be among {VARIANTS}, got {unknown}")

    def grid_of(nfe: int) -> tuple[list[Setting], tuple[float, ...]]:
        Ts_n = tuple(hop_times(nfe) if Ts is None else Ts)
        space = sorted({Setting(T, q, o, None, v)
                        for T in Ts_n for q in qs for o in orders for v in variants})
        if not space:
            raise ValueError("the search space (Ts x qs x orders x variants) is empty")
        return space, Ts_n

    for nfe in nfes:
        grid_of(nfe)
    if max_rows is None:
        max_rows = max(len(m0), ROW_ELEMENTS // max(1, m0[0].numel() // 2))
    if target is None:
        target = reference_solution(model, bridge, m0, reference_nfe, t0, max_rows)
    n_coarse = len(m0) if coarse_rows is None else max(1, min(int(coarse_rows), len(m0)))
    result: dict[int, dict] = {}
    # one bar over every candidate run (coarse stages counted up front, refinements when known)
    def fixed(nfe: int) -> list[Setting]:  # the published setting first, then the package default
        return list(dict.fromkeys([published_setting(nfe), default_setting(nfe)]))

    bar = tqdm(total=sum(len(set(grid_of(n)[0]) | set(fixed(n))) for n in nfes), unit="candidate",
               disable=not progress, desc="tune")
    for nfe in nfes:
        bar.set_postfix_str(f"NFE {nfe}")
        coarse, Ts_n = grid_of(nfe)
        pub, default = published_setting(nfe), default_setting(nfe)
        cands = fixed(nfe) + [s for s in coarse if s not in fixed(nfe)]
        errs = settings_rmse(model, bridge, m0[:n_coarse], target[:n_coarse], nfe, cands, t0, max_rows,
                             bar.update)
        if refine:
            best = [cands[i] for i in errs.argsort()[:top_k].tolist()]
            finer = set(best) | set(refine_candidates(best, Ts_n, t0, t_steps=2, q_points=1))
            final = fixed(nfe) + [s for s in sorted(finer) if s not in fixed(nfe)]
        else:
            final = cands
        if refine or n_coarse < len(m0):
            bar.total += len(final)
            bar.refresh()
            errs = settings_rmse(model, bridge, m0, target, nfe, final, t0, max_rows, bar.update)
        i = int(errs.argmin())
        best, err, err_pub = final[i], float(errs[i]), float(errs[0])
        if free_grid and nfe >= 3:
            def log_rmse(settings, nfe=nfe):
                return settings_rmse(model, bridge, m0, target, nfe, settings, t0, max_rows).log()

            grid_best, log_err, _ = optimize_grid(log_rmse, nfe, best)
            if math.exp(log_err) < err:
                best, err = grid_best, math.exp(log_err)
        result[nfe] = {
            **_entry(best), "rmse": err, "published": list(pub.as_tuple()),
            "published_rmse": err_pub, "ratio": err / err_pub if err_pub > 0 else 1.0,
            "default": default.to_json(), "default_rmse": float(errs[final.index(default)]),
        }
    bar.close()
    return result


def _entry(setting: Setting) -> dict:
    """A setting as a tuned-file entry: "T", "q", "order", and "fractions" for a free grid (the
    file format of psb_fast.tuned/1; a non-default variant is written too)."""
    entry = setting.to_json()
    if entry["fractions"] is None:
        del entry["fractions"]
    if entry["variant"] == VARIANTS[0]:
        del entry["variant"]
    return entry


# ----------------------------------------------------------------------------- JSON


def save_tuned(result: dict[int, dict], path: str | os.PathLike) -> None:
    """Write a `tune` result as JSON ({"format", "settings": {"<nfe>": {...}}})."""
    settings = _validate(result, str(path))
    payload = {"format": FORMAT, "settings": {str(n): settings[n] for n in sorted(settings)}}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1)
        fh.write("\n")


def load_tuned(path: str | os.PathLike) -> dict[int, dict]:
    """Read a file written by `save_tuned`: {nfe: {"T", "q", "order"[, "fractions"], ...}}.

    Raises ValueError naming the problem if the file is not valid JSON or a setting is malformed
    (NFE not an int >= 1, T not in (0, 1), q not finite > 0, order not an int in 0..3, fractions
    not nfe numbers rising strictly from 0 to 1, variant unknown): `Setting.from_json` checks each
    entry. `PhaseSampler.from_tuned` maps an entry to a grid with `Setting.from_json(entry).grid(nfe, t0)`.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            payload = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a valid tuned-settings JSON file ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: expected a JSON object with format {FORMAT!r}")
    settings = payload.get("settings")
    if not isinstance(settings, dict) or not settings:
        raise ValueError(f"{path}: 'settings' must be a non-empty object mapping NFE -> setting")
    parsed = {}
    for key, value in settings.items():
        try:
            nfe = int(key)
        except ValueError:
            raise ValueError(f"{path}: NFE key {key!r} is not an integer") from None
        parsed[nfe] = value
    return _validate(parsed, str(path))


def _validate(result, where: str) -> dict[int, dict]:
    if not isinstance(result, dict) or not result:
        raise ValueError(f"{where}: tuned settings must be a non-empty dict NFE -> setting")
    out = {}
    for nfe, entry in result.items():
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"{where}: NFE must be an int >= 1, got {nfe!r}")
        if not isinstance(entry, dict) or not {"T", "q", "order"} <= set(entry):
            raise ValueError(f"{where}: NFE {nfe}: each setting needs keys 'T', 'q', 'order', got {entry!r}")
        try:
            setting = Setting.from_json(entry)
            setting.check(nfe, 0.0)
        except ValueError as err:
            raise ValueError(f"{where}: NFE {nfe}: {err}") from None
        clean = {k: v for k, v in entry.items() if k not in ("T", "q", "order", "fractions")}
        if setting.fractions is not None:
            clean["fractions"] = list(setting.fractions)
        out[nfe] = {"T": setting.T, "q": setting.q, "order": setting.order, **clean}
    return out
