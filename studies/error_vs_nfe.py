"""Error vs NFE (1..50) of the defaults, tuned settings and the published settings: the README's plot.

    python -m studies.error_vs_nfe    # -> benchmarks/results/defaults_study/error_vs_nfe.{json,md,png}

Run from the repository root (studies/ is not installed). Four cases, none of them in the defaults'
fit: two trained models held out of it (studies/trained_models.py: "spiral-mlp", a 2-D MLP, and
"gmm48-mlp", an MLP on a 48-D mixture; error against each model's own converged NFE-1600
solution) and two exact-drift mixtures (a ring of 8 modes and an 8-D mixture of 10 modes; error
against the exact flow's endpoint, DOP853). Pathwise RMSE from fixed prior draws.

- defaults: `psb_fast.defaults.default_setting(nfe)` at every NFE 1..50;
- published: `psb_fast.settings.published_setting(nfe)` at every NFE 1..50;
- tuned: `psb_fast.tune` at TUNED_NFES on TUNE_DRAWS other prior draws (its own target: the
  model's NFE-400 solution, or the exact flow), then scored on the evaluation draws (so the tuned
  numbers are out of sample).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from psb_fast.bridge import PhaseBridge
from psb_fast.defaults import default_setting
from psb_fast.oracles import mixture_2d_ring, mixture_random, ode_solution
from psb_fast.settings import T_END, Setting, published_setting
from psb_fast.tuning import reference_solution, settings_rmse, tune
from studies import trained_models

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "defaults_study"
NFES = tuple(range(1, 51))
TUNED_NFES = (3, 5, 8, 10, 15, 20, 30, 40, 50)
TABLE_NFES = (2, 3, 5, 10, 20, 30, 50)
TRAINED = ("spiral-mlp", "gmm48-mlp")
EXACT_DRAWS, TUNE_DRAWS = 512, 512
T0 = 1e-5


def _cases() -> dict:
    """name -> (model, bridge, m0, target, tune_m0, tune_target or None)."""
    cases = {}
    for name in TRAINED:
        tm = trained_models.model(name)
        x_shape = (tm.m0.shape[1] // 2, *tm.m0.shape[2:])  # m0 is [B, 2C, ...] = [x | v]
        m0_tune = tm.bridge.sample_prior((TUNE_DRAWS, *x_shape), generator=torch.Generator().manual_seed(101),
                                         dtype=tm.m0.dtype)
        cases[name] = (tm.net, tm.bridge, tm.m0, tm.target, m0_tune, None)
    bridge = PhaseBridge()
    for name, mix in (("ring-8 (exact)", mixture_2d_ring(8)), ("8-D, 10 modes "
                                                               "(exact)", mixture_random(8, 10, 8))):
        draws = []
        for seed, n in ((0, EXACT_DRAWS), (101, TUNE_DRAWS)):
            m0 = bridge.sample_prior((n, mix.dim), generator=torch.Generator().manual_seed(seed)).double()
            end = ode_solution(mix, bridge, m0, T0, T_END, rtol=1e-9, atol=1e-9)
            draws.append((m0, mix.posterior_mean(bridge, end, T_END)))
        (m0, target), (m0_tune, target_tune) = draws
        cases[name] = (mix.as_model(bridge), bridge, m0, target, m0_tune, target_tune)
    return cases


def run(out: Path) -> dict:
    result = {"nfes": list(NFES), "tuned_nfes": list(TUNED_NFES), "cases": {}}
    for name, (model, bridge, m0, target, m0_tune, target_tune) in _cases().items():
        start = time.perf_counter()
        with torch.no_grad():
            if target_tune is None:
                target_tune = reference_solution(model, bridge, m0_tune, nfe=400)
            tuned = tune(model, bridge, TUNED_NFES, m0_tune, target=target_tune, progress=False)
            rows = {}
            for nfe in NFES:
                settings = [default_setting(nfe), published_setting(nfe)]
                if nfe in tuned:
                    settings.append(Setting.from_json(tuned[nfe]))
                errs = settings_rmse(model, bridge, m0, target, nfe, settings, T0, 16384).tolist()
                rows[str(nfe)] = {"defaults": errs[0], "published": errs[1]}
                if nfe in tuned:
                    rows[str(nfe)].update(tuned=errs[2], tuned_setting=settings[2].label)
        result["cases"][name] = {"draws": len(m0), "rows": rows, "seconds": time.perf_counter() - start}
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "error_vs_nfe.json").write_text(json.dumps({"command": "python -m studies.error_vs_nfe", **result},
                                                      indent=1) + "\n")
    (out / "error_vs_nfe.md").write_text(table(result))
    plot(result, out / "error_vs_nfe.png")
    return result


def table(result: dict) -> str:
    lines = ["# Error vs NFE: defaults, tuned, published", "", "Command: `python -m studies.error_vs_nfe`. "
             "Pathwise RMSE (trained models: against the model's converged solution; exact: against the "
             "exact flow). Tuned: `psb_fast.tune` on other prior draws, scored here.", "",
             "| case | NFE | defaults | tuned | published | defaults / published "
             "|", "|---|---:|---:|---:|---:|---:|"]
    for name, case in result["cases"].items():
        for n in TABLE_NFES:
            r = case["rows"][str(n)]
            tuned = f"{r['tuned']:.2e}" if "tuned" in r else "-"
            lines.append(f"| {name} | {n} | {r['defaults']:.2e} | {tuned} | {r['published']:.2e} | "
                         f"{r['defaults'] / r['published']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.4), squeeze=False)
    for ax, (name, case) in zip(axes[0], cases.items(), strict=True):
        nfes = [int(n) for n in case["rows"]]
        for key, style in (("defaults", "-"), ("published", "--")):
            ax.plot(nfes, [r[key] for r in case["rows"].values()], style, label=key)
        tuned = [(int(n), r["tuned"]) for n, r in case["rows"].items() if "tuned" in r]
        ax.plot(*zip(*tuned, strict=True), "o", label="tuned")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("NFE")
    axes[0][0].set_ylabel("pathwise RMSE")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args.out)
    print(f"wrote {args.out / 'error_vs_nfe.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
