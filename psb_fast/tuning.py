"""Per-NFE tuning of the probability-flow sampler: hop time T, grid order q, solver order.

A setting (`psb_fast.settings.Setting(T, q, order)`) means: the power grid
t_i = (t0^(1/q) + i/(n-1) (T^(1/q) - t0^(1/q)))^q with n = NFE points (q = 2 is the published
"rev-quad", q = 1 uniform), the exponential multistep update of `order` (0..3) between them, and
the hop (docs/math.md §8.1) at T. A setting with `fractions` replaces the uniform i/(n-1) by free
fractions 0 = r_0 < ... < r_{n-1} = 1 (`psb_fast.grids.power_grid`); `optimize_grid` searches them.
The functions here take Settings, or tuples (T, q, order[, fractions]) (`Setting.coerce`).

`tune` picks, per NFE, the setting with the smallest pathwise RMSE of the sampler's output
against a high-accuracy solution from the same prior draws (for a user's own model: the
order-3 sampler at `reference_nfe` on the q = 2 grid to T = 0.999, with the hop). The search
is coarse-to-fine: the full product Ts x qs x orders on a sub-batch, then the best few and a
finer T/q neighbourhood of each on the whole batch. The studies (studies/tuning_study.py, ...)
run the same machinery on exact-drift Gaussian mixtures and trained models to produce the package
defaults (psb_fast/defaults.json).

Every setting of one NFE runs in PhaseSampler's loop (`psb_fast.loop.integrate`), batched: the
prior batch is repeated once per setting and each row gets its own time (`model(m, t)` with a
per-row t, as in training) and its own multistep coefficients and hop weights, so a sweep costs
NFE model calls per chunk of `max_rows` rows. The state is kept in float64 (the model is called
in m0's dtype); the outputs equal the reference `sample_ode`'s to float64 rounding.
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
from .loop import Hooks, ModelCall, Multistep, hop_rows, integrate, multistep_rows
from .multistep import multistep_coefficients
from .settings import T_END, VARIANTS, Setting, published_setting

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

T_MIN, T_MAX = 0.3, 0.995
#: Coarse hop times: tau = 1 - T log-spaced from 0.7 to 0.005 (ratio ~0.77 per step).
DEFAULT_TS: tuple[float, ...] = tuple(
    round(1.0 - (1.0 - T_MIN) * ((1.0 - T_MAX) / (1.0 - T_MIN)) ** (k / 19), 6) for k in range(20)
)
DEFAULT_QS: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5, 3.0)
DEFAULT_ORDERS: tuple[int, ...] = (1, 2, 3)
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
    outs = []
    for start in range(0, len(settings), per_chunk):
        chunk = settings[start : start + per_chunk]
        outs.append(_run_chunk(model, bridge, m0, nfe, chunk, t0))
        if on_done is not None:
            on_done(len(chunk))
    return torch.cat(outs, dim=0)


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
    m = m0.detach().to(torch.float64).repeat((C,) + unit)  # m_0 of every row
    t_rows = per_row(times).reshape(nfe, rows).to(m0.dtype)  # t_i of every row
    co = bridge.coefficients(T)  # the hop's weights at each setting's T, folded in float64
    weights = [per_row(w) for w in probode_hop_weights(co.normalizer, co.P, co.hop_aa, co.hop_bb, co.hop_den)]
    F = integrate(m, evaluate=ModelCall(model, None, t_rows.unbind(0), m0.dtype, m),
                  step=Multistep(steps, order, multistep_rows), nfe=nfe, n_steps=nfe - 1, hooks=Hooks())
    x1 = hop_rows(m, F, weights)  # x1 = a_F F + a_x x + a_v v at each row's T
    return x1.reshape(C, B, *x1.shape[1:])


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
    model: Model, bridge: PhaseBridge, m0: torch.Tensor, nfe: int = 200, t0: float = 1e-5,
    max_rows: int | None = None,
) -> torch.Tensor:
    """The high-NFE target: order 3, q = 2 grid to T = 0.999, with the hop. float64 [B, ...]."""
    return run_settings(model, bridge, m0, nfe, [Setting(T_END, 2.0, 3)], t0, max_rows)[0]


# ----------------------------------------------------------------------------- the search


def refine_candidates(
    best: Iterable[Setting], Ts: Sequence[float], t0: float = 1e-5,
    t_steps: int = 4, q_step: float = 0.125, q_points: int = 5,
) -> list[Setting]:
    """Finer settings around each of `best`, same order: T between its neighbours in Ts
    (uniform in log(1 - T), t_steps per coarse interval); q + j q_step for the q_points
    values of j centred on 0 (default q, q +- 0.125, q +- 0.25). Power-q grids only (fractions of
    `best` are not carried over)."""
    Ts = sorted({float(T) for T in Ts})
    out: set[Setting] = set()
    for setting in map(Setting.coerce, best):
        T, q, order = setting.T, setting.q, setting.order
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
                    out.add(Setting(T_c, q_c, order))
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
    reference_nfe: int = 200,
    progress: bool = True,
    t0: float = 1e-5,
    refine: bool = True,
    top_k: int = 4,
    coarse_rows: int | None = 256,
    max_rows: int | None = None,
    target: torch.Tensor | None = None,
    free_grid: bool = False,
) -> dict[int, dict]:
    """Choose (T, q, order[, fractions]) per NFE for `model` by the RMSE against its own high-NFE
    solution.

    model(m, t) -> F as for `PhaseSampler.sample`; m0: a prior batch ([B, 2C, ...], e.g.
    bridge.sample_prior with a fixed generator). Use B >= 1000 where you can: at low NFE the
    error is dominated by the few samples that the sampler sends to another mode than the
    exact flow, and with a few hundred rows the search picks settings that happen to spare
    those particular samples (a winner's curse; the tuned gain then fails to reproduce).

    Search: the product Ts x qs x orders (defaults DEFAULT_TS, DEFAULT_QS, DEFAULT_ORDERS) on
    the first `coarse_rows` rows of m0 (None: all), then, with refine, the `top_k` best and a
    finer T/q neighbourhood of each (`refine_candidates`) on all of m0; the published setting
    is a candidate in both stages, so the chosen ratio is <= 1.
    reference_nfe: NFE of the target solution (order 3, q = 2, T = 0.999, hop); or pass the
    target itself ([B, C, ...], x1 from the same m0). max_rows: see `run_settings`.
    free_grid: then, for NFE >= 3, move T and every grid node (`optimize_grid` on the log-RMSE
    over all of m0) and add the "fractions" of the grid; this fits nfe parameters to m0, so
    check the result on fresh prior draws.

    Returns {nfe: {"T", "q", "order", ["fractions",] "rmse", "published": [T, q, order],
    "published_rmse", "ratio"}} (errors on all of m0; ratio = rmse / published_rmse).
    """
    nfes = sorted({int(n) for n in nfes})
    if not nfes or nfes[0] < 1:
        raise ValueError(f"nfes must be a non-empty set of ints >= 1, got {nfes}")
    Ts = tuple(DEFAULT_TS if Ts is None else Ts)
    qs = tuple(DEFAULT_QS if qs is None else qs)
    orders = tuple(DEFAULT_ORDERS if orders is None else orders)
    coarse = sorted({Setting(T, q, o) for T in Ts for q in qs for o in orders})
    if not coarse:
        raise ValueError("the search space (Ts x qs x orders) is empty")
    if target is None:
        target = reference_solution(model, bridge, m0, reference_nfe, t0, max_rows)
    n_coarse = len(m0) if coarse_rows is None else max(1, min(int(coarse_rows), len(m0)))
    result: dict[int, dict] = {}
    # one bar over every candidate run (coarse stages counted up front, refinements when known)
    bar = tqdm(total=sum(len(coarse) + (published_setting(n) not in coarse) for n in nfes), unit="candidate",
               disable=not progress, desc="tune")
    for nfe in nfes:
        bar.set_postfix_str(f"NFE {nfe}")
        pub = published_setting(nfe)
        cands = [pub] + [s for s in coarse if s != pub]
        errs = settings_rmse(model, bridge, m0[:n_coarse], target[:n_coarse], nfe, cands, t0, max_rows,
                             bar.update)
        if refine:
            best = [cands[i] for i in errs.argsort()[:top_k].tolist()]
            final = [pub] + [s for s in sorted(set(best) | set(refine_candidates(best, Ts, t0))) if s != pub]
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
