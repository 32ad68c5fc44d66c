"""Joint search of sampler defaults: mixtures and trained models scored together, per NFE.

    python -m studies.tuning_joint --nfes 5 10 12 15 20     # search, report -> tuning_joint.json
    python -m studies.make_defaults                         # then: the defaults file from all results

Run from the repository root (studies/ is a plain folder, not installed; `-m` puts the root on
sys.path, so `from studies import tuning_trained` works).

Why. The mixture search (tuning_study.py) optimizes on exact drifts and the robustness stage
(tuning_trained.py) can only keep or reject what it found: at NFE 20 the mixture optimum (order 3,
T 0.831) lost up to 2.6x on trained models (plausibly because a trained network's hop at an early
T lands farther from its own late-T solution than an exact drift's does). This script searches with
both kinds of problem in the objective, so the search itself avoids such settings.

Problems: the robustness stage's (tuning_trained.py): the study's four tuning mixtures on their
confirm batch (B = 4096, seed 3, exact targets) and the five trained models (B = 2048, seed 5,
NFE-200 targets). Each batch is split in halves: the search sees the first half of every batch
("search rows"), the second half ("check rows") only judges the result.

Objective, per setting, from log-ratios l_p = log(RMSE_p / RMSE_p(published)) on the search rows:
    J = mean_p l_p (all nine) + max_{mixtures} l_p + 100 * relu(max_{trained} l_p - log 0.9)
so the worst mixture is pushed down (the acceptance asks for every held-out mixture) while every
trained model must stay at least 10 % better than published.

Per NFE: (1) a sweep of the power-q grids over TS x QS x solver orders (--orders, default 2) and
the default before this search (the mixture search's pick as the trained-model check left it:
`make_defaults.compose` of tuning.json and tuning_trained.json);
(2) per solver order, a compass search of T and the free grid (`psb_fast.tuning.optimize_grid`)
from that order's best sweep setting; (3) the pick is the setting with the lowest J on the check
rows among those starts and searched settings.
Why order 2 by default: with --orders 2 3 this search picked order 3 at NFE 10 (T 0.774, free
grid), which beat published on all nine tuning problems (ratios 0.18-0.63) and on every held-out
mixture (worst 0.464), yet lost to the published sampler on the digits UNet (ratio 1.158, `python
-m studies.digits_study --out benchmarks/results/digits --eval-only` with that default); order 3
at NFE 12-31 had already lost on the trained MLPs (tuning_trained.md). A real network's errors
defeat the order-3 extrapolation, so the defaults keep the published solver order.

Rule of `python -m studies.make_defaults` (the robustness stage's, on the full batches): a result
("admissible" in tuning_joint.json) replaces the default only if its ratio to published is <= 1 on
all nine problems; otherwise the entry is unchanged.
Afterwards: `python -m studies.tuning_study --evaluate-only` (held-out mixtures) and
`python -m studies.digits_study --out benchmarks/results/digits --eval-only` (held-out model).
Scores are cached in <out>/cache/trained/errors.json, shared with tuning_trained.py.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from psb_fast.defaults import default_setting
from psb_fast.settings import Setting, published_setting
from psb_fast.tuning import optimize_grid
from studies import make_defaults
from studies import tuning_trained as robust

ROOT = Path(__file__).resolve().parents[1]

NFES = (5, 10, 12, 15, 20)
TS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.83, 0.86, 0.88, 0.9, 0.92, 0.94, 0.96)
QS = (1.25, 1.5, 2.0)
ORDERS = (2,)
MIXTURE_BATCHES = {"confirm": 4096}
GUARD_WEIGHT, GUARD_MARGIN = 100.0, 0.9
GRID_ITERS = 12


def joint_objective(log_ratios: torch.Tensor, is_trained: torch.Tensor) -> torch.Tensor:
    """J [C] from log-ratios [P, C] to published and a [P] bool mask of the trained problems."""
    mix, trained = log_ratios[~is_trained], log_ratios[is_trained]
    J = log_ratios.mean(0) + mix.max(0).values
    if len(trained):
        J = J + GUARD_WEIGHT * torch.relu(trained.max(0).values - math.log(GUARD_MARGIN))
    return J


class Scorer:
    """J of settings at one NFE on one set of problem views (all cached in `cache`)."""

    def __init__(self, views: Sequence, is_trained: torch.Tensor, cache: robust.ErrorCache, nfe: int):
        self.views, self.is_trained, self.cache, self.nfe = views, is_trained, cache, nfe
        self.published = published_setting(nfe).effective(nfe)

    def ratios(self, settings: Sequence) -> torch.Tensor:
        """RMSE ratio to published [P, C] (settings with the order lowered as in `Setting.effective`)."""
        settings = [Setting.coerce(s).effective(self.nfe) for s in settings]
        errs = torch.stack([self.cache.errors(v, self.nfe, [self.published, *settings]) for v in self.views])
        return errs[:, 1:] / errs[:, :1]

    def __call__(self, settings: Sequence) -> torch.Tensor:
        return joint_objective(self.ratios(settings).log(), self.is_trained)


def search_nfe(problems: Sequence, is_trained: torch.Tensor, sizes: Sequence[int], cache: robust.ErrorCache,
               nfe: int, orders: Sequence[int] = ORDERS, progress: bool = True, start: Setting | None = None
               ) -> dict:
    """Sweep, compass search and check at one NFE (module docstring); returns the record (settings
    in their tuple form, as in the JSON report). start: the default before this search (a sweep
    candidate; None: the package default)."""
    halves = [(robust.RowsView(p, slice(0, n // 2)), robust.RowsView(p, slice(n // 2, n)))
              for p, n in zip(problems, sizes, strict=True)]
    search = Scorer([h[0] for h in halves], is_trained, cache, nfe)
    check = Scorer([h[1] for h in halves], is_trained, cache, nfe)
    start = default_setting(nfe) if start is None else Setting.coerce(start)
    powers = [Setting(T, q, o).effective(nfe) for T in TS for q in QS for o in orders]
    sweep = list(dict.fromkeys([start.effective(nfe), *powers]))
    J_sweep = search(sweep)
    runs, pairs = [], []
    for order in sorted({s.order for s in sweep}):  # one compass search from the best sweep setting per order
        i = min((k for k, s in enumerate(sweep) if s.order == order), key=lambda k: float(J_sweep[k]))
        free, J_free, iters = optimize_grid(search, nfe, sweep[i], max_iter=GRID_ITERS)
        pairs.append({"start": sweep[i], "free": free.effective(nfe)})
        runs.append({"start": sweep[i].as_tuple(), "free": pairs[-1]["free"].as_tuple(), "iterations": iters,
                     "J_search": {"start": float(J_sweep[i]), "free": J_free}})
        if progress:
            print(f"NFE {nfe}, order {order}: start {sweep[i].label} J {float(J_sweep[i]):.3f} -> searched "
                  f"{pairs[-1]['free'].label} J {J_free:.3f}", flush=True)
    finalists = list(dict.fromkeys(s for pair in pairs for s in (pair["start"], pair["free"])))
    J_check = check(finalists)
    for r, pair in zip(runs, pairs, strict=True):
        r["J_check"] = {k: float(J_check[finalists.index(pair[k])]) for k in ("start", "free")}
    pick = finalists[int(J_check.argmin())]
    full = Scorer(problems, is_trained, cache, nfe).ratios([pick])[:, 0]
    names = [p.name for p in problems]
    record = {"runs": runs, "setting": pick.as_tuple(),
              "ratios": dict(zip(names, full.tolist(), strict=True)), "admissible": bool((full <= 1.0).all())}
    if progress:
        print(f"NFE {nfe}: pick {pick.label}, admissible {record['admissible']}, ratios "
              + " ".join(f"{n} {r:.2f}" for n, r in record["ratios"].items()), flush=True)
    return record


def markdown(report: dict) -> str:
    names = report["problems"]
    lines = robust.markdown_head("Joint search of the sampler defaults: mixtures and trained models together",
                                 report) + [
        f"Ratios = RMSE / RMSE of the published setting on the full batches of the {len(names)} tuning",
        "problems (studies/tuning_joint.py docstring). `python -m studies.make_defaults` takes a pick",
        "only if it is admissible (ratio <= 1 on all). Scores are cached (cache/trained/errors.json);",
        "uncached, the search took 1435 s (NFE 20: 614 s; 15: 372 s; 12: 211 s; 5 and 10: 239 s; in pairs",
        "side by side).",
        "", "| NFE | T | q | order | free grid | admissible | " + " | ".join(names) + " |",
        "|---:|---:|---:|---:|:---:|:---:|" + "---:|" * len(names),
    ]
    for nfe, r in report["table"].items():
        s = r["setting"]
        ratios = " | ".join(f"{r['ratios'][n]:.3f}" for n in names)
        lines.append(f"| {nfe} | {s[0]:.4f} | {s[1]:g} | {s[2]} | {'yes' if len(s) > 3 else 'no'} | "
                     f"{'yes' if r['admissible'] else 'no'} | {ratios} |")
    lines += ["", "Searches (J: the objective, lower is better; search rows / check rows):", "",
              "| NFE | order | start (T, q) | J start | searched (T, q) | J searched | iterations |",
              "|---:|---:|---|---:|---|---:|---:|"]
    for nfe, r in report["table"].items():
        for run in r["runs"]:
            st, fr, Js, Jc = run["start"], run["free"], run["J_search"], run["J_check"]
            lines.append(f"| {nfe} | {st[2]} | {st[0]:.4f}, {st[1]:g} | {Js['start']:.3f} / "
                         f"{Jc['start']:.3f} | {fr[0]:.4f}, {fr[1]:g} | {Js['free']:.3f} / "
                         f"{Jc['free']:.3f} | {run['iterations']} |")
    lines += ["", "Grid fractions of the picks (power-q coordinate, psb_fast/defaults.json):", ""]
    lines += [f"- NFE {nfe}: " + ", ".join(f"{f:g}" for f in r["setting"][3])
              for nfe, r in report["table"].items() if len(r["setting"]) > 3]
    return "\n".join(lines) + "\n"


def previous_defaults(out: Path) -> Mapping[int, Setting]:
    """The defaults before this search: the mixture search's picks (<out>/tuning.json) with the
    trained-model check's replacements (<out>/tuning_trained.json, if present)."""
    try:
        results = make_defaults.read_results(out)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    return {n: e["setting"] for n, e in make_defaults.compose(results, stages=("mixture", "trained")).items()}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output folder")
    ap.add_argument("--nfes", type=int, nargs="+", default=list(NFES),
                    help="NFEs to search (default 5 10 12 15 20)")
    ap.add_argument("--orders", type=int, nargs="+", choices=(1, 2, 3), default=None,
                    help=f"solver orders to search (default {ORDERS})")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    orders = tuple(sorted(set(args.orders))) if args.orders else ORDERS
    out = Path(args.out)
    before = previous_defaults(out)
    bad = [n for n in args.nfes if n not in before or n < 3]
    if bad:
        raise SystemExit(f"--nfes: {bad} not in 3..{max(before)} (a free grid needs an interior node)")
    torch.set_num_threads(args.threads)
    start = time.time()
    mixtures, trained, cache = robust.tuning_problems(out, MIXTURE_BATCHES)
    problems = mixtures + trained
    sizes = [sum(MIXTURE_BATCHES.values())] * len(mixtures) + [robust.B_TRAINED] * len(trained)
    is_trained = torch.tensor([False] * len(mixtures) + [True] * len(trained))
    table = {}
    for nfe in tqdm(sorted(set(args.nfes)), desc="joint search", unit="NFE"):
        table[nfe] = search_nfe(problems, is_trained, sizes, cache, nfe, orders, start=before[nfe])
    command = "python -m studies.tuning_joint --nfes " + " ".join(map(str, sorted(set(args.nfes))))
    command += (" --orders " + " ".join(map(str, args.orders))) if args.orders else ""
    report = {**robust.report_head(command, start, args.threads, problems),
              "table": {str(n): r for n, r in table.items()}}
    (out / "tuning_joint.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "tuning_joint.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
