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

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields

import torch

from . import checks
from .backends import warn_once
from .bridge import PhaseBridge, probode_hop_weights, split_phase
from .defaults import default_setting
from .learn import Learn, learn_setting, paired_z, split_rows
from .loop import Hooks, ModelCall, affine_rows, hop_rows, integrate
from .multistep import MAX_ORDER
from .settings import T_END, Setting, load_tuned, published_setting, save_tuned
from .threads import api_threads
from .variants import VARIANTS, Steps, step_rows, step_tables_many

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
#: The tuned-settings files are read and written by psb_fast.settings (names kept here).
__all__ = [
    "Search", "compared_settings", "load_tuned", "reference_solution", "run_settings", "save_tuned", "tune",
]


# ----------------------------------------------------------------------------- the batched sampler


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

    Equal (to rounding) to `reference.sampler.sample_variant(model, m0, bridge, setting.grid(nfe,
    t0), setting.order, setting.variant, hop=True)` per setting (a Setting or (T, q, order[,
    fractions]); all are checked before the first model call).
    max_rows: rows per model call (settings are batched whole; None -> len(m0), i.e. one
    setting per call). Raising it batches settings (the model must accept a per-row t).
    on_done: called with the number of settings just finished after each model-call batch
    (progress reporting). The model runs without autograd (torch.no_grad), so a model whose
    parameters require grad is fine.
    """
    if bridge.mode != "probODE":
        raise ValueError(f"tuning needs a probODE bridge, got mode={bridge.mode!r}")
    nfe = checks.count("nfe", nfe, 1)
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
        with torch.no_grad():
            out = _run_chunk(model, bridge, m0, nfe, chunk, t0)
        for c, x1 in zip(order_of[start:stop], out, strict=True):
            outs[c] = x1
        if on_done is not None:
            on_done(len(chunk))
        start = stop
    return torch.stack(outs, dim=0)


def _run_chunk(model, bridge: PhaseBridge, m0: torch.Tensor, nfe: int, settings: list[Setting], t0: float):
    """The hop outputs of `settings` (one variant) from the prior batch m0, [C, B, C_x, ...] float64.

    The sampler's loop (`psb_fast.loop.integrate`) and step path (`psb_fast.variants.Steps`, as in
    PhaseSampler) on one float64 state that stacks the settings (row c B + b: setting c, prior
    draw b): each row has its own evaluation times, step tables (`step_rows` with per-row values,
    orders zero-padded to the largest) and hop weights (`loop.affine_rows`, `loop.hop_rows`), and
    the model is called once per evaluation on all rows (in m0's dtype, with a per-row t).
    """
    C, B = len(settings), m0.shape[0]
    unit = (1,) * (m0.dim() - 1)
    order = max(setting.order for setting in settings)
    grids = [setting.grid(nfe, t0) for setting in settings]
    tables = step_tables_many(bridge, grids, [s.order for s in settings], settings[0].variant)

    def per_row(a: torch.Tensor) -> torch.Tensor:  # [C] float64 -> [C B, 1, ...] on m0's device
        return a.to(m0.device).repeat_interleave(B).reshape(C * B, *unit)

    rows, estimates = step_rows(tables, order, per_row)
    times = torch.stack(grids)  # [C, nfe]
    steps = Steps(rows, order, affine_rows, estimates, _scaled_estimate_rows)
    m = m0.detach().to(torch.float64).repeat((C,) + unit)  # m_0 of every row
    t_rows = times.to(m0.device).repeat_interleave(B, dim=0).T.to(m0.dtype).contiguous()  # [nfe, C B]
    F = integrate(m, evaluate=ModelCall(model, None, t_rows.unbind(0), m0.dtype, m), step=steps.step,
                  nfe=nfe, n_steps=nfe - 1, hooks=Hooks(), correct=steps.correct)
    co = bridge.coefficients(times[:, -1])  # the hop at each setting's T, from the (corrected) state
    weights = [per_row(w) for w in probode_hop_weights(co.normalizer, co.P, co.hop_aa, co.hop_bb, co.hop_den)]
    x1 = hop_rows(m, F, tuple(weights))
    return x1.reshape(C, B, *x1.shape[1:])


def _scaled_estimate_rows(m: torch.Tensor, F: torch.Tensor, weights: tuple) -> torch.Tensor:
    """The data form's per-row source Y~ = F + r_x x + r_v v, weights (1, r_x, r_v) (psb_fast.variants)."""
    _, r_x, r_v = weights
    x, v = split_phase(m)
    return torch.addcmul(F, r_x, x).addcmul_(r_v, v)


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


@dataclass(frozen=True)
class Search:
    """What `tune` searches, per NFE.

    Ts: hop-time candidates (None: `hop_times(nfe)` around the package default's T); qs, orders,
    variants: grid powers, orders and variants (the coarse stage is their product with Ts);
    coarse_rows: rows of m0 of the coarse stage (None: all); refine: then the `top_k` best and a
    finer T/q neighbourhood of each (`refine_candidates`) on all of m0; free_grid: then, for
    NFE >= 3, move T and every grid node (`optimize_grid` on the log-RMSE over all of m0) and add
    the "fractions" of the grid (this fits nfe parameters to m0: check the result on fresh draws).
    """

    Ts: Sequence[float] | None = None
    qs: Sequence[float] = DEFAULT_QS
    orders: Sequence[int] = DEFAULT_ORDERS
    variants: Sequence[str] = DEFAULT_VARIANTS
    coarse_rows: int | None = 256
    refine: bool = True
    top_k: int = 3
    free_grid: bool = False

    def __post_init__(self) -> None:
        for name in ("qs", "orders", "variants"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.Ts is not None:
            object.__setattr__(self, "Ts", tuple(float(T) for T in self.Ts))
        for v in self.variants:
            checks.choice("variants[]", v, VARIANTS)
        for o in self.orders:
            checks.count("orders[]", o, 0, MAX_ORDER)
        checks.flag("refine", self.refine)
        checks.flag("free_grid", self.free_grid)
        checks.count("top_k", self.top_k, 1)
        if self.coarse_rows is not None:
            checks.count("coarse_rows", self.coarse_rows, 1)


#: `tune`'s old keywords, now the fields of its `Search` (still accepted, with a warning).
_SEARCH_KEYWORDS = tuple(f.name for f in fields(Search))


def tune(
    model: Model,
    bridge: PhaseBridge,
    nfes: Iterable[int],
    m0: torch.Tensor,
    search: Search | None = None,
    *,
    reference_nfe: int = 400,
    target: torch.Tensor | None = None,
    t0: float = 1e-5,
    max_rows: int | None = None,
    progress: bool = True,
    learn: bool | object = False,
    **old: object,
) -> dict[int, dict]:
    """Choose (T, q, order, variant[, fractions]) per NFE for `model` by the RMSE against its own
    high-NFE solution. learn: True or a `psb_fast.learn.Learn`: then learn the step times and T
    from the search's pick on part of m0 and keep them where they win on held-out rows of m0
    (`tune_learned`, its entries' "learn" records which was kept).

    model(m, t) -> F as for `PhaseSampler.sample` (run without autograd: a model whose parameters
    require grad is fine); m0: a prior batch ([B, 2C, ...], e.g. bridge.sample_prior with a fixed
    generator). Use B >= 1000 where you can: at low NFE the error is dominated by the few samples
    that the sampler sends to another mode than the exact flow, and with a few hundred rows the
    search picks settings that happen to spare those particular samples (a winner's curse; the
    tuned gain then fails to reproduce).

    search: what is searched (`Search`; None: its defaults). The published setting and the package
    default are candidates in every stage, so the chosen RMSE is at most theirs on m0.
    reference_nfe: NFE of the target solution (REFERENCE_SETTING); or pass the target itself
    ([B, C, ...], x1 from the same m0). max_rows: see `run_settings` (None: ROW_ELEMENTS / the
    number of elements of one data point, at least len(m0)). The old keywords Ts, qs, orders,
    variants, coarse_rows, refine, top_k, free_grid still work, with a FutureWarning: they are
    the fields of `Search`.

    Returns {nfe: {"T", "q", "order", ["variant",] ["fractions",] "rmse", "published": [T, q,
    order], "published_rmse", "ratio", "default": <the package default's setting JSON>,
    "default_rmse"}} (errors on all of m0; ratio = rmse / published_rmse).
    """
    unknown = sorted(set(old) - set(_SEARCH_KEYWORDS))
    if unknown:
        raise TypeError(f"tune() got unexpected keyword argument(s) {unknown}")
    if old:
        if search is not None:
            raise ValueError(f"pass either search or the old keywords {sorted(old)}, not both")
        warn_once(f"tune({', '.join(f'{k}=' for k in sorted(old))}...) is deprecated: pass "
                  "search=psb_fast.tuning.Search(...) with those fields")
        search = Search(**{k: v for k, v in old.items() if v is not None})
    search = Search() if search is None else search
    if learn is not False:  # psb_fast.learn splits m0, runs this search on its tuning rows, learns
        return tune_learned(model, bridge, nfes, m0, search, Learn() if learn is True else learn,
                            reference_nfe=reference_nfe, target=target, t0=t0, max_rows=max_rows,
                            progress=progress)
    with torch.no_grad(), api_threads(m0):  # one thread for small calls unless the caller set the count
        return _tune(model, bridge, nfes, m0, search, reference_nfe, target, t0, max_rows, progress)


def _tune(model, bridge, nfes, m0, search: Search, reference_nfe, target, t0, max_rows, progress) -> dict:
    nfes = sorted({int(n) for n in nfes})
    if not nfes or nfes[0] < 1:
        raise ValueError(f"nfes must be a non-empty set of ints >= 1, got {nfes}")
    Ts, qs, orders, variants = search.Ts, search.qs, search.orders, search.variants
    refine, top_k, coarse_rows, free_grid = search.refine, search.top_k, search.coarse_rows, search.free_grid

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

    from .progress import progress_bar

    second = refine or n_coarse < len(m0)  # a second stage on all rows

    def bound(nfe: int) -> int:  # its candidates, at most (refinement: <= 6 hop times per best setting)
        coarse = len(set(grid_of(nfe)[0]) | set(fixed(nfe)))
        return 0 if not second else len(fixed(nfe)) + top_k * 6 if refine else coarse

    # one bar over every candidate run, its total fixed from the start (a stage that runs fewer
    # candidates than its bound moves the bar on by the rest)
    bar = progress_bar(total=sum(len(set(grid_of(n)[0]) | set(fixed(n))) + bound(n) for n in nfes),
                       unit="candidate", disable=not progress, desc="tune")
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
        if second:
            errs = settings_rmse(model, bridge, m0, target, nfe, final, t0, max_rows, bar.update)
            bar.update(max(0, bound(nfe) - len(final)))
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


def compared_settings(entry: dict, nfe: int) -> dict[str, Setting]:
    """The settings one NFE's entry of `tune` compares, by name: "defaults" (the package's),
    "tuned" (the grid search's pick), "learned" (with learn=..., where a setting was learned) and
    "published". Which of tuned / learned the entry keeps: `entry["learn"]["kept"]` ("grid" or
    "learned"; without learning, the entry is the grid search's pick)."""
    learn = entry.get("learn")
    named = {"defaults": default_setting(nfe),
             "tuned": Setting.from_json(entry if learn is None else learn["grid"])}
    if learn is not None and learn.get("learned") is not None:
        named["learned"] = Setting.from_json(learn["learned"])
    named["published"] = published_setting(nfe)
    return named


# ----------------------------------------------------------------- learned step times (psb_fast.learn)


def tune_learned(
    model: Model, bridge: PhaseBridge, nfes: Sequence[int], m0: torch.Tensor, search, options: Learn, *,
    reference_nfe: int = 400, target: torch.Tensor | None = None, t0: float = 1e-5,
    max_rows: int | None = None, progress: bool = True,
) -> dict[int, dict]:
    """`psb_fast.tune(..., learn=options)` (module docstring). Returns {nfe: the kept setting's
    entry "T", "q", "order", ["variant",] ["fractions",] with "rmse", "published_rmse",
    "default_rmse" and "ratio" (rmse / published_rmse) all on the evaluation draws, "published",
    "default" as `tune` gives them, and "learn": {"kept": "learned" or "grid", "grid": the grid
    search's pick (setting JSON), "grid_rmse", "learned": the learned setting JSON or None,
    "learned_rmse" (evaluation draws; None when nothing was learned), "ratio_to_grid", "z" (the
    paired z of learned minus grid per-draw squared errors; None when nothing was learned), "draws":
    {"tune", "validation", "evaluation"}, "validation_rmse": [start, best], "tuning_rmse": [start,
    at best], "iterations", "seconds", "curve", "jacobian", "teacher_ball", "note"}}."""
    if not isinstance(options, Learn):
        raise TypeError(f"learn must be a bool or a psb_fast.learn.Learn, got {options!r}")
    if bridge.mode != "probODE":
        raise ValueError(f"learning needs a probODE bridge, got mode={bridge.mode!r}")
    nfes = sorted({checks.count("nfes[]", n, 1) for n in nfes})
    if not nfes:
        raise ValueError("nfes must be a non-empty set of ints >= 1")
    tune_rows, val_rows, eval_rows = split_rows(len(m0), options)
    with api_threads(m0):  # one thread for small calls unless the caller set the count
        return _tune_learned(model, bridge, nfes, m0, search, options, tune_rows, val_rows, eval_rows,
                             reference_nfe, target, t0, max_rows, progress)


def _tune_learned(model, bridge, nfes, m0, search, options, tune_rows, val_rows, eval_rows, reference_nfe,
                  target, t0, max_rows, progress) -> dict[int, dict]:
    if target is None:
        with torch.no_grad():
            target = reference_solution(model, bridge, m0, reference_nfe, t0, max_rows)
    elif target.shape[0] != m0.shape[0]:
        raise ValueError(f"target must hold one row per row of m0 ({m0.shape[0]}), got {target.shape[0]}")
    grid = tune(model, bridge, nfes, m0[tune_rows], search, target=target[tune_rows], t0=t0,
                max_rows=max_rows, progress=progress)
    m_eval, target_eval = m0[eval_rows], target[eval_rows]
    draws = {"tune": tune_rows.stop, "validation": val_rows.stop - val_rows.start,
             "evaluation": eval_rows.stop - eval_rows.start}
    result: dict[int, dict] = {}
    for nfe in nfes:
        picked = Setting.from_json(grid[nfe])
        learned = None
        if nfe >= 2:
            learned = learn_setting(model, bridge, nfe, picked, m0[tune_rows], target[tune_rows],
                                    m0[val_rows], target[val_rows], options, t0, progress)
        pub, default = published_setting(nfe), default_setting(nfe)
        candidates = [picked, pub, default] + ([learned.setting] if learned and learned.setting else [])
        with torch.no_grad():
            outs = run_settings(model, bridge, m_eval, nfe, candidates, t0, max_rows)
        # per-draw mean squared errors [C, B]: learned vs grid are compared on the same draws
        per_draw = (outs - target_eval.to(outs.device, torch.float64)).pow(2).flatten(2).mean(2).cpu()
        errs = per_draw.mean(1).sqrt().tolist()
        learned_rmse, z = (errs[3], paired_z(per_draw[3], per_draw[0])) if len(errs) > 3 else (None, None)
        keep_learned = learned_rmse is not None and learned_rmse < errs[0] and z < -options.keep_z
        kept, err = (learned.setting, learned_rmse) if keep_learned else (picked, errs[0])
        result[nfe] = {
            **_entry(kept), "rmse": err, "published": list(pub.as_tuple()), "published_rmse": errs[1],
            "ratio": err / errs[1] if errs[1] > 0 else 1.0, "default": default.to_json(),
            "default_rmse": errs[2],
            "learn": {
                "kept": "learned" if keep_learned else "grid", "grid": picked.to_json(), "grid_rmse": errs[0],
                "learned": None if learned is None or learned.setting is None else learned.setting.to_json(),
                "learned_rmse": learned_rmse,
                "ratio_to_grid": None if learned_rmse is None else learned_rmse / errs[0], "z": z,
                "draws": draws,
                "validation_rmse": None if learned is None else [learned.start_val, learned.best_val],
                "tuning_rmse": None if learned is None else [learned.start_train, learned.best_train],
                "iterations": 0 if learned is None else learned.iterations,
                "seconds": 0.0 if learned is None else learned.seconds,
                "curve": [] if learned is None else [list(c) for c in learned.curve],
                "jacobian": options.jacobian, "teacher_ball": options.teacher_ball,
                "note": "nfe < 2: nothing to learn" if learned is None else learned.note,
            },
        }
    return result
