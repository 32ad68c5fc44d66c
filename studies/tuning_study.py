"""NFE-vs-quality tuning study: per-NFE defaults (hop time T, grid order q, solver order).

    python -m studies.tuning_study [--quick] [--out benchmarks/results] [--oracle]
    python -m studies.tuning_study --evaluate-only   # after make_defaults (see below)

Run from the repository root (studies/ is a plain folder, not installed; `-m` puts the root on
sys.path). The package defaults come from these steps, in order (psb_fast/defaults.py):

    python -m studies.tuning_study                            # 1. this search -> tuning.json
    python -m studies.tuning_trained                          # 2. check on trained models
    python -m studies.tuning_joint --nfes 5 10 12 15 20       # 3. joint search
    python -m studies.make_defaults                           # 4. -> psb_fast/defaults.json
    python -m studies.tuning_study --evaluate-only            # 5. held-out check of the defaults

--evaluate-only skips the search: it reads the package defaults (psb_fast/defaults.json) and runs
only the held-out check below, reusing <out>/tuning.json's held-out records for NFEs whose setting
is the one that file records; NFEs changed since are re-scored (src `trained`: by the trained-model
stage; src `joint`: by the joint search, studies/tuning_joint.py, whose <out>/tuning_joint.json lists
them). The mixture search's own pick of such an NFE stays in tuning.json as "study_setting"
(studies/make_defaults.py reads it from there).

Error metric: pathwise RMSE of the sampler output (hop=True: the hop's x1 estimate at T)
against the EXACT probability flow's final output from the same prior draws m0:
x1_exact = hop at T_ref = 0.999 of m_end = ode_solution(mix, bridge, m0, 1e-5, 0.999) (scipy
DOP853 at 1e-11; cached under <out>/cache). The model is the exact drift of a Gaussian
mixture (`GaussianMixture.as_model`: a perfectly trained network), so the error is the
sampler's alone.

At low NFE this error is dominated by "mode flips": the few prior draws near a separatrix
that the sampler sends to another mode than the exact flow. Their number fluctuates from
batch to batch, so a search that picks the best of hundreds of settings on one small batch
mostly picks the setting that happens to spare that batch's borderline draws (a winner's
curse: with B = 256 the "tuned" ratios did not reproduce on a fresh batch). Hence three
independent prior batches per tuning mixture, one per stage:

1. coarse (B_c, seed 0): the product of 14 hop times (1 - T log-spaced, 0.3..0.995) x
   q in QS x solver orders 1..3; keep the TOP_K best;
2. fine (B_f, seed 1): those and their T/q neighbourhood (half coarse T steps, q +- 0.125);
3. confirm (B_x, seed 3): the CONFIRM best of stage 2 with distinct (q, order), scored on the
   fine and confirm draws pooled (B_f + B_x per mixture); the pick is the best here.

Objective, minimized (E_m, P_m: RMSE of the candidate and of the published setting --
order 2, q = 2, T = published_T(nfe) -- on tuning mixture m, same batch):

    J = mean_m log r_m + max_m log r_m + 100 relu(max_m log r_m - log 0.9),   r_m = E_m / P_m

The mean rewards the typical gain and is scale-free (a 2-D toy and a 32-D mixture weigh the
same); the max term favours settings that gain on every mixture, and the guard makes any
setting that does not beat the published one by >= 10 % on EVERY tuning mixture rank below
all that do (10 %: a margin for the batch noise of the ratios), and any setting that loses
on some mixture rank below the published setting itself, which is a candidate in every
stage (J = 100 log(1/0.9) = 10.5). So the acceptance's "no worse on any mixture" is built
into the choice, not left to the average.

NFEs between the tuned ones: the best (same objective, pooled fine + confirm draws) of four settings
derived from the neighbouring tuned NFEs (each neighbour's setting, and T interpolated
linearly in log(1 - T) with either neighbour's q and order). NFE 1 copies NFE 2.

Free grid (GRID_NFES): starting from the (T, q, order) chosen above, a compass search
(`psb_fast.tuning.optimize_grid`) moves T and every node of the grid, as fractions
0 = r_0 < ... < r_{n-1} = 1 of the power-q coordinate (psb_fast.grids), minimizing J on the
first GRID_ROWS confirm draws per tuning mixture. GRID_ROWS = 4096, the whole confirm batch:
a search over ~10 free coordinates is itself a best-of-many pick that fits the mode flips of
the draws it sees (the winner's curse above), so it gets all the draws that batch has. The
free grid is kept only if it also lowers J on draws the search never saw (the fine batch,
pooled with any confirm draws after GRID_ROWS); otherwise the power grid stays.

Acceptance, on HELD-OUT mixtures never used above (own batch, B_h, seed 2; per mixture,
every NFE 3..50): tuned RMSE <= published RMSE, and at NFE 5, 10, 20 tuned <= 0.5 x published.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from psb_fast.bridge import Coefficients, PhaseBridge
from psb_fast.defaults import default_setting
from psb_fast.oracles import (
    GaussianMixture,
    mixture_2d_grid,
    mixture_2d_ring,
    mixture_random,
    ode_solution,
)
from psb_fast.settings import T_END, Setting, published_setting
from psb_fast.tuning import optimize_grid, refine_candidates, run_settings, settings_rmse

ROOT = Path(__file__).resolve().parents[1]

T0 = 1e-5
TUNED_NFES = (2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40, 50)
ACCEPT_NFES = tuple(range(3, 51))
HALF_NFES = (5, 10, 20)
GRID_NFES = (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 20)
GRID_ROWS = 4096
GRID_ITERS = 12
T_MIN, T_MAX, N_T = 0.3, 0.995, 14
TS = tuple(  # 1 - T log-spaced
    round(1.0 - (1.0 - T_MIN) * ((1.0 - T_MAX) / (1.0 - T_MIN)) ** (k / (N_T - 1)), 5) for k in range(N_T)
)
QS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
ORDERS = (1, 2, 3)
TOP_K, CONFIRM = 5, 8
GUARD_WEIGHT, GUARD_MARGIN = 100.0, 0.9
ODE_RTOL = 1e-11  # exact targets: scipy DOP853 rtol = atol (--quick: 1e-9, still ~1e-7 accurate)
SEEDS = {"coarse": 0, "fine": 1, "heldout": 2, "confirm": 3}

TUNING = {
    "grid3x3": lambda: mixture_2d_grid(),
    "ring8": lambda: mixture_2d_ring(),
    "rand8d": lambda: mixture_random(dim=8, k=5, seed=1),
    "rand32d": lambda: mixture_random(dim=32, k=10, seed=2),
}
HELDOUT = {
    "rand2d_s11": lambda: mixture_random(dim=2, k=7, seed=11),
    "rand16d_s12": lambda: mixture_random(dim=16, k=6, seed=12),
    "grid4x4": lambda: mixture_2d_grid(n=4, spacing=0.9, std=0.1),
    "ring6": lambda: mixture_2d_ring(n=6, radius=1.0, std=0.15),
}


# ----------------------------------------------------------------------------- problems


class UniqueTimeBridge(PhaseBridge):
    """PhaseBridge whose coefficients() evaluates each distinct t once (a sweep has a few
    hundred distinct times over ~10^5 rows); results are identical, ~2.5x faster drifts."""

    def coefficients(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.numel() <= 64:
            return super().coefficients(t)
        uniq, inverse = torch.unique(t, return_inverse=True)
        co = super().coefficients(uniq)
        return Coefficients(**{f.name: getattr(co, f.name)[inverse] for f in fields(co)})


class Problem:
    """One mixture: its exact-drift model and fixed prior batches with their exact targets."""

    def __init__(self, name: str, mix: GaussianMixture, bridge: PhaseBridge, cache: Path,
                 rtol: float = ODE_RTOL):
        self.name, self.mix, self.bridge, self.cache, self.rtol = name, mix, bridge, cache, rtol
        self.model = mix.as_model(UniqueTimeBridge(*bridge.key()))
        self._batches: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def batch(self, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(m0, x1_exact) for `size` float64 prior draws from a generator seeded `seed`."""
        if (size, seed) in self._batches:
            return self._batches[size, seed]
        mix, bridge = self.mix, self.bridge
        gen = torch.Generator().manual_seed(seed)
        m0 = bridge.sample_prior((size, mix.dim), generator=gen, dtype=torch.float64)
        key = hashlib.sha1(
            repr((bridge.key(), mix.means.tolist(), mix.stds.tolist(), mix.weights.tolist(), size, seed,
                  T0, T_END) + (() if self.rtol == ODE_RTOL else (self.rtol,))).encode()
        ).hexdigest()[:16]
        path = self.cache / f"target_{self.name}_B{size}_s{seed}_{key}.pt"
        if path.exists():
            target = torch.load(path)
        else:
            m_end = ode_solution(mix, bridge, m0, T0, T_END, rtol=self.rtol, atol=self.rtol)
            target = bridge.estimate_x1(m_end, mix.drift(bridge, m_end, T_END), T_END)
            torch.save(target, path)
        self._batches[size, seed] = (m0, target)
        return m0, target

    def rmse(self, nfe: int, settings, size: int, seed: int, max_rows: int, rows: slice = slice(None)
             ) -> torch.Tensor:
        m0, target = self.batch(size, seed)
        return settings_rmse(self.model, self.bridge, m0[rows], target[rows], nfe, settings, T0, max_rows)


def effective(setting: Setting, nfe: int) -> Setting:
    """Canonical form: T to 5 decimals; an order above nfe - 2 never reaches history (step i
    uses min(i, order)), so it is lowered to that (`Setting.effective`)."""
    return setting.replace(T=round(setting.T, 5)).effective(nfe)


def diverse_top(settings, J, n: int):
    """The n best settings by J (published, index 0, excluded), at most one per (q, order):
    near-identical settings tend to share their mode flips, so the confirm stage compares
    distinct grid shapes / solver orders rather than T's of one."""
    picked, seen = [], set()
    for i in J.argsort().tolist():
        shape = (settings[i].q, settings[i].order, settings[i].fractions)
        if i == 0 or shape in seen:
            continue
        picked.append(settings[i])
        seen.add(shape)
        if len(picked) == n:
            break
    return picked


def objective(errs: torch.Tensor, pub: torch.Tensor) -> torch.Tensor:
    """J per setting from errs [M, C] and the published errors [M] (module docstring)."""
    lr = torch.log(errs / pub[:, None])
    worst = lr.max(0).values
    return lr.mean(0) + worst + GUARD_WEIGHT * torch.relu(worst - math.log(GUARD_MARGIN))


def evaluate(problems, nfe, settings, size, seed, max_rows, pbar=None, rows: slice = slice(None)
             ) -> torch.Tensor:
    """RMSE [M, C] of `settings` on every problem's (size, seed) batch (its `rows`)."""
    out = []
    for p in problems:
        out.append(p.rmse(nfe, settings, size, seed, max_rows, rows))
        if pbar is not None:
            pbar.update(1)
    return torch.stack(out)


def flip_diagnostics(problem: Problem, nfe: int, settings, size: int, seed: int, max_rows: int
                     ) -> tuple[list[dict], torch.Tensor]:
    """Per setting: how many draws end nearest to another mixture mean than the exact flow's
    output does ("mode flips"), the share of the squared error they carry, and the RMSE of
    the other draws; and the squared error of every draw, [C, size]."""
    m0, target = problem.batch(size, seed)
    out = run_settings(problem.model, problem.bridge, m0, nfe, settings, T0, max_rows)
    means = problem.mix.means
    exact_mode = torch.cdist(target, means).argmin(1)
    sq = (out - target).pow(2).sum(-1)
    res = []
    for c in range(len(settings)):
        flip = torch.cdist(out[c], means).argmin(1) != exact_mode
        kept = sq[c, ~flip].sum() / (~flip).sum() / target.shape[1]
        res.append({"flips": int(flip.sum()), "flip_share": float(sq[c, flip].sum() / sq[c].sum()),
                    "rmse_without_flips": float(kept.sqrt())})
    return res, sq


def ratio_interval(sq_a: torch.Tensor, sq_b: torch.Tensor, level: float = 0.9, n_boot: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap interval of RMSE(a) / RMSE(b) from per-draw squared errors [B] of the same
    draws: how much the ratio moves with the batch (mode flips make it heavy-tailed)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, sq_a.numel(), (n_boot, sq_a.numel()), generator=gen)
    ratios = (sq_a[idx].sum(1) / sq_b[idx].sum(1)).sqrt()
    lo, hi = torch.quantile(ratios, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=ratios.dtype))
    return float(lo), float(hi)


def stage(problems, nfe, cands, size, seed, max_rows, pbar):
    """Evaluate [published] + cands; returns (settings, J, errs [M, C]) with the published first."""
    pub = published_setting(nfe)
    settings = [pub] + [s for s in dict.fromkeys(cands) if s != pub]
    errs = evaluate(problems, nfe, settings, size, seed, max_rows, pbar)
    return settings, objective(errs, errs[:, 0]), errs


# ----------------------------------------------------------------------------- search


def tune_nfe(problems, nfe, cfg, max_rows, pbar) -> dict:
    orders_here = (0,) if nfe <= 2 else cfg["orders"]
    coarse = sorted({effective(Setting(T, q, o), nfe) for T in cfg["Ts"] for q in cfg["qs"]
                     for o in orders_here})
    s1, J1, _ = stage(problems, nfe, coarse, cfg["B_coarse"], SEEDS["coarse"], max_rows, pbar)
    best = [s1[i] for i in J1.argsort().tolist() if i > 0][: cfg["top_k"]]
    fine = sorted({effective(s, nfe) for s in refine_candidates(best, cfg["Ts"], T0, t_steps=2, q_step=0.125,
                                                                q_points=3)} | set(best))
    s2, J2, E2 = stage(problems, nfe, fine, cfg["B_fine"], SEEDS["fine"], max_rows, pbar)
    top = diverse_top(s2, J2, cfg["confirm"])
    s3, J3, E3 = pooled_stage(problems, nfe, top, cfg, max_rows, pbar, fine=(s2, E2))
    i = int(J3.argmin())
    return {
        "setting": s3[i], "J": float(J3[i]), "n_candidates": {"coarse": len(s1), "fine": len(s2),
                                                              "confirm": len(s3)},
        "tuning_ratio": {p.name: float(E3[m, i] / E3[m, 0]) for m, p in enumerate(problems)},
    }


def pooled_stage(problems, nfe, cands, cfg, max_rows, pbar, fine=None):
    """Like `stage`, with each RMSE pooled over the fine and the confirm batch
    (sqrt of the size-weighted mean square): B_fine + B_confirm draws per mixture.
    fine: (settings, errs) already computed on the fine batches (reused where present)."""
    s3, _, E3 = stage(problems, nfe, cands, cfg["B_confirm"], SEEDS["confirm"], max_rows, pbar)
    known = {} if fine is None else {s: fine[1][:, i] for i, s in enumerate(fine[0])}
    missing = [s for s in s3 if s not in known]
    if missing:
        Em = evaluate(problems, nfe, missing, cfg["B_fine"], SEEDS["fine"], max_rows)
        known.update({s: Em[:, i] for i, s in enumerate(missing)})
    Ef = torch.stack([known[s] for s in s3], dim=1)
    bf, bx = cfg["B_fine"], cfg["B_confirm"]
    E = torch.sqrt((bf * Ef**2 + bx * E3**2) / (bf + bx))
    return s3, objective(E, E[:, 0]), E


def free_grid(problems, nfe, start, cfg, max_rows) -> dict:
    """Compass search of T and the grid fractions at start's (q, order) (module docstring)."""
    pub = published_setting(nfe)
    search_rows, check_rows = slice(0, cfg["grid_rows"]), slice(cfg["grid_rows"], None)
    bf, bc = cfg["B_fine"], cfg["B_confirm"] - cfg["grid_rows"]
    batch = (cfg["B_confirm"], SEEDS["confirm"], max_rows)
    pub_search = evaluate(problems, nfe, [pub], *batch, rows=search_rows)

    def search_objective(settings):
        return objective(evaluate(problems, nfe, settings, *batch, rows=search_rows), pub_search[:, 0])

    best, J_search, iters = optimize_grid(search_objective, nfe, start, max_iter=GRID_ITERS)
    best = effective(best, nfe)
    # check on unseen draws: the fine batch, pooled with the confirm draws after grid_rows (if any)
    cands = [pub, start, best]
    E = evaluate(problems, nfe, cands, cfg["B_fine"], SEEDS["fine"], max_rows)
    if bc > 0:
        Ec = evaluate(problems, nfe, cands, *batch, rows=check_rows)
        E = torch.sqrt((bf * E**2 + bc * Ec**2) / (bf + bc))
    J = objective(E, E[:, 0])
    keep = bool(J[2] < J[1])
    return {
        "setting": best if keep else start, "kept": keep, "iterations": iters, "J_search": J_search,
        "J_check": {"start": float(J[1]), "free": float(J[2])},
        "check_ratio": {p.name: float(E[m, 2] / E[m, 0]) for m, p in enumerate(problems)},
        "free": best.as_tuple(),
    }


def interpolate_candidates(nfe, lo, hi, s_lo, s_hi):
    w = (nfe - lo) / (hi - lo)
    u = (1 - w) * -math.log1p(-s_lo.T) + w * -math.log1p(-s_hi.T)
    T = round(-math.expm1(-u), 6)
    s_lo, s_hi = s_lo.replace(fractions=None), s_hi.replace(fractions=None)  # power grids
    cands = {effective(s_lo, nfe), effective(s_hi, nfe), effective(s_lo.replace(T=T), nfe),
             effective(s_hi.replace(T=T), nfe)}
    return sorted(cands)


def search(tuning, cfg, max_rows) -> tuple[dict[int, Setting], dict[int, dict]]:
    """Steps 1, 2 and 2b of the module docstring on the tuning mixtures: (chosen settings, details)
    per NFE 1..50."""
    # 1. search at the tuned NFEs (tuning mixtures only)
    chosen: dict[int, Setting] = {}
    details: dict[int, dict] = {}
    pbar = tqdm(total=3 * len(tuning) * len(TUNED_NFES), desc="search", unit="mix-stage")
    for nfe in TUNED_NFES:
        pbar.set_postfix(nfe=nfe)
        r = tune_nfe(tuning, nfe, cfg, max_rows, pbar)
        chosen[nfe] = r["setting"]
        details[nfe] = {"source": "tuned", **r}
    pbar.close()

    # 2. NFEs in between: best of the neighbour-derived candidates (tuning mixtures, fine batches)
    tuned = sorted(chosen)
    gaps = [n for n in range(min(tuned), max(tuned) + 1) if n not in chosen]
    for nfe in tqdm(gaps, desc="in-between NFEs"):
        lo = max(k for k in tuned if k < nfe)
        hi = min(k for k in tuned if k > nfe)
        cands = interpolate_candidates(nfe, lo, hi, chosen[lo], chosen[hi])
        settings, J, errs = pooled_stage(tuning, nfe, cands, cfg, max_rows, None)
        i = int(J.argmin())  # the published setting (index 0) is the fallback
        chosen[nfe] = settings[i]
        details[nfe] = {
            "source": "interp", "setting": settings[i], "J": float(J[i]), "n_candidates": len(settings) - 1,
            "tuning_ratio": {p.name: float(errs[m, i] / errs[m, 0]) for m, p in enumerate(tuning)},
        }
    chosen[1] = chosen[2].replace(order=0, fractions=None)
    details[1] = {"source": "copy of NFE 2", "setting": chosen[1]}

    # 2b. free grids (tuning mixtures: search on GRID_ROWS confirm draws, check on unseen draws)
    for nfe in tqdm(GRID_NFES, desc="free grids"):
        g = free_grid(tuning, nfe, chosen[nfe], cfg, max_rows)
        chosen[nfe] = g["setting"]
        details[nfe]["free_grid"] = {k: v for k, v in g.items() if k != "setting"}
    return chosen, details


def current_defaults(previous: dict, joint: dict | None = None) -> tuple[dict[int, Setting], dict[int, dict]]:
    """The package defaults (psb_fast.defaults) for NFE 1..50, and per NFE the search record of
    `previous` (a tuning.json). An NFE whose setting is the admissible result of the joint search
    (`joint`: tuning_joint.json's "table") has source "joint"; one that otherwise differs from the
    recorded setting was replaced by the trained-model stage (studies/tuning_trained.py): source
    "trained". Either way the study's pick is kept as "study_setting"."""
    joint_settings = {int(n): Setting.coerce(r["setting"]) for n, r in (joint or {}).items()
                      if r["admissible"]}
    chosen, details = {}, {}
    for nfe in range(1, 51):
        chosen[nfe] = default_setting(nfe)
        rec = previous["table"][str(nfe)]
        recorded = Setting(rec["T"], rec["q"], rec["order"], rec.get("fractions") or None)
        source = "joint" if joint_settings.get(nfe) == chosen[nfe] else None
        if recorded == chosen[nfe] and source is None:
            details[nfe] = {"source": rec["source"], "setting": chosen[nfe], **rec["search"]}
        else:
            record = {k: v for k, v in rec["search"].items() if k != "study_setting"}
            study = rec["search"].get("study_setting", list(recorded.as_tuple()))
            details[nfe] = {"source": source or "trained", "setting": chosen[nfe], **record,
                            "study_setting": study}
    return chosen, details


def heldout_check(heldout, chosen, details, cfg, max_rows, previous: dict | None = None) -> tuple[dict, list]:
    """Acceptance per NFE in ACCEPT_NFES: the chosen setting vs the published one on every held-out
    mixture's (B_heldout, SEEDS["heldout"]) batch. previous: a tuning.json whose held-out records
    are reused for the NFEs whose setting it already checked (same batches). Returns (table, failures).
    """
    table: dict[str, dict] = {}
    failures = []
    for nfe in tqdm(ACCEPT_NFES, desc="held-out check"):
        pub = published_setting(nfe)
        setting = chosen[nfe]
        rec = previous["table"][str(nfe)] if previous else None
        reuse = rec is not None and details[nfe]["source"] not in ("trained", "joint") and rec.get("heldout")
        if reuse:
            held = rec["heldout"]
        else:
            held = heldout_record(heldout, nfe, chosen[nfe], pub, cfg, max_rows)
            study_pick = details[nfe].get("study_setting")
            if nfe in HALF_NFES and study_pick is not None:
                held["study_pick"] = study_pick_record(heldout, nfe, study_pick, cfg, max_rows)
        for name, r in held["per_mixture"].items():
            if r["ratio"] > held["required"]:
                failures.append({"nfe": nfe, "mixture": name, "ratio": r["ratio"],
                                 "required": held["required"]})
        table[str(nfe)] = {
            **{k: v for k, v in setting.to_json().items() if k != "variant"},
            "published": list(pub.as_tuple()), "source": details[nfe]["source"],
            "search": {k: v for k, v in details[nfe].items() if k not in ("source", "setting")},
            "heldout": held,
        }
    return table, failures


def heldout_record(heldout, nfe, setting, pub, cfg, max_rows) -> dict:
    """RMSEs, ratios (and, at HALF_NFES, mode-flip diagnostics) of `setting` vs `pub` on the held-out
    mixtures."""
    errs = evaluate(heldout, nfe, [setting, pub], cfg["B_heldout"], SEEDS["heldout"], max_rows)
    ratio = errs[:, 0] / errs[:, 1]
    required = 0.5 if nfe in HALF_NFES else 1.0
    per = {p.name: {"tuned_rmse": float(errs[m, 0]), "published_rmse": float(errs[m, 1]),
                    "ratio": float(ratio[m])} for m, p in enumerate(heldout)}
    if nfe in HALF_NFES:
        batch = (cfg["B_heldout"], SEEDS["heldout"], max_rows)
        for p in heldout:
            (tuned_d, pub_d), sq = flip_diagnostics(p, nfe, [setting, pub], *batch)
            per[p.name]["diagnostics"] = {"tuned": tuned_d, "published": pub_d}
            per[p.name]["ratio_interval_90"] = list(ratio_interval(sq[0], sq[1]))
    gm = torch.exp(torch.log(errs).mean(0))  # geometric mean over mixtures, [2]
    return {"per_mixture": per, "tuned_gmean": float(gm[0]), "published_gmean": float(gm[1]),
            "ratio_gmean": float(gm[0] / gm[1]), "ratio_worst": float(ratio.max()),
            "required": required, "pass": bool((ratio <= required).all())}


def study_pick_record(heldout, nfe, study_pick: Sequence, cfg, max_rows) -> dict:
    """Held-out ratios to published of the mixture search's own pick at an NFE whose default a later
    stage replaced: what the exact-drift search alone reached there."""
    errs = evaluate(heldout, nfe, [Setting.coerce(study_pick), published_setting(nfe)], cfg["B_heldout"],
                    SEEDS["heldout"], max_rows)
    ratio = errs[:, 0] / errs[:, 1]
    return {"setting": list(study_pick), "ratios": {p.name: float(ratio[m]) for m, p in enumerate(heldout)},
            "ratio_gmean": float(torch.exp(torch.log(ratio).mean()))}


# ----------------------------------------------------------------------------- outputs


def cache_dir(out: Path) -> Path:
    """<out>/cache, created and git-ignored: the regenerable targets and scores of the studies."""
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / ".gitignore").write_text("*\n")
    return cache


def markdown(report: dict) -> str:
    cfg = report["config"]
    out = [
        "# NFE-vs-quality tuning: tuned defaults vs the published settings",
        "",
        f"Command: `{cfg['command']}` ({report['runtime_s']:.0f} s, {cfg['platform']}).",
        *([f"The search ran as `{cfg['search_command']}` ({cfg['search_runtime_s']:.0f} s); then the",
           "trained-model check (`python -m studies.tuning_trained`) replaced the entries that lose to the",
           "published setting on trained models (src `trained`), the joint search on mixtures and trained",
           "models (`python -m studies.tuning_joint`) set others (src `joint`), and `python -m",
           "studies.make_defaults` wrote psb_fast/defaults.json; this table checks those final defaults",
           "(held-out records of unchanged NFEs are the search run's, same batches)."]
          if "search_command" in cfg else []),
        "",
        "Exact-drift Gaussian mixtures; error = pathwise RMSE of the sampler's hop output against the",
        "exact probability flow's output at t = 0.999 from the same prior draws. Independent prior",
        "batches per stage and mixture: "
        + ", ".join(f"{k} B = {v}" for k, v in cfg["batches"].items()) + ".",
        f"Tuning mixtures: {', '.join(cfg['tuning'])}. Held-out (never used for tuning): "
        f"{', '.join(cfg['heldout'])}.",
        "Published = order 2, q = 2 (rev-quad), T = published_T(nfe). `tuned`/`published`: geometric",
        "mean of the held-out RMSEs; `ratio`: their ratio; `worst`: the largest per-mixture ratio.",
        "`src`: `tuned` (searched), `interp` (picked from the neighbouring tuned NFEs), `trained`",
        "(replaced by the trained-model stage, studies/tuning_trained.py) or `joint` (the joint",
        "search on mixtures and trained models, studies/tuning_joint.py); `grid`:",
        "`free` (fractions listed below) or `power` (the power-q grid).",
        "",
        "| NFE | src | grid | T | q | order | tuned RMSE | published RMSE | ratio | worst | target | pass |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for nfe in ACCEPT_NFES:
        r = report["table"][str(nfe)]
        h = r["heldout"]
        target = 0.5 if nfe in HALF_NFES else 1.0
        out.append(
            f"| {nfe} | {r['source']} | {'free' if r['fractions'] else 'power'} | {r['T']:.4f} | {r['q']:g} "
            "| "
            f"{r['order']} | {h['tuned_gmean']:.3e} | "
            f"{h['published_gmean']:.3e} | {h['ratio_gmean']:.3f} | {h['ratio_worst']:.3f} | "
            f"<= {target:g} | {'yes' if h['pass'] else '**NO**'} |"
        )
    held = {n: report["table"][str(n)]["heldout"] for n in ACCEPT_NFES}
    out += ["", "Pooled held-out ratio (geometric mean over the held-out mixtures) at NFE 5, 10, 20: "
            + ", ".join(f"{held[n]['ratio_gmean']:.3f}" for n in HALF_NFES)
            + f"; worst pooled ratio over NFE 3..50: {max(h['ratio_gmean'] for h in held.values()):.3f}"
            + "; worst per-mixture ratio over NFE 3..50: "
            + f"{max(h['ratio_worst'] for h in held.values()):.3f}."]
    out += ["", f"Free grids (compass search on {cfg['grid_rows']} confirm draws per tuning mixture; kept "
            "only if J also", "drops on draws the search never saw): J on those check draws, power grid ->",
            "free grid, and the fractions r_i:", ""]
    out.append("| NFE | kept | J power | J free | fractions |")
    out.append("|---:|:---:|---:|---:|---|")
    for n in GRID_NFES:
        g = report["table"][str(n)]["search"].get("free_grid")
        if g:
            out.append(f"| {n} | {'yes' if g['kept'] else 'no'} | {g['J_check']['start']:.3f} | "
                       f"{g['J_check']['free']:.3f} | {', '.join(f'{f:.4f}' for f in g['free'][3])} |")
    acc = report["acceptance"]
    out += ["", f"Acceptance (every held-out mixture, NFE 3..50): **{'PASS' if acc['pass'] else 'FAIL'}**."]
    if acc["failures"]:
        out.append("")
        out.append("Failures (NFE, mixture, ratio, required):")
        out.append("")
        for f in acc["failures"]:
            out.append(f"- NFE {f['nfe']}, {f['mixture']}: {f['ratio']:.3f} (<= {f['required']:g})")
    out += ["", "Per-mixture held-out ratios (tuned / published) at NFE 5, 10, 20, with the 90 % paired",
            "bootstrap interval over the held-out draws (`ratio_interval`):", ""]
    names = cfg["heldout"]
    out.append("| NFE | " + " | ".join(names) + " |")
    out.append("|---:|" + "---:|" * len(names))
    for nfe in HALF_NFES:
        per = report["table"][str(nfe)]["heldout"]["per_mixture"]
        out.append(f"| {nfe} | " + " | ".join(
            f"{per[n]['ratio']:.3f}" + (" [{:.2f}, {:.2f}]".format(*per[n]["ratio_interval_90"])
                                        if "ratio_interval_90" in per[n] else "") for n in names) + " |")
    picks = {nfe: report["table"][str(nfe)]["heldout"].get("study_pick") for nfe in HALF_NFES}
    if any(picks.values()):
        out += ["", "The mixture search's own pick at those NFEs (replaced by the trained-model stage or the",
                "joint search because it loses on trained models), held-out ratios to published:", "",
                "| NFE | T | q | order | pooled | " + " | ".join(names) + " |",
                "|---:|---:|---:|---:|---:|" + "---:|" * len(names)]
        for nfe, sp in picks.items():
            if sp:
                T, q, order = sp["setting"][:3]
                out.append(f"| {nfe} | {T:.4f} | {q:g} | {order} | {sp['ratio_gmean']:.3f} | "
                           + " | ".join(f"{sp['ratios'][n]:.3f}" for n in names) + " |")
    out += ["", "Mode flips on the held-out draws (a draw whose output is nearest to another mixture mean",
            "than the exact flow's): count, share of the squared error they carry, RMSE of the other",
            "draws; tuned / published:", ""]
    out.append("| NFE | mixture | flips | flip share of error | RMSE without flips |")
    out.append("|---:|---|---:|---:|---:|")
    for nfe in HALF_NFES:
        for n in names:
            d = report["table"][str(nfe)]["heldout"]["per_mixture"][n].get("diagnostics")
            if d:
                t, pb = d["tuned"], d["published"]
                out.append(f"| {nfe} | {n} | {t['flips']} / {pb['flips']} | {t['flip_share']:.2f} / "
                           f"{pb['flip_share']:.2f} | {t['rmse_without_flips']:.2e} / "
                           f"{pb['rmse_without_flips']:.2e} |")
    if report.get("oracle"):
        out += ["", "Per-mixture oracle (each held-out mixture tuned on itself, same search):", ""]
        out.append("| NFE | " + " | ".join(names) + " |")
        out.append("|---:|" + "---:|" * len(names))
        for nfe, per in report["oracle"].items():
            out.append(f"| {nfe} | " + " | ".join(
                f"{per[n]['ratio']:.3f} @ ({per[n]['T']:.3f}, {per[n]['q']:g}, {per[n]['order']})"
                for n in names) + " |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small batches and a coarse search (< 3 min)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output folder")
    ap.add_argument("--oracle", action="store_true",
                    help="also tune each held-out mixture on itself at NFE 5, 10, 20 (the attainable bound)")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="no search: re-check the package defaults (psb_fast/defaults.json) on the held-out "
                         "mixtures, reusing "
                         "<out>/tuning.json's records for the NFEs whose setting it already checked")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest here)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    out = Path(args.out)
    cache = cache_dir(out)
    if args.evaluate_only and (args.quick or args.oracle):
        ap.error("--evaluate-only re-checks the current defaults with the full study's held-out batches; "
                 "it takes neither --quick nor --oracle")
    flags = [name for name in ("quick", "evaluate_only", "oracle") if getattr(args, name)]
    command = "python -m studies.tuning_study" + "".join(f" --{f.replace('_', '-')}" for f in flags)

    if args.quick:
        cfg = {"B_coarse": 64, "B_fine": 128, "B_confirm": 256, "B_heldout": 512, "top_k": 3, "confirm": 3,
               "Ts": TS[::2] + (TS[-1],), "qs": (1.0, 1.5, 2.0, 3.0), "orders": (2, 3), "rtol": 1e-9,
               "grid_rows": 256}
    else:
        cfg = {"B_coarse": 256, "B_fine": 1024, "B_confirm": 4096, "B_heldout": 8192, "top_k": TOP_K,
               "confirm": CONFIRM, "Ts": TS, "qs": QS, "orders": ORDERS, "rtol": ODE_RTOL,
               "grid_rows": GRID_ROWS}
    max_rows = 65536
    bridge = PhaseBridge()
    tuning = [Problem(n, f(), bridge, cache, cfg["rtol"]) for n, f in TUNING.items()]
    heldout = [Problem(n, f(), bridge, cache, cfg["rtol"]) for n, f in HELDOUT.items()]
    jobs = [] if args.evaluate_only else [(p, cfg[f"B_{k}"], SEEDS[k]) for p in tuning
                                          for k in ("coarse", "fine", "confirm")]
    jobs += [(p, cfg["B_heldout"], SEEDS["heldout"]) for p in heldout]
    for p, size, seed in tqdm(jobs, desc="exact targets (cached)"):
        p.batch(size, seed)

    previous = None
    if args.evaluate_only:
        previous = json.loads((out / "tuning.json").read_text())
        joint_path = out / "tuning_joint.json"
        joint = json.loads(joint_path.read_text())["table"] if joint_path.is_file() else None
        chosen, details = current_defaults(previous, joint)
    else:
        chosen, details = search(tuning, cfg, max_rows)

    # 3. acceptance on the held-out mixtures
    table, failures = heldout_check(heldout, chosen, details, cfg, max_rows, previous)
    for nfe in (1, 2):
        setting = chosen[nfe]
        record = {k: v for k, v in details[nfe].items() if k not in ("source", "setting")}
        table[str(nfe)] = {"T": setting.T, "q": setting.q, "order": setting.order,
                           "source": details[nfe]["source"], "heldout": None, "search": record}

    # 4. optional: each held-out mixture tuned on itself (its own coarse/fine/confirm batches),
    #    scored on its acceptance batch: what any single setting could reach on it.
    oracle = {}
    if args.oracle:
        for nfe in tqdm(HALF_NFES, desc="oracle"):
            oracle[str(nfe)] = {}
            for p in heldout:
                r = tune_nfe([p], nfe, cfg, max_rows, tqdm(disable=True))
                errs = p.rmse(nfe, [r["setting"], published_setting(nfe)], cfg["B_heldout"], SEEDS["heldout"],
                              max_rows)
                s = r["setting"]
                oracle[str(nfe)][p.name] = {"T": s.T, "q": s.q, "order": s.order,
                                            "ratio": float(errs[0] / errs[1])}

    runtime = time.time() - start
    report = {
        "config": {
            "command": command, "quick": args.quick, "tuning": list(TUNING), "heldout": list(HELDOUT),
            "batches": {k: cfg[f"B_{k}"] for k in ("coarse", "fine", "confirm", "heldout")}, "seeds": SEEDS,
            "heldout_batch": cfg["B_heldout"], "t0": T0, "T_ref": T_END, "tuned_nfes": list(TUNED_NFES),
            "grid_nfes": list(GRID_NFES), "grid_rows": cfg["grid_rows"],
            "Ts": list(cfg["Ts"]), "qs": list(cfg["qs"]), "orders": list(cfg["orders"]),
            "top_k": cfg["top_k"], "confirm": cfg["confirm"],
            "objective": "mean_m log r_m + max_m log r_m + 100 relu(max_m log r_m - log 0.9), r = E/P",
            "platform": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                        f"{args.threads} thread(s)",
        },
        "runtime_s": runtime,
        "acceptance": {"pass": not failures, "failures": failures},
        "table": {k: table[k] for k in sorted(table, key=int)},
        "oracle": oracle,
    }
    if previous is not None:  # --evaluate-only: the search itself ran earlier
        prev = previous["config"]
        report["config"]["search_command"] = prev.get("search_command", prev["command"])
        report["config"]["search_runtime_s"] = prev.get("search_runtime_s", previous["runtime_s"])
        report["oracle"] = previous.get("oracle", {})
    (out / "tuning.json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    (out / "tuning_table.md").write_text(md)
    print(md)
    print(f"runtime {runtime:.0f} s; acceptance {'PASS' if not failures else 'FAIL'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
