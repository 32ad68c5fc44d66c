"""The package defaults, chosen on generated problems and checked on problems nobody tuned on.

    python -m studies.defaults_study search      # tune split: every candidate at the anchor NFEs
    python -m studies.defaults_study validate    # validate split: the picks vs published, NFE 1..50
    python -m studies.defaults_study trained     # trained models (studies/trained_models.py), NFE 3..50
    python -m studies.make_defaults              # psb_fast/defaults.json from search + validate + trained
    python -m studies.defaults_study test        # test split, opened once: the final check

Run from the repository root (studies/ is not installed). Problems: benchmarks/problems.py, exact
Gaussian-mixture drifts in three splits disjoint by seed. Error of a setting on a problem: the
pathwise RMSE of the sampler's hop output against the exact flow's endpoint E[x1 | m(0.999)]
(DOP853) from the same prior draws (`psb_fast.tuning.settings_rmse`, float64); ratio r = RMSE /
RMSE of the published setting at that NFE.

Few parameters (the lesson of the earlier studies: settings fitted with many free parameters on
a few problems did not transfer). A setting is (T, grid power q, order, solver variant); no free
grids. The search scores, at each anchor NFE, every candidate of `candidates(nfe)` on the tune
split and keeps the one with the least J = mean_p log r_p + LOSS_WEIGHT mean_p max(log r_p, 0)
(a loss against the published setting costs LOSS_WEIGHT + 1 times a gain of the same size), or
the published setting itself (J = 0) when no candidate has J < 0.
Between anchors the defaults interpolate log(1 - T) linearly in log NFE and take q, order and
variant from the nearer anchor (in log NFE). The validate split (every NFE 1..50) and the three
trained models of studies/trained_models.py (every NFE 3..50) then score each pick and its
alternates (`alternates`: the same T, q and order with the other corrector variant; the pick at
the published hop time); per NFE `studies.make_defaults` keeps the first that is not worse than
the published setting there (validate: median ratio <= 1; trained: every model's ratio <= 1),
else the published setting.

Every stage caches per-problem errors under <out>/cache (rerunning resumes), shows a progress bar
and writes <out>/<stage>.json and <stage>.md.
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

import torch
from tqdm.auto import tqdm

from benchmarks.problems import Problem, problems
from psb_fast.bridge import PhaseBridge
from psb_fast.oracles import ode_solution
from psb_fast.settings import T_END, VARIANTS, Setting, published_setting
from psb_fast.tuning import settings_rmse

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "defaults_study"
#: Anchor NFEs of the search; the defaults file covers NFE 1..MAX_NFE.
ANCHORS = (2, 3, 5, 10, 20, 40)
MAX_NFE = 50
LOSS_WEIGHT = 2.0
#: Problems and prior draws per stage (the test split is opened once, by `test`).
COUNTS = {"search": 60, "validate": 60, "test": 120}
DRAWS = {"search": 128, "validate": 128, "test": 256}
SPLIT = {"search": "tune", "validate": "validate", "test": "test"}
TEST_NFES = (3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50)
TRAINED_FROM = 3  # the trained-model check covers NFE 3..MAX_NFE
#: The real libraries' samplers on the test split (benchmarks/real_peers.py).
PEERS = ROOT / "benchmarks" / "results" / "real_peers_test.json"
QS = (1.0, 1.5, 2.0)
ORDERS = (1, 2, 3)
#: Hop-time candidates: tau = 1 - T = TAU_5 (5 / nfe)^TAU_POWER times these factors.
TAU_5, TAU_POWER = 0.6, 1.2
TAU_FACTORS = (2.0, 1.5, 1.2, 1.0, 0.8, 0.6, 0.45, 0.3)
#: Above this NFE only T and the orders 2, 3 are searched, with the variant and q of the pick at
#: NFE NARROW_ABOVE (cost grows with NFE; the variant and q picks were stable from NFE 5 to 20 in
#: the exploration runs).
NARROW_ABOVE = 20
BRIDGE = PhaseBridge()


def candidates(nfe: int, narrow: Setting | None = None) -> list[Setting]:
    """The search's candidates at one anchor NFE (the published setting is scored separately);
    above NARROW_ABOVE, `narrow` (the pick at NARROW_ABOVE) fixes the variant and q."""
    centre = TAU_5 * (5 / nfe) ** TAU_POWER
    Ts = sorted({round(1 - min(max(centre * f, 0.01), 0.9), 4) for f in TAU_FACTORS})
    variants, orders, qs = VARIANTS, ORDERS, QS
    if nfe > NARROW_ABOVE:
        if narrow is None:
            raise ValueError(f"candidates above NFE {NARROW_ABOVE} need the pick there (narrow)")
        variants, orders, qs = (narrow.variant,), (2, 3), (narrow.q,)
    out = {Setting(T, q, order, None, v).effective(nfe) for v in variants for order in orders
           for q in qs for T in Ts}
    return sorted(out)


def key(setting: Setting) -> str:
    return json.dumps(setting.to_json(), sort_keys=True)


class Scorer:
    """RMSE of settings on one problem, cached in <out>/cache/<split>-<seed>-<draws>.json."""

    def __init__(self, problem: Problem, draws: int, cache_dir: Path) -> None:
        self.problem, self.draws = problem, draws
        self.path = cache_dir / f"{problem.split}-{problem.seed}-{draws}.json"
        self.cache: dict[str, dict[str, float]] = (
            json.loads(self.path.read_text()) if self.path.is_file() else {})
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m0, target): prior draws seeded by the problem's seed and the exact flow's endpoint."""
        if self._batch is None:
            mix = self.problem.mixture
            gen = torch.Generator().manual_seed(self.problem.seed)
            m0 = BRIDGE.sample_prior((self.draws, mix.dim), generator=gen).double()
            m_end = ode_solution(mix, BRIDGE, m0, 1e-5, T_END, rtol=1e-9, atol=1e-9)
            self._batch = (m0, mix.posterior_mean(BRIDGE, m_end, T_END))
        return self._batch

    def errors(self, nfe: int, settings: Sequence[Setting]) -> list[float]:
        cached = self.cache.setdefault(str(nfe), {})
        todo = [s for s in dict.fromkeys(settings) if key(s) not in cached]
        if todo:
            m0, target = self.batch()
            errs = settings_rmse(self.problem.mixture.as_model(BRIDGE), BRIDGE, m0, target, nfe, todo,
                                 max_rows=8192)
            cached.update({key(s): float(e) for s, e in zip(todo, errs, strict=True)})
            self.path.write_text(json.dumps(self.cache))
        return [cached[key(s)] for s in settings]


def _scorers(stage: str, out: Path, count: int | None, draws: int | None) -> list[Scorer]:
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    probs = problems(SPLIT[stage], count or COUNTS[stage])
    return [Scorer(p, draws or DRAWS[stage], cache) for p in probs]


def _summary(ratios: Sequence[float]) -> dict:
    logs = [math.log(r) for r in ratios]
    return {"median": statistics.median(ratios), "worst": max(ratios),
            "losses": sum(r > 1 for r in ratios),
            "J": statistics.fmean(logs) + LOSS_WEIGHT * statistics.fmean(max(v, 0.0) for v in logs)}


# ----------------------------------------------------------------------------- stages


def search(out: Path, count: int | None = None, draws: int | None = None) -> dict:
    """Score every candidate at every anchor on the tune split; pick the least J per anchor."""
    scorers = _scorers("search", out, count, draws)
    labels = [s.problem.label for s in scorers]
    result = {"split": "tune", "problems": labels, "seeds": [s.problem.seed for s in scorers],
              "draws": scorers[0].draws, "loss_weight": LOSS_WEIGHT, "anchors": {}}
    narrow = None
    with tqdm(total=len(ANCHORS) * len(scorers), unit="problem-NFE", desc="search") as bar:
        for nfe in ANCHORS:
            pub, cands = published_setting(nfe), candidates(nfe, narrow)
            ratios = []  # [problem][candidate]
            for scorer in scorers:
                errs = scorer.errors(nfe, [pub] + cands)
                ratios.append([e / errs[0] for e in errs[1:]])
                bar.update()
            scores = [_summary([row[c] for row in ratios]) for c in range(len(cands))]
            best = min(range(len(cands)), key=lambda c: scores[c]["J"])
            ranked = sorted(range(len(cands)), key=lambda c: scores[c]["J"])[:10]
            pick, pick_scores = cands[best], scores[best]
            pick_ratios = dict(zip(labels, (row[best] for row in ratios), strict=True))
            if pick_scores["J"] > 0:  # no candidate beats the published setting on balance
                pick, pick_scores = pub, _summary([1.0] * len(labels))
                pick_ratios = dict.fromkeys(labels, 1.0)
            if nfe == NARROW_ABOVE:
                narrow = pick
            result["anchors"][str(nfe)] = {
                "pick": pick.to_json(), "scores": pick_scores, "ratios": pick_ratios,
                "runners_up": [{"setting": cands[c].to_json(), **scores[c]}
                               for c in ranked if cands[c] != pick],
                "candidates": len(cands),
            }
    _write(out, "search", result, _search_table(result))
    return result


def interpolated(anchors: dict[int, Setting], nfe: int) -> Setting:
    """The default at any NFE from the anchors' picks (module docstring)."""
    nfes = sorted(anchors)
    if nfe <= nfes[0]:
        return anchors[nfes[0]].effective(nfe)
    if nfe >= nfes[-1]:
        return anchors[nfes[-1]].effective(nfe)
    lo = max(n for n in nfes if n <= nfe)
    hi = min(n for n in nfes if n >= nfe)
    if lo == hi:
        return anchors[lo]
    w = (math.log(nfe) - math.log(lo)) / (math.log(hi) - math.log(lo))
    log_tau = (1 - w) * math.log1p(-anchors[lo].T) + w * math.log1p(-anchors[hi].T)
    near = anchors[lo] if w < 0.5 else anchors[hi]
    return near.replace(T=round(-math.expm1(log_tau), 5)).effective(nfe)


def picks(out: Path) -> dict[int, Setting]:
    """The search's picks at the anchors, interpolated to NFE 1..MAX_NFE."""
    found = json.loads((out / "search.json").read_text())
    anchors = {int(n): Setting.from_json(rec["pick"]) for n, rec in found["anchors"].items()}
    return {nfe: interpolated(anchors, nfe) for nfe in range(1, MAX_NFE + 1)}


def alternates(setting: Setting, nfe: int) -> list[Setting]:
    """The pick and its alternates, in order of preference: the same T, q and order with the other
    corrector variant, then the pick at the published hop time (trained networks are least
    accurate near t = 1, where the exact-drift search puts T at high NFE)."""
    other = {"multistep-corrector": "data-corrector", "data-corrector": "multistep-corrector"}
    out = [setting]
    if setting.variant in other:
        out.append(setting.replace(variant=other[setting.variant]))
    at_published_T = setting.replace(T=published_setting(nfe).T)
    if setting.variant != VARIANTS[0] and at_published_T not in out:
        out.append(at_published_T)
    return out


def check(stage: str, out: Path, settings: dict[int, Sequence[Setting]], count: int | None = None,
          draws: int | None = None) -> dict:
    """Ratios to the published setting of the settings per NFE (first: the pick) on the split."""
    scorers = _scorers(stage, out, count, draws)
    result = {"split": SPLIT[stage], "problems": [s.problem.label for s in scorers],
              "seeds": [s.problem.seed for s in scorers], "draws": scorers[0].draws, "nfes": {}}
    with tqdm(total=len(settings) * len(scorers), unit="problem-NFE", desc=stage) as bar:
        for nfe, cands in settings.items():
            pub = published_setting(nfe)
            ratios = [{} for _ in cands]
            published_rmse = {}
            for scorer in scorers:
                e_pub, *errs = scorer.errors(nfe, [pub, *cands])
                published_rmse[scorer.problem.label] = e_pub
                for r, e in zip(ratios, errs, strict=True):
                    r[scorer.problem.label] = e / e_pub
                bar.update()
            result["nfes"][str(nfe)] = {
                "published_rmse": published_rmse,
                "settings": [{"setting": c.to_json(), **_summary(list(r.values())), "ratios": r}
                             for c, r in zip(cands, ratios, strict=True)],
            }
    _write(out, stage, result, _check_table(stage, result))
    return result


def trained(out: Path, settings: dict[int, Sequence[Setting]]) -> dict:
    """Ratios to the published setting of the settings per NFE on the trained models of
    studies/trained_models.py (trained and their targets built on first use, cached)."""
    from studies import trained_models

    result = {"models": {}, "nfes": {}}
    for name in trained_models.MODELS:
        tm = trained_models.model(name)
        result["models"][name] = {"architecture": tm.architecture, "reference": tm.convergence}
    with tqdm(total=len(settings) * len(trained_models.MODELS), unit="model-NFE", desc="trained") as bar:
        for nfe, cands in settings.items():
            rows = [{"setting": c.to_json(), "ratios": {}} for c in cands]
            for name in trained_models.MODELS:
                scored = [published_setting(nfe), *cands]
                e_pub, *errs = trained_models.candidate_errors(name, nfe, scored).tolist()
                for row, e in zip(rows, errs, strict=True):
                    row["ratios"][name] = e / e_pub
                bar.update()
            for row in rows:
                row["worst"] = max(row["ratios"].values())
            result["nfes"][str(nfe)] = {"settings": rows}
    lines = ["# Defaults vs published on trained models", "", "Command: `python -m studies.defaults_study "
             "trained`. Ratio = RMSE / RMSE of the published setting against each model's own converged "
             "solution; pick, then its alternate.", "",
             "| NFE | setting | " + " | ".join(trained_models.MODELS) + " |",
             "|---:|---|" + "---:|" * len(trained_models.MODELS)]
    for nfe, rec in result["nfes"].items():
        for row in rec["settings"]:
            cells = " | ".join(f"{row['ratios'][m]:.3f}" for m in trained_models.MODELS)
            lines.append(f"| {nfe} | {_label(row['setting'])} | {cells} |")
    _write(out, "trained", result, "\n".join(lines) + "\n")
    return result


def versus_peers(result: dict, peers: dict) -> dict:
    """Per NFE both have: medians over the test problems of the defaults' and the published
    setting's RMSE, of the best peer per problem (the best of every library configuration, picked
    per problem) and of the best single peer configuration (the one with the least median), and
    the median per-problem ratio of the defaults to each. Each method against its own exact flow."""
    out = {}
    by_label = {rec["label"]: rec for rec in peers["problems"].values()}
    for nfe, rec in result["nfes"].items():
        if not all(label in by_label and nfe in by_label[label]["nfe"] for label in rec["published_rmse"]):
            continue
        labels = list(rec["published_rmse"])
        ours = [rec["settings"][0]["ratios"][k] * rec["published_rmse"][k] for k in labels]
        best = [by_label[k]["nfe"][nfe]["best"]["error"] for k in labels]
        configs = by_label[labels[0]]["nfe"][nfe]["configs"]
        single = min(configs, key=lambda c: statistics.median(
            by_label[k]["nfe"][nfe]["configs"][c]["error"] for k in labels))
        single_err = [by_label[k]["nfe"][nfe]["configs"][single]["error"] for k in labels]
        out[nfe] = {
            "problems": len(labels), "defaults_median": statistics.median(ours),
            "published_median": statistics.median(rec["published_rmse"].values()),
            "best_peer_per_problem_median": statistics.median(best),
            "best_single_peer": single, "best_single_peer_median": statistics.median(single_err),
            "ratio_to_best_peer_per_problem_median": statistics.median(
                o / b for o, b in zip(ours, best, strict=True)),
            "ratio_to_best_single_peer_median": statistics.median(
                o / b for o, b in zip(ours, single_err, strict=True)),
            "problems_ahead_of_best_peer": sum(o <= b for o, b in zip(ours, best, strict=True)),
        }
    return out


def _peers_table(rows: dict) -> str:
    lines = ["", "## Against the real libraries (benchmarks/results/real_peers_test.json)", "",
             "Median RMSE over the test problems, each method against its own exact flow; 'best per "
             "problem' picks the best of every library configuration separately for each problem.", "",
             "| NFE | defaults | published | best peer per problem | best single peer | defaults / best per "
             "problem (median ratio) | defaults / best single (median ratio) | problems ahead of best |",
             "|---:|---:|---:|---:|---|---:|---:|---:|"]
    for nfe, r in rows.items():
        lines.append(f"| {nfe} | {r['defaults_median']:.4f} | {r['published_median']:.4f} | "
                     f"{r['best_peer_per_problem_median']:.4f} | {r['best_single_peer']} "
                     f"{r['best_single_peer_median']:.4f} | "
                     f"{r['ratio_to_best_peer_per_problem_median']:.2f} | "
                     f"{r['ratio_to_best_single_peer_median']:.2f} | {r['problems_ahead_of_best_peer']}/"
                     f"{r['problems']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- output


def _write(out: Path, stage: str, result: dict, table: str) -> None:
    result = {"command": f"python -m studies.defaults_study {stage}", **result}
    (out / f"{stage}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stage}.md").write_text(table)


def _label(s: dict) -> str:
    return f"{s['variant']}, order {s['order']}, q {s['q']:g}, T {s['T']:.4g}"


def _search_table(result: dict) -> str:
    lines = [f"# Defaults search on the tune split ({len(result['problems'])} problems, "
             f"{result['draws']} draws)",
             "", "Command: `python -m studies.defaults_study search`. Ratio = RMSE / RMSE of the published "
             f"setting; J = mean log ratio + {LOSS_WEIGHT:g} mean max(log ratio, 0).", "",
             "| NFE | pick | J | median ratio | worst ratio | losses | candidates |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for nfe, rec in result["anchors"].items():
        s = rec["scores"]
        lines.append(f"| {nfe} | {_label(rec['pick'])} | {s['J']:.3f} | {s['median']:.3f} | {s['worst']:.2f} "
                     f"| {s['losses']} | {rec['candidates']} |")
    return "\n".join(lines) + "\n"


def _check_table(stage: str, result: dict) -> str:
    lines = [f"# Settings vs published on the {result['split']} split ({len(result['problems'])} problems, "
             f"{result['draws']} draws)", "", f"Command: `python -m studies.defaults_study {stage}`. Ratio = "
             "RMSE / RMSE of the published setting against the exact flow; losses = problems with ratio > 1.",
             "", "| NFE | setting | median ratio | worst ratio | losses |", "|---:|---|---:|---:|---:|"]
    for nfe, rec in result["nfes"].items():
        for row in rec["settings"]:
            lines.append(f"| {nfe} | {_label(row['setting'])} | {row['median']:.3f} | {row['worst']:.2f} "
                         f"| {row['losses']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("search", "validate", "trained", "test"))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--count", type=int, default=None, help="problems (default: COUNTS[stage])")
    parser.add_argument("--draws", type=int, default=None,
                        help="prior draws per problem (default: DRAWS[stage])")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if args.stage == "search":
        search(args.out, args.count, args.draws)
    elif args.stage == "validate":
        settings = {n: alternates(s, n) for n, s in picks(args.out).items()}
        check("validate", args.out, settings, args.count, args.draws)
    elif args.stage == "trained":
        trained(args.out, {n: alternates(s, n) for n, s in picks(args.out).items() if n >= TRAINED_FROM})
    else:
        from psb_fast.defaults import default_setting

        settings = {n: [default_setting(n)] for n in TEST_NFES}
        result = check("test", args.out, settings, args.count, args.draws)
        if PEERS.is_file():
            result["versus_peers"] = versus_peers(result, json.loads(PEERS.read_text()))
            table = _check_table("test", result) + _peers_table(result["versus_peers"])
            _write(args.out, "test", result, table)
        else:
            print(f"{PEERS} is missing: run `python -m benchmarks.real_peers --split test` for the peer "
                  "comparison", file=sys.stderr)
    print(f"{args.stage}: {time.time() - start:.0f} s; results in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
