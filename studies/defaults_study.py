"""The package defaults as one smooth rule of the NFE, fitted with network error in the objective.

    python -m studies.defaults_study search      # tune split + FIT_MODELS: the rule family's candidates
    python -m studies.defaults_study fit         # the rule's few parameters from search.json (no sampling)
    python -m studies.defaults_study orders      # where the order steps: no error rise at the step
    python -m studies.defaults_study validate    # validate split: rule vs published, every NFE 1..50
    python -m studies.defaults_study trained     # all trained models (studies/trained_models.py), NFE 1..50
    python -m studies.make_defaults              # psb_fast/defaults.json from fit + validate + trained
    python -m studies.defaults_study test        # test split, opened once: per family vs the libraries

Run from the repository root (studies/ is not installed). Problems: benchmarks/problems.py, exact
Gaussian-mixture drifts in three splits disjoint by seed. Error of a setting on a problem: the
pathwise RMSE of the sampler's hop output against the exact flow's endpoint E[x1 | m(0.999)]
(DOP853) from the same prior draws (`psb_fast.tuning.settings_rmse`, float64); on a trained model,
against the model's own converged solution (studies/trained_models.py); ratio r = RMSE / RMSE of
the published setting at that NFE.

The rule (psb_fast/defaults.py): 1 - T = clip(a nfe^-b, TAU_MIN, TAU_MAX), one grid power q, one
solver variant, the order a step function of the NFE. `search` scores, at the FIT_NFES, every
setting of that family on a grid of hop times (TAU_GRID inside a window around a guide line)
for the (variant, q) pairs of FORMS and orders 1..3, on the tune split and on the FIT_MODELS.
`fit` then picks (variant, q, a, b, order thresholds) minimizing the mean over the FIT_NFES of

    J(nfe) = J_exact + J_trained,  J_set = mean log r + LOSS_WEIGHT mean max(log r, 0)

(means over the set's problems / models), where a rule's log r at an NFE is interpolated linearly in
log(1 - T) between the two scored hop times around the rule's T (a rule outside the scored window
is not considered). The trained networks enter the objective with the same weight as the exact
drifts (network error by design, not by veto). The order steps 1 -> 2 -> 3 at fit NFEs (never
down); the thresholds, (a, b) on a fine grid, q and the variant are chosen together by enumeration.

`orders` then moves the order steps (fit picks them at fit NFEs only, by J): per step o - 1 -> o,
among the starts s in ORDER_STARTS[o] and NEVER (no order o) that cost at most MAX_J_LOSS in J, the
one where the step raises the error (RMSE of order o at NFE s against order o - 1 at s - 1, by
`monotonicity`) on the fewest of the choice set (tune split, FIT_MODELS), then the least J, then the
earliest. The validate split and the held-out models are scored at the step as a check only.
`final_rule` is the fit's rule with orders.json's order steps; `validate`, `trained` and
studies/make_defaults.py use it.

`validate` and `trained` score the final rule and the published setting at every NFE 1..50 (and a
few above) with per-draw errors, so the sampling noise of the ratio between consecutive NFEs is
measured (`monotonicity`): the error may rise between NFE n and n + 1 by at most 5% beyond twice
its standard error. For the models with an exact drift, `trained` splits the error into the
sampler's part (against the model's converged solution) and the network's part (converged solution
against the exact flow). `test` opens the test split once: per family (`family_of`) at NFE 5 / 10 /
20 against the published setting and the real libraries (benchmarks/results/real_peers_test.json).

Every stage caches per-problem errors under <out>/cache (git-ignored; rerunning resumes), shows a
progress bar and writes <out>/<stage>.json and <stage>.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.problems import Problem, problems
from psb_fast.bridge import PhaseBridge
from psb_fast.defaults import check_rule, rule_setting
from psb_fast.oracles import ode_solution
from psb_fast.settings import T_END, Setting, published_setting
from psb_fast.tuning import run_settings

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "defaults_study"
FIT_NFES = (2, 3, 4, 5, 6, 8, 10, 14, 20, 30, 50)
CHECK_NFES = tuple(range(1, 51)) + (60, 80, 100)
TEST_NFES = (3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50)
LOSS_WEIGHT = 2.0
COUNTS = {"search": 36, "validate": 40, "test": 120}
DRAWS = {"search": 32, "validate": 64, "test": 128}
SPLIT = {"search": "tune", "validate": "validate", "test": "test"}
#: (variant, grid power q) pairs searched: the two corrector variants on the uniform grid and the
#: data-form corrector on the power-1.5 and power-2 grids (denser near t0, where high-dimensional
#: narrow modes are chosen).
FORMS = (("data-corrector", 1.0), ("multistep-corrector", 1.0), ("data-corrector", 1.5),
         ("data-corrector", 2.0))
ORDERS = (1, 2, 3)
#: Hop times 1 - T scored: TAU_GRID within [guide(nfe) / 3.5, 1.8 guide(nfe)].
TAU_GRID = tuple(round(0.7 / 1.4**k, 5) for k in range(14))
TAU_MIN, TAU_MAX = TAU_GRID[-1], TAU_GRID[0]
#: Candidate first NFEs of order 2 (usable from NFE 4) and order 3 scored by `orders`, besides NEVER.
ORDER_STARTS = {2: tuple(range(4, 17)), 3: tuple(range(40, 65))}
NEVER = "never"
#: The most J (fit objective, mean over the fit NFEs) that moving the order steps may cost.
MAX_J_LOSS = 0.05
#: Rise allowed between consecutive NFEs beyond 2 standard errors of the measured ratio.
RISE = 1.05
PEERS = ROOT / "benchmarks" / "results" / "real_peers_test.json"
BRIDGE = PhaseBridge()
TARGET = "target"  # the cache key of a problem's exact endpoint


def guide(nfe: int) -> float:
    return 0.25 * (10 / nfe) ** 0.75


def taus(nfe: int) -> list[float]:
    """The hop times 1 - T scored at this NFE (decreasing)."""
    g = guide(nfe)
    return [t for t in TAU_GRID if g / 3.5 <= t <= 1.8 * g] or [TAU_MAX]


def candidates(nfe: int) -> list[Setting]:
    """The search's settings at one NFE (orders lowered to what the NFE uses; duplicates dropped)."""
    out = {Setting(round(1 - tau, 6), q, order, None, v).effective(nfe)
           for v, q in FORMS for order in ORDERS for tau in taus(nfe)}
    return sorted(out)


def key(setting: Setting) -> str:
    return json.dumps(setting.to_json(), sort_keys=True)


def family_of(problem: Problem) -> str:
    """The reporting family: random mixtures by dimension band, rings/grids/checkerboards, points
    near curves (curves, spirals), embedded manifolds, 64-D and above."""
    dim = problem.mixture.dim
    if dim >= 64:
        return "64-D and above"
    if problem.family in ("gmm", "gmm-aniso"):
        return "random mixture D 2-7" if dim < 8 else ("random mixture D 8-23" if dim < 24 else
                                                         "random mixture D 24-63")
    if problem.family in ("rings", "grid", "checkerboard"):
        return "rings / grids / checkerboards"
    if problem.family in ("curve", "spiral"):
        return "near curves"
    return "embedded manifolds"


class Scorer:
    """Per-draw squared errors of settings on one problem, cached in <out>/cache/<split>-<seed>-<draws>.pt."""

    def __init__(self, problem: Problem, draws: int, cache_dir: Path) -> None:
        self.problem, self.draws = problem, draws
        self.path = cache_dir / f"{problem.split}-{problem.seed}-{draws}.pt"
        self.cache: dict[str, torch.Tensor] = torch.load(self.path) if self.path.is_file() else {}
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m0, target): prior draws seeded by the problem's seed and the exact flow's endpoint."""
        if self._batch is None:
            mix = self.problem.mixture
            gen = torch.Generator().manual_seed(self.problem.seed)
            m0 = BRIDGE.sample_prior((self.draws, mix.dim), generator=gen).double()
            if TARGET not in self.cache:  # the exact flow once per problem (cached with the errors)
                m_end = ode_solution(mix, BRIDGE, m0, 1e-5, T_END, rtol=1e-9, atol=1e-9)
                self.cache[TARGET] = mix.posterior_mean(BRIDGE, m_end, T_END)
            self._batch = (m0, self.cache[TARGET])
        return self._batch

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(self.cache, tmp)
        tmp.replace(self.path)

    def draws_sq(self, nfe: int, settings: Sequence[Setting]) -> torch.Tensor:
        """Squared error per setting and draw (mean over coordinates), [C, draws] float64."""
        keys = [f"{nfe}|{key(s)}" for s in settings]
        todo = list(dict.fromkeys(k for k, s in zip(keys, settings, strict=True) if k not in self.cache))
        if todo:
            by_key = dict(zip(keys, settings, strict=True))
            m0, target = self.batch()
            out = run_settings(self.problem.mixture.as_model(BRIDGE), BRIDGE, m0, nfe,
                               [by_key[k] for k in todo], max_rows=8192)
            sq = (out - target.unsqueeze(0)).pow(2).mean(-1)
            self.cache.update({k: sq[i].float().clone() for i, k in enumerate(todo)})
            self.save()
        return torch.stack([self.cache[k].double() for k in keys])

    def errors(self, nfe: int, settings: Sequence[Setting]) -> list[float]:
        return self.draws_sq(nfe, settings).mean(1).sqrt().tolist()


def _scorers(stage: str, out: Path, count: int | None, draws: int | None) -> list[Scorer]:
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    probs = problems(SPLIT[stage], count or COUNTS[stage])
    return [Scorer(p, draws or DRAWS[stage], cache) for p in probs]


def targets(stage: str, out: Path, count: int | None = None, draws: int | None = None) -> None:
    """Compute and cache the exact endpoints of a stage's problems (DOP853) ahead of the stage."""
    for scorer in tqdm(_scorers(stage, out, count, draws), unit="problem", desc=f"targets ({stage})"):
        if TARGET not in scorer.cache:
            scorer.batch()
            scorer.save()


def _j(log_ratios: np.ndarray, axis: int = -1) -> np.ndarray:
    return log_ratios.mean(axis) + LOSS_WEIGHT * np.maximum(log_ratios, 0).mean(axis)


# ----------------------------------------------------------------------------- search and fit


def search(out: Path, count: int | None = None, draws: int | None = None,
           models: Sequence[str] | None = None) -> dict:
    """Log ratios to the published setting of every candidate at every FIT_NFE, per tune problem
    and per fit model: {"nfes": {nfe: {"settings": [...], "exact": [[problem x candidate]],
    "trained": {model: [candidate]}}}}."""
    from studies import trained_models

    models = trained_models.FIT_MODELS if models is None else tuple(models)
    scorers = _scorers("search", out, count, draws)
    result = {"split": "tune", "problems": [s.problem.label for s in scorers],
              "seeds": [s.problem.seed for s in scorers], "draws": scorers[0].draws, "models": list(models),
              "loss_weight": LOSS_WEIGHT, "nfes": {}}
    with tqdm(total=len(FIT_NFES) * (len(scorers) + len(models)), unit="problem-NFE", desc="search") as bar:
        for nfe in FIT_NFES:
            pub, cands = published_setting(nfe), candidates(nfe)
            exact = []
            for scorer in scorers:
                e_pub, *errs = scorer.errors(nfe, [pub, *cands])
                exact.append([round(math.log(e / e_pub), 5) for e in errs])
                bar.update()
            trained = {}
            for name in models:
                e_pub, *errs = trained_models.candidate_errors(name, nfe, [pub, *cands]).tolist()
                trained[name] = [round(math.log(e / e_pub), 5) for e in errs]
                bar.update()
            result["nfes"][str(nfe)] = {"settings": [c.to_json() for c in cands], "exact": exact,
                                        "trained": trained}
    _write(out, "search", result, _search_table(result))
    return result


def _log_ratio_table(found: dict, nfe: int, variant: str, q: float) -> tuple[np.ndarray, np.ndarray]:
    """(log taus [n_tau] increasing, log ratios [3 orders, n_tau, problems + models]) at one NFE; the
    problems' and the models' columns are told apart by the caller (problems first)."""
    rec = found["nfes"][str(nfe)]
    index = {key(Setting.from_json(s)): i for i, s in enumerate(rec["settings"])}
    cols = np.array(rec["exact"] + [rec["trained"][m] for m in found["models"]])  # [P + M, C]
    ts = sorted(taus(nfe))
    table = np.empty((len(ORDERS), len(ts), cols.shape[0]))
    for o, order in enumerate(ORDERS):
        for i, tau in enumerate(ts):
            s = Setting(round(1 - tau, 6), q, order, None, variant).effective(nfe)
            table[o, i] = cols[:, index[key(s)]]
    return np.log(ts), table


def _rule_j(found: dict, nfes: list[int], variant: str, q: float, log_a: np.ndarray,
            bs: np.ndarray) -> np.ndarray:
    """J [orders, nfes, A, B] of the rule (variant, q, a = exp(log_a), b) with each order at each
    fit NFE; inf where the rule's hop time lies outside the scored window."""
    n_problems = len(found["problems"])
    J = np.full((len(ORDERS), len(nfes), len(log_a), len(bs)), np.inf)
    for k, n in enumerate(nfes):
        lt, table = _log_ratio_table(found, n, variant, q)
        log_tau = np.clip(log_a[:, None] - bs[None, :] * math.log(n), math.log(TAU_MIN), math.log(TAU_MAX))
        inside = (log_tau >= lt[0] - 1e-9) & (log_tau <= lt[-1] + 1e-9)
        pos = np.clip(np.searchsorted(lt, log_tau) - 1, 0, max(len(lt) - 2, 0))
        for o in range(len(ORDERS)):
            if len(lt) == 1:
                vals = np.broadcast_to(table[o, 0], (*log_tau.shape, table.shape[2]))
            else:
                w = ((log_tau - lt[pos]) / (lt[pos + 1] - lt[pos]))[..., None]
                vals = (1 - w) * table[o, pos] + w * table[o, pos + 1]  # [A, B, problems + models]
            j = _j(vals[..., :n_problems])
            if vals.shape[-1] > n_problems:
                j = j + _j(vals[..., n_problems:])
            J[o, k] = np.where(inside, j, np.inf)
    return J


def fit(out: Path) -> dict:
    """The rule's parameters from search.json (module docstring): (a, b) on a fine grid, every
    variant and q, order thresholds by enumeration."""
    found = json.loads((out / "search.json").read_text())
    nfes = [int(n) for n in found["nfes"]]
    bs = np.round(np.arange(0.2, 1.61, 0.02), 4)
    log_a = np.linspace(math.log(0.05), math.log(5.0), 161)
    best: dict | None = None
    for variant, q in FORMS:
        J = _rule_j(found, nfes, variant, q, log_a, bs)  # [orders, nfes, A, B]
        for i2 in range(len(nfes) + 1):  # order 1 below nfes[i2], 2 below nfes[i3], then 3
            for i3 in range(i2, len(nfes) + 1):
                sel = np.array([0 if k < i2 else (1 if k < i3 else 2) for k in range(len(nfes))])
                total = J[sel, np.arange(len(nfes))].mean(0)  # [A, B]
                a_i, b_i = np.unravel_index(np.argmin(total), total.shape)
                score = float(total[a_i, b_i])
                if not math.isfinite(score) or (best is not None and score >= best["J"]):
                    continue
                starts, orders = [1], [ORDERS[0]]
                for i, order in ((i2, ORDERS[1]), (i3, ORDERS[2])):
                    if i < len(nfes) and nfes[i] == starts[-1]:
                        orders[-1] = order
                    elif i < len(nfes):
                        starts.append(nfes[i])
                        orders.append(order)
                rule = {"variant": variant, "q": q,
                        "tau": {"a": round(math.exp(log_a[a_i]), 5), "b": float(bs[b_i]),
                                "min": TAU_MIN, "max": TAU_MAX},
                        "order": {"from_nfe": starts, "orders": orders}}
                per_nfe = J[sel, np.arange(len(nfes)), a_i, b_i].tolist()
                best = {"rule": rule, "J": score,
                        "J_per_nfe": dict(zip(map(str, nfes), per_nfe, strict=True))}
    if best is None:
        raise ValueError("no rule of the family has its hop time inside the scored window at every fit NFE")
    check_rule(best["rule"])
    result = {"fit_nfes": nfes, "problems": len(found["problems"]), "models": found["models"],
              "loss_weight": LOSS_WEIGHT, "rule": best["rule"], "J": best["J"],
              "J_per_nfe": best["J_per_nfe"],
              "scores": _fit_scores(found, best["rule"]), "pareto": _pareto(found, (5, 10, 20))}
    _write(out, "fit", result, _fit_table(result))
    return result


def _fit_scores(found: dict, rule: dict) -> dict:
    """Per fit NFE the rule's median / worst ratio on the tune problems and ratio per fit model, at
    the nearest scored hop time (the exact rule is scored by `validate` and `trained`)."""
    out = {}
    for n in map(int, found["nfes"]):
        rec = found["nfes"][str(n)]
        target = rule_setting(rule, n)
        sets = [Setting.from_json(s) for s in rec["settings"]]
        same = [i for i, s in enumerate(sets) if s.replace(T=target.T) == target]
        i = min(same, key=lambda i: abs(sets[i].T - target.T))
        ratios = np.exp(np.array([row[i] for row in rec["exact"]]))
        out[str(n)] = {"setting_scored": sets[i].label, "median": round(float(np.median(ratios)), 4),
                       "worst": round(float(ratios.max()), 4), "losses": int((ratios > 1).sum()),
                       "trained": {m: round(math.exp(v[i]), 4) for m, v in rec["trained"].items()}}
    return out


def _pareto(found: dict, nfes: Sequence[int]) -> dict:
    """Per NFE the (median, worst) ratio pairs of the scored settings on the tune split that no
    other scored setting beats in both (the trade-off one fixed setting can reach)."""
    out = {}
    for n in nfes:
        rec = found["nfes"].get(str(n))
        if rec is None:
            continue
        ratios = np.exp(np.array(rec["exact"]))  # [P, C]
        med, worst = np.median(ratios, 0), ratios.max(0)
        front = [i for i in range(len(med)) if not any(
            (med[j] <= med[i] and worst[j] < worst[i]) or (med[j] < med[i] and worst[j] <= worst[i])
            for j in range(len(med)))]
        front.sort(key=lambda i: med[i])
        out[str(n)] = [{"setting": Setting.from_json(rec["settings"][i]).label,
                        "median": round(float(med[i]), 4), "worst": round(float(worst[i]), 3)} for i in front]
    return out


# ----------------------------------------------------------------------------- validate and trained


def final_rule(out: Path) -> dict:
    """The fit's rule (fit.json) with the order steps of orders.json when that is for this fit."""
    rule = json.loads((out / "fit.json").read_text())["rule"]
    path = out / "orders.json"
    if path.is_file():
        moved = json.loads(path.read_text())
        if {k: v for k, v in moved["fit_rule"].items() if k != "order"} != {
                k: v for k, v in rule.items() if k != "order"}:
            raise ValueError(f"{path} is for another fit: rerun `python -m studies.defaults_study orders`")
        rule = {**rule, "order": moved["order"]}
    check_rule(rule)
    return rule


def rule_settings(out: Path, nfes: Sequence[int]) -> dict[int, Setting]:
    rule = final_rule(out)
    return {n: rule_setting(rule, n) for n in nfes}


# ----------------------------------------------------------------------------- orders


def _with_order(rule: dict, nfe: int, order: int) -> Setting:
    return rule_setting(rule, nfe).replace(order=order).effective(nfe)


def step_rises(sq_low: dict[int, torch.Tensor], sq_high: dict[int, torch.Tensor],
               starts: Sequence[int]) -> dict[str, dict]:
    """Per candidate start s: the higher order at s against the lower at s - 1 (per-draw squared
    errors on the same draws): {"ratio", "rise": bool (a `monotonicity` violation)}."""
    out = {}
    for s in starts:
        pair = {s - 1: sq_low[s - 1], s: sq_high[s]}
        ratio = math.sqrt(float(sq_high[s].mean() / sq_low[s - 1].mean()))
        out[str(s)] = {"ratio": round(ratio, 4), "rise": bool(monotonicity(pair))}
    return out


def orders(out: Path, count: int | None = None, draws: int | None = None) -> dict:
    """Where the order steps (module docstring): per step (order o - 1 -> o) and candidate start in
    ORDER_STARTS[o], the step's error ratio on every tune / validate problem and trained model; the
    chosen starts; orders.json."""
    from studies import trained_models

    fit_result = json.loads((out / "fit.json").read_text())
    rule = fit_result["rule"]
    found = json.loads((out / "search.json").read_text())
    units = {"tune": _scorers("search", out, count, draws),
             "validate": _scorers("validate", out, count, draws)}
    models = {"fit": trained_models.FIT_MODELS, "held out": trained_models.HELD_OUT_MODELS}
    total = sum(len(ORDER_STARTS[o]) + 1 for o in ORDER_STARTS) * (
        sum(map(len, units.values())) + sum(map(len, models.values())))
    result = {"fit_rule": rule, "starts": {str(o): list(v) for o, v in ORDER_STARTS.items()},
              "choice_set": {"tune": len(units["tune"]), "models": list(models["fit"])},
              "check_set": {"validate": len(units["validate"]), "models": list(models["held out"])},
              "steps": {}}
    with tqdm(total=total, unit="unit-NFE", desc="orders") as bar:
        for o, starts in ORDER_STARTS.items():
            nfes = range(starts[0] - 1, starts[-1] + 1)
            rec = {}
            for split, scorers in units.items():
                for scorer in scorers:
                    sq = {}
                    for n in nfes:
                        sq[n] = scorer.draws_sq(n, [_with_order(rule, n, o - 1), _with_order(rule, n, o)])
                        bar.update()
                    rec[f"{split}:{scorer.problem.label}"] = step_rises(
                        {n: v[0] for n, v in sq.items()}, {n: v[1] for n, v in sq.items()}, starts)
            for role, names in models.items():
                for name in names:
                    sq = {}
                    for n in nfes:
                        sq[n] = trained_models.draw_errors(
                            name, n, [_with_order(rule, n, o - 1), _with_order(rule, n, o)])["target"]
                        bar.update()
                    rec[f"{role}:{name}"] = step_rises({n: v[0] for n, v in sq.items()},
                                                       {n: v[1] for n, v in sq.items()}, starts)
            result["steps"][str(o)] = rec
    result.update(_choose_starts(result, rule, found))
    _write(out, "orders", result, _orders_table(result))
    return result


def _choose_starts(result: dict, rule: dict, found: dict) -> dict:
    """The order steps: per step, among the starts (and NEVER) whose J at the fit NFEs is within
    MAX_J_LOSS of the fit rule's, the one with the fewest rises on the choice set (tune problems, fit
    models), then the least J, then the earliest; J and rises of each candidate start."""
    nfes = [int(n) for n in found["nfes"]]
    tau = rule["tau"]
    J = _rule_j(found, nfes, rule["variant"], rule["q"], np.array([math.log(tau["a"])]),
                np.array([tau["b"]]))[:, :, 0, 0]  # [orders, fit NFEs]

    def j_of(starts: dict[int, int]) -> float:
        sel = [max((p for p in starts if starts[p] <= n), default=1) - 1 for n in nfes]
        return float(J[sel, np.arange(len(nfes))].mean())

    j_fit = j_of({p: _current_start(rule, p) for p in ORDER_STARTS})
    chosen: dict[int, int | str] = {}
    per_start = {}
    for o in sorted(ORDER_STARTS):
        rows = {}
        for s in (*ORDER_STARTS[o], NEVER):
            trial = {**chosen, o: s}
            starts = {p: trial.get(p, _current_start(rule, p)) for p in ORDER_STARTS}
            j = j_of({p: 10**6 if v == NEVER else v for p, v in starts.items()})
            rises = {part: [u.split(":", 1)[1] for u, r in result["steps"][str(o)].items()
                            if u.split(":")[0] == part and s != NEVER and r[str(s)]["rise"]]
                     for part in ("tune", "fit", "validate", "held out")}
            rows[str(s)] = {"J": j, "rises": rises}
        allowed = [s for s, r in rows.items() if r["J"] <= j_fit + MAX_J_LOSS]
        best = min(allowed, key=lambda s: (len(rows[s]["rises"]["tune"]) + len(rows[s]["rises"]["fit"]),
                                           round(rows[s]["J"], 6), s == NEVER, 0 if s == NEVER else int(s)))
        chosen[o] = NEVER if best == NEVER else int(best)
        per_start[str(o)] = rows
    kept = [o for o in sorted(chosen) if chosen[o] != NEVER]
    order = {"from_nfe": [1] + [chosen[o] for o in kept], "orders": [1] + kept}
    return {"order": order, "per_start": per_start, "J_fit_order": j_fit,
            "J": per_start[str(max(chosen))][str(chosen[max(chosen)])]["J"]}


def _current_start(rule: dict, order: int) -> int:
    """The fit rule's first NFE of this order (1000 + order where it has none)."""
    steps = dict(zip(rule["order"]["orders"], rule["order"]["from_nfe"], strict=True))
    return steps.get(order, 1000 + order)


def _orders_table(result: dict) -> str:
    from psb_fast.defaults import describe_rule

    final = {**result["fit_rule"], "order": result["order"]}
    lines = ["# Where the order steps", "", "Command: `python -m studies.defaults_study orders`. Per step "
             "(order o - 1 -> o) and candidate start s: problems / models where the error at NFE s (order o) "
             f"is above the error at s - 1 (order o - 1) by more than {RISE:g}x beyond 2 standard errors. "
             f"Choice set: {result['choice_set']['tune']} tune problems and "
             f"{', '.join(result['choice_set']['models'])}; check set (not used in the choice): "
             f"{result['check_set']['validate']} validate problems and "
             f"{', '.join(result['check_set']['models'])}.", "",
             f"Fit rule: {describe_rule(result['fit_rule'])}.", "",
             f"Final rule: {describe_rule(final)}; mean J over the fit NFEs {result['J']:.4f} (the fit's "
             f"order steps: {result['J_fit_order']:.4f}; a start is allowed within {MAX_J_LOSS:g} of it).",
             ""]
    for o, rows in result["per_start"].items():
        lines += [f"## Order {int(o) - 1} -> {o}", "",
                  "| start | J | rises tune | rises fit models | rises validate | rises held-out models "
                  "| max ratio (all) |", "|---:|---:|---:|---|---:|---|---:|"]
        for s, r in rows.items():
            worst = "-" if s == NEVER else f'{max(u[s]["ratio"] for u in result["steps"][o].values()):.2f}'
            names = {k: ", ".join(v) or "-" for k, v in r["rises"].items()}
            lines.append(f"| {s} | {r['J']:.4f} | {len(r['rises']['tune'])} | {names['fit']} | "
                         f"{len(r['rises']['validate'])} | {names['held out']} | {worst} |")
        lines.append("")
    return "\n".join(lines)


def monotonicity(draws_sq: dict[int, torch.Tensor]) -> list[dict]:
    """Consecutive NFEs (of the keys) where the RMSE rises by more than RISE beyond 2 standard
    errors: draws_sq {nfe: [draws] squared errors} on the same draws. The standard error of
    log(RMSE(n') / RMSE(n)) is by the delta method on the paired per-draw errors."""
    nfes, bad = sorted(draws_sq), []
    for n, m in zip(nfes, nfes[1:], strict=False):
        a, b = draws_sq[n], draws_sq[m]
        ratio = math.sqrt(b.mean() / a.mean())
        d = b / (2 * b.mean()) - a / (2 * a.mean())
        se = float(d.std() / math.sqrt(len(d)))
        if ratio > RISE * math.exp(2 * se):
            bad.append({"from": n, "to": m, "ratio": round(ratio, 4), "se_log": round(se, 4)})
    return bad


def validate(out: Path, count: int | None = None, draws: int | None = None) -> dict:
    """The rule and the published setting on the validate split at CHECK_NFES; per problem the
    RMSEs and the rule's monotonicity violations."""
    scorers = _scorers("validate", out, count, draws)
    settings = rule_settings(out, CHECK_NFES)
    result = {"split": "validate", "problems": [s.problem.label for s in scorers], "draws": scorers[0].draws,
              "nfes": {str(n): {"setting": s.label} for n, s in settings.items()}, "per_problem": {}}
    with tqdm(total=len(scorers), unit="problem", desc="validate") as bar:
        for scorer in scorers:
            sq = {n: scorer.draws_sq(n, [published_setting(n), s]) for n, s in settings.items()}
            rule_sq = {n: v[1] for n, v in sq.items()}
            result["per_problem"][scorer.problem.label] = {
                "family": family_of(scorer.problem),
                "rule": {str(n): float(v[1].mean().sqrt()) for n, v in sq.items()},
                "published": {str(n): float(v[0].mean().sqrt()) for n, v in sq.items()},
                "rises": monotonicity(rule_sq),
                "published_rises": monotonicity({n: v[0] for n, v in sq.items()})}
            bar.update()
    _summarize(result)
    _write(out, "validate", result, _validate_table(result))
    return result


def _summarize(result: dict) -> None:
    for n, rec in result["nfes"].items():
        ratios = [p["rule"][n] / p["published"][n] for p in result["per_problem"].values()]
        rec.update(median=statistics.median(ratios), worst=max(ratios), losses=sum(r > 1 for r in ratios))
    if all("rises" in p for p in result["per_problem"].values()):  # validate: every NFE 1..50 scored
        result["problems_with_rises"] = sum(bool(p["rises"]) for p in result["per_problem"].values())
        result["problems_with_published_rises"] = sum(bool(p["published_rises"])
                                                      for p in result["per_problem"].values())


def trained(out: Path, models: Sequence[str] | None = None) -> dict:
    """The rule and the published setting on every trained model at CHECK_NFES: RMSE against the
    model's converged solution, monotonicity, and for exact-drift models the split of the error."""
    from studies import trained_models

    models = tuple(trained_models.MODELS) if models is None else tuple(models)
    settings = rule_settings(out, CHECK_NFES)
    result = {"models": {}, "nfes": [int(n) for n in settings]}
    with tqdm(total=len(models) * len(settings), unit="model-NFE", desc="trained") as bar:
        for name in models:
            tm = trained_models.model(name)
            rows, rule_sq, pub_sq = {}, {}, {}
            for n, s in settings.items():
                d = trained_models.draw_errors(name, n, [published_setting(n), s])
                pub_sq[n], rule_sq[n] = d["target"][0], d["target"][1]
                row = {"rule": float(rule_sq[n].mean().sqrt()), "published": float(pub_sq[n].mean().sqrt())}
                if d["exact"] is not None:
                    row["rule_vs_exact"] = float(d["exact"][1].mean().sqrt())
                    row["published_vs_exact"] = float(d["exact"][0].mean().sqrt())
                rows[str(n)] = row
                bar.update()
            kind, data, role = trained_models.MODELS[name]
            rec = {"kind": kind, "data": data, "role": role, "architecture": tm.architecture,
                   "reference": tm.convergence, "training_seconds": tm.training.get("seconds"),
                   "table": rows, "rises": monotonicity(rule_sq), "published_rises": monotonicity(pub_sq)}
            if tm.exact is not None:  # the network's own error: converged solution vs the exact flow
                rec["network_rmse"] = float(rmse_pair(tm.target, tm.exact))
            result["models"][name] = rec
    _write(out, "trained", result, _trained_table(result))
    return result


def rmse_pair(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


# ----------------------------------------------------------------------------- test


def test(out: Path, count: int | None = None, draws: int | None = None) -> dict:
    """The test split, opened once: the final rule (= the package defaults) and the published setting
    at TEST_NFES;
    per family at 5 / 10 / 20 against the real libraries."""
    rule = rule_settings(out, TEST_NFES)  # the defaults file's rule (studies/make_defaults.py)
    scorers = _scorers("test", out, count, draws)
    result = {"split": "test", "problems": [s.problem.label for s in scorers], "draws": scorers[0].draws,
              "nfes": {str(n): {"setting": rule[n].label} for n in TEST_NFES}, "per_problem": {}}
    with tqdm(total=len(scorers), unit="problem", desc="test") as bar:
        for scorer in scorers:
            errs = {n: scorer.errors(n, [published_setting(n), rule[n]]) for n in TEST_NFES}
            result["per_problem"][scorer.problem.label] = {
                "family": family_of(scorer.problem), "seed": scorer.problem.seed,
                "rule": {str(n): e[1] for n, e in errs.items()},
                "published": {str(n): e[0] for n, e in errs.items()}}
            bar.update()
    _summarize(result)
    if PEERS.is_file():
        result["families"] = versus_peers(result, json.loads(PEERS.read_text()))
    else:
        print(f"{PEERS} is missing: run `python -m benchmarks.real_peers --split test` for the peer "
              "comparison", file=sys.stderr)
    _write(out, "test", result, _test_table(result))
    return result


def versus_peers(result: dict, peers: dict, nfes: Sequence[int] = (5, 10, 20)) -> dict:
    """Per family (and "all") and NFE: the defaults' median and worst ratio to published, median
    RMSE of the defaults, of the published setting, of the best single library configuration for
    that family (the one with the least median there) and of the best configuration per problem."""
    by_label = {rec["label"]: rec for rec in peers["problems"].values()}
    groups: dict[str, list[str]] = {"all": []}
    for label, rec in result["per_problem"].items():
        if label in by_label:
            groups.setdefault(rec["family"], []).append(label)
            groups["all"].append(label)
    out = {}
    for family, labels in sorted(groups.items()):
        out[family] = {"problems": len(labels)}
        for n in nfes:
            k = str(n)
            ours = [result["per_problem"][lb]["rule"][k] for lb in labels]
            pub = [result["per_problem"][lb]["published"][k] for lb in labels]
            configs = by_label[labels[0]]["nfe"][k]["configs"]
            single = min(configs, key=lambda c: statistics.median(
                by_label[lb]["nfe"][k]["configs"][c]["error"] for lb in labels))
            single_err = [by_label[lb]["nfe"][k]["configs"][single]["error"] for lb in labels]
            best = [by_label[lb]["nfe"][k]["best"]["error"] for lb in labels]
            ratios = [o / p for o, p in zip(ours, pub, strict=True)]
            out[family][k] = {
                "defaults_median": statistics.median(ours), "published_median": statistics.median(pub),
                "median_ratio_to_published": statistics.median(ratios),
                "worst_ratio_to_published": max(ratios),
                "worst_problem": labels[ratios.index(max(ratios))],
                "best_config": single, "best_config_median": statistics.median(single_err),
                "best_per_problem_median": statistics.median(best),
                "ahead_of_best_config": sum(o <= s for o, s in zip(ours, single_err, strict=True)),
            }
    return out


# ----------------------------------------------------------------------------- output


def _write(out: Path, stage: str, result: dict, table: str) -> None:
    result = {"command": f"python -m studies.defaults_study {stage}", **result}
    indent = None if stage == "search" else 1  # search.json: one log ratio per problem and setting
    (out / f"{stage}.json").write_text(json.dumps(result, indent=indent) + "\n")
    (out / f"{stage}.md").write_text(table)


def _search_table(result: dict) -> str:
    lines = [f"# Defaults search on the tune split ({len(result['problems'])} problems, {result['draws']} "
             f"draws) and the fit models ({', '.join(result['models'])})", "",
             "Command: `python -m studies.defaults_study search`. Per fit NFE the best scored setting by "
             f"J = J_exact + J_trained (J = mean log ratio + {LOSS_WEIGHT:g} mean max(log ratio, 0)).", "",
             "| NFE | settings scored | best setting | J | median ratio (tune) | worst (tune) | "
             "worst trained |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for n, rec in result["nfes"].items():
        exact, trained = np.array(rec["exact"]), np.array(list(rec["trained"].values()))
        j = _j(exact.T) + (_j(trained.T) if trained.size else 0)
        i = int(np.argmin(j))
        worst_t = float(np.exp(trained[:, i].max())) if trained.size else float("nan")
        lines.append(f"| {n} | {len(rec['settings'])} | {Setting.from_json(rec['settings'][i]).label} | "
                     f"{j[i]:.3f} | {np.exp(np.median(exact[:, i])):.3f} | {np.exp(exact[:, i].max()):.2f} | "
                     f"{worst_t:.2f} |")
    return "\n".join(lines) + "\n"


def _fit_table(result: dict) -> str:
    from psb_fast.defaults import describe_rule

    lines = ["# The fitted rule", "", "Command: `python -m studies.defaults_study fit` (from "
                                      "search.json).", "",
             f"Rule: {describe_rule(result['rule'])}; mean J over the fit NFEs {result['J']:.3f}.", "",
             "Ratios to published at the scored hop time nearest the rule's (tune split; fit models):", "",
             "| NFE | setting scored | J | median | worst | losses | " + " | ".join(result["models"]) + " |",
             "|---:|---|---:|---:|---:|---:|" + "---:|" * len(result["models"])]
    for n, s in result["scores"].items():
        cells = " | ".join(f"{s['trained'][m]:.3f}" for m in result["models"])
        lines.append(f"| {n} | {s['setting_scored']} | {result['J_per_nfe'][n]:.3f} | {s['median']:.3f} | "
                     f"{s['worst']:.2f} | {s['losses']} | {cells} |")
    lines += ["", "## Pareto front on the tune split (median vs worst ratio to published, scored "
                  "settings)", ""]
    for n, front in result["pareto"].items():
        lines.append(f"- NFE {n}: " + "; ".join(f"{p['median']:.3f} / {p['worst']:.2f} ({p['setting']})"
                                                 for p in front))
    return "\n".join(lines) + "\n"


def _validate_table(result: dict) -> str:
    lines = [f"# Rule vs published on the validate split ({len(result['problems'])} problems, "
             f"{result['draws']} draws)", "", "Command: `python -m studies.defaults_study validate`. Ratio = "
             "RMSE / RMSE of the published setting against the exact flow.", "",
             f"Monotonicity (error may rise at most {RISE:g}x beyond 2 standard errors between consecutive "
             f"NFEs 1..50, 50..100): problems with a violation: rule "
             f"{result['problems_with_rises']}, published "
             f"{result['problems_with_published_rises']} of {len(result['problems'])}.", ""]
    for label, p in result["per_problem"].items():
        if p["rises"]:
            lines.append(f"- {label}: {_rises_text(p['rises'])}")
    lines += ["", "| NFE | rule setting | median ratio | worst ratio | losses |", "|---:|---|---:|---:|---:|"]
    for n, rec in result["nfes"].items():
        lines.append(f"| {n} | {rec['setting']} | {rec['median']:.3f} | {rec['worst']:.2f} | "
                     f"{rec['losses']} |")
    return "\n".join(lines) + "\n"


def _rises_text(rises: Sequence[dict]) -> str:
    """Monotonicity violations as "from->to xratio, ..." ("" for none)."""
    return ", ".join(f"{r['from']}->{r['to']} x{r['ratio']}" for r in rises)


def _trained_table(result: dict) -> str:
    names = list(result["models"])
    lines = ["# Rule vs published on trained models", "", "Command: `python -m studies.defaults_study "
             "trained`. RMSE against each model's own converged solution (NFE 1600); ratio = rule / "
             "published. Held-out models were not in the fit.", "",
             "| model | kind | role | architecture | NFE 800 vs 1600 | monotonicity violations (rule) | "
             "(published) |", "|---|---|---|---|---:|---|---|"]
    for name, m in result["models"].items():
        gap = next(v for k, v in m["reference"].items() if k.startswith("rmse_nfe"))
        rises, prises = _rises_text(m["rises"]) or "none", _rises_text(m["published_rises"]) or "none"
        lines.append(f"| {name} | {m['kind']} | {m['role']} | {m['architecture']} | {gap:.1e} | {rises} | "
                     f"{prises} |")
    exact = [n for n in names if "network_rmse" in result["models"][n]]
    if exact:
        lines += ["", "Error split for the models with an exact drift: sampler = rule vs the model's "
                  "converged solution; network = converged solution vs the exact flow; total = rule vs the "
                  "exact flow.", "",
                  "| model | NFE | sampler | network | total | published total "
                  "|", "|---|---:|---:|---:|---:|---:|"]
        for name in exact:
            m = result["models"][name]
            for n in ("3", "5", "10", "20", "50"):
                r = m["table"][n]
                lines.append(f"| {name} | {n} | {r['rule']:.2e} | {m['network_rmse']:.2e} | "
                             f"{r['rule_vs_exact']:.2e} | {r['published_vs_exact']:.2e} |")
    lines += ["", "| NFE | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for n in result["nfes"]:
        cells = []
        for name in names:
            r = result["models"][name]["table"][str(n)]
            ratio = r["rule"] / r["published"]
            cells.append(f"{r['rule']:.2e} ({ratio:.2f})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _test_table(result: dict) -> str:
    lines = [f"# Defaults vs published on the test split ({len(result['problems'])} problems, "
             f"{result['draws']} "
             "draws)", "", "Command: `python -m studies.defaults_study test` (opened once).", "",
             "| NFE | setting | median ratio | worst ratio | losses |", "|---:|---|---:|---:|---:|"]
    for n, rec in result["nfes"].items():
        lines.append(f"| {n} | {rec['setting']} | {rec['median']:.3f} | {rec['worst']:.2f} | "
                     f"{rec['losses']} |")
    if "families" in result:
        lines += ["", "## Per family against the real libraries "
                      "(benchmarks/results/real_peers_test.json)", "",
                  "Median RMSE, each method against its own exact flow; best config = the single library "
                  "configuration with the least median in that family.", "",
                  "| family | problems | NFE | defaults median | best config median | best per "
                  "problem median | "
                  "median ratio to published | worst ratio to published | ahead of best config |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for family, rec in result["families"].items():
            for n in ("5", "10", "20"):
                r = rec[n]
                lines.append(f"| {family} | {rec['problems']} | {n} | {r['defaults_median']:.4f} | "
                             f"{r['best_config_median']:.4f} ({r['best_config']}) | "
                             f"{r['best_per_problem_median']:.4f} "
                             f"| {r['median_ratio_to_published']:.3f} | "
                             f"{r['worst_ratio_to_published']:.2f} | "
                             f"{r['ahead_of_best_config']}/{rec['problems']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("search", "fit", "orders", "validate", "trained", "test",
                                          "targets"))
    parser.add_argument("--for", dest="for_stage", default="test", choices=tuple(SPLIT),
                        help="targets: the stage whose problems' exact endpoints to compute ahead")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--count", type=int, default=None, help="problems (default: COUNTS[stage])")
    parser.add_argument("--draws", type=int, default=None, help="prior draws per problem (default: "
                                                                "DRAWS[stage])")
    parser.add_argument("--models", nargs="*", default=None, help="trained models (search: the fit models)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if args.stage == "search":
        search(args.out, args.count, args.draws, args.models)
    elif args.stage == "fit":
        fit(args.out)
    elif args.stage == "orders":
        orders(args.out, args.count, args.draws)
    elif args.stage == "validate":
        validate(args.out, args.count, args.draws)
    elif args.stage == "trained":
        trained(args.out, args.models)
    elif args.stage == "targets":
        targets(args.for_stage, args.out, args.count, args.draws)
    else:
        test(args.out, args.count, args.draws)
    print(f"{args.stage}: {time.time() - start:.0f} s; results in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
