"""NFE vs quality against peer samplers, every method driven by its own exact Gaussian-mixture drift.

    python -m psb_fast.benchmarks.bench_quality [--quick] --out benchmarks/results

Data: two mixtures held out of the tuning study (studies/tuning_study.py), grid4x4 =
mixture_2d_grid(n=4, spacing=0.9, std=0.1) and rand16d_s12 = mixture_random(dim=16, k=6, seed=12).
Every method draws B samples from its own prior and calls its exact network target (AGM:
GaussianMixture.as_model; peers: psb_fast.benchmarks.peers), so only dynamics and solver differ.

Methods: AGM probability-flow ODE (exponential multistep, hop) with the published settings
(T = published_T(nfe), order 2, "rev-quad") and with the package defaults (T, order, grid None);
AGM SDE (exact-noise "sde" solver on a mode="SDE" bridge, hop) with the same two settings; VP
diffusion with DDIM and DPM-Solver++(2M); flow matching with Euler and Heun; CLD with SSCS
(schedules and grids: see peers' docstring).

Metrics, per seed s (own prior draws, fresh data, SDE noise):
- pathwise RMSE (ODE samplers only): sqrt(mean of squared differences over batch and dims)
  between the sampler's output and its own probability-flow ODE solved from the same prior draw
  by scipy DOP853 at rtol = atol = 1e-10 (AGM: x1 estimate at 0.999 of the exact flow, as in the
  tuning study; VP: x at 1e-3; flow matching: x at 1; CLD: x at 1e-3);
- SW: psb_fast.metrics.sliced_w2 (p = 2, 200 projections, projection seed 0; POT's directions) between
  the B outputs and B fresh data draws; the floor is SW between two fresh data batches of B.
Reported: mean and standard deviation over the seeds. NFE = model evaluations actually spent
(Heun's last step is Euler, so its NFE is odd: 2 steps - 1 <= the NFE budget).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from psb_fast.benchmarks import peers
from psb_fast.bridge import PhaseBridge
from psb_fast.metrics import sliced_w2
from psb_fast.oracles import GaussianMixture, mixture_2d_grid, mixture_random, ode_solution
from psb_fast.sampler import PhaseSampler
from psb_fast.settings import T_END, published_setting  # T_END: AGM reference output time (0.999)

NFES = (3, 5, 10, 20, 50)
MIXTURES: dict[str, Callable[[], GaussianMixture]] = {
    "grid4x4": lambda: mixture_2d_grid(n=4, spacing=0.9, std=0.1),
    "rand16d_s12": lambda: mixture_random(dim=16, k=6, seed=12),
}
SETTINGS = {  # batch size and number of seeds
    "quick": {"batch": 256, "seeds": (0, 1)},
    "full": {"batch": 1024, "seeds": (0, 1, 2, 3, 4)},
}
RTOL = 1e-10
SW_PROJECTIONS = 200
SW_SEED = 0
T0 = 1e-5


@dataclass(frozen=True)
class Method:
    """name; family: which prior/reference it uses ("agm", "vp", "fm", "cld"); pathwise: ODE sampler."""

    name: str
    family: str
    pathwise: bool
    run: Callable[[dict, torch.Tensor, int, int], tuple[torch.Tensor, int]]


def _agm(mode: str, published: bool):
    solver = "ode" if mode == "probODE" else "sde"

    def run(ctx: dict, prior: torch.Tensor, nfe: int, seed: int) -> tuple[torch.Tensor, int]:
        # SDE solvers have only the published family; "ode" takes the defaults unless published
        setting = published_setting(nfe) if published and solver == "ode" else None
        sampler = PhaseSampler(ctx["bridges"][mode], nfe, setting, solver=solver, backend="cpu")
        x = sampler.sample(ctx["models"][mode], prior.float(), seed=seed if solver != "ode" else None)
        ctx["resolved"][(sampler.solver, published, nfe)] = {
            "T": sampler.T, "order": sampler.order, "grid": sampler.grid_kind
        }
        return x.double(), nfe

    return run


def _fixed(fn):
    def run(ctx: dict, prior: torch.Tensor, nfe: int, seed: int) -> tuple[torch.Tensor, int]:
        return fn(ctx, prior, nfe, seed), nfe

    return run


METHODS: tuple[Method, ...] = (
    Method("AGM-ODE published", "agm", True, _agm("probODE", True)),
    Method("AGM-ODE defaults", "agm", True, _agm("probODE", False)),
    Method("AGM-SDE published", "agm_sde", False, _agm("SDE", True)),
    Method("AGM-SDE defaults", "agm_sde", False, _agm("SDE", False)),
    Method("VP DDIM", "vp", True, _fixed(lambda c, p, n, s: peers.ddim(c["vp"], c["schedule"], p, n))),
    Method("VP DPM-Solver++(2M)", "vp", True,
           _fixed(lambda c, p, n, s: peers.dpm_solver_pp_2m(c["vp"], c["schedule"], p, n))),
    Method("FM Euler", "fm", True, _fixed(lambda c, p, n, s: peers.fm_euler(c["fm"], p, n))),
    Method("FM Heun", "fm", True, lambda c, p, n, s: peers.fm_heun(c["fm"], p, n)),
    Method("CLD SSCS", "cld", False, _fixed(
        lambda c, p, n, s: peers.cld_sscs(c["cld_model"], c["cld"], p, n, torch.Generator().manual_seed(s)))),
)


def _context(mix: GaussianMixture) -> dict:
    bridges = {mode: PhaseBridge(mode=mode) for mode in ("probODE", "SDE")}
    schedule, cld = peers.VPSchedule(), peers.CLD()
    return {
        "bridges": bridges,
        "models": {mode: mix.as_model(b) for mode, b in bridges.items()},
        "schedule": schedule, "vp": peers.vp_model(mix, schedule), "fm": peers.fm_model(mix),
        "cld": cld, "cld_model": peers.cld_model(mix, cld), "resolved": {},
    }


def _priors(ctx: dict, n: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Each family's own prior draw, [n, dim] (AGM, CLD: [n, 2 dim] phase states), float64."""
    gen = torch.Generator().manual_seed(1000 + seed)
    m0 = ctx["bridges"]["probODE"].sample_prior((n, dim), generator=gen, dtype=torch.float64)
    return {
        "agm": m0, "agm_sde": m0,
        "vp": torch.randn((n, dim), generator=gen, dtype=torch.float64),
        "fm": torch.randn((n, dim), generator=gen, dtype=torch.float64),
        "cld": ctx["cld"].prior(n, dim, gen),
    }


def _references(ctx: dict, mix: GaussianMixture, priors: dict) -> dict[str, torch.Tensor]:
    """Each ODE family's exact output from the same prior draw (module docstring)."""
    bridge = ctx["bridges"]["probODE"]
    m_ref = ode_solution(mix, bridge, priors["agm"], T0, T_END, rtol=RTOL, atol=RTOL)
    return {
        "agm": bridge.estimate_x1(m_ref, mix.drift(bridge, m_ref, T_END), T_END),
        "vp": peers.vp_ode_solution(ctx["vp"], ctx["schedule"], priors["vp"], RTOL, RTOL),
        "fm": peers.fm_ode_solution(ctx["fm"], priors["fm"], RTOL, RTOL),
    }


def _sw(a: torch.Tensor, b: torch.Tensor) -> float:
    return sliced_w2(a, b, n_projections=SW_PROJECTIONS, seed=SW_SEED)


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def _summary(values: Sequence[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": list(values)}


def run_quality(
    quick: bool,
    out_dir: Path,
    seeds: Sequence[int] | None = None,
    progress: bool = True,
    nfes: Sequence[int] = NFES,
    batch: int | None = None,
    mixtures: Sequence[str] | None = None,
) -> dict:
    """Run the study and write quality_table.md, quality.json and quality_vs_nfe.png into out_dir.

    quick: the small setting (B = 256, seeds 0, 1) instead of B = 1024, seeds 0..4; seeds, nfes,
    batch and mixtures (names in MIXTURES) override it. Returns the JSON's dict: per mixture the
    SW floor and, per method and NFE, "rmse" (None for SDE samplers) and "sw" summaries (mean, std
    and per-seed values, in data units), the NFE used, and the settings.
    """
    setting = SETTINGS["quick" if quick else "full"]
    seeds = tuple(setting["seeds"] if seeds is None else seeds)
    batch = int(setting["batch"] if batch is None else batch)
    mixtures = tuple(MIXTURES if mixtures is None else mixtures)
    if not seeds:
        raise ValueError(f"seeds must be non-empty, got {seeds!r}")
    unknown = [m for m in mixtures if m not in MIXTURES]
    if unknown:
        raise ValueError(f"mixtures must be among {tuple(MIXTURES)}, got {unknown}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in nfes):
        raise ValueError(f"nfes must be ints >= 2, got {tuple(nfes)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        result = {name: _run_mixture(MIXTURES[name](), seeds, batch, tuple(nfes), progress, name)
                  for name in mixtures}
    finally:
        torch.set_num_threads(threads)
    report = {
        "command": "python -m psb_fast.benchmarks.bench_quality" + (" --quick" if quick else ""),
        "quick": quick, "batch": batch, "seeds": list(seeds), "nfes": list(nfes),
        "units": {"rmse": "data units (pathwise, vs own exact ODE)", "sw": "data units (sliced W2)"},
        "reference": {"solver": "scipy DOP853", "rtol": RTOL, "atol": RTOL, "agm_T_ref": T_END},
        "sw": {"n_projections": SW_PROJECTIONS, "projection_seed": SW_SEED, "p": 2},
        "peers": {"vp": vars(peers.VPSchedule()), "cld": {**vars(peers.CLD()), "Gamma": peers.CLD().Gamma}},
        "mixtures": result,
        "seconds": time.perf_counter() - start,
        "platform": platform.platform(), "torch": torch.__version__,
    }
    (out_dir / "quality.json").write_text(json.dumps(report, indent=1))
    (out_dir / "quality_table.md").write_text(render_table(report))
    plot(report, out_dir / "quality_vs_nfe.png")
    return report


def _run_mixture(mix: GaussianMixture, seeds, batch: int, nfes, progress: bool, name: str) -> dict:
    ctx = _context(mix)
    rmse: dict = {(m.name, n): [] for m in METHODS for n in nfes}
    sw: dict = {(m.name, n): [] for m in METHODS for n in nfes}
    used: dict = {}
    floor = []
    for seed in tqdm(seeds, disable=not progress, desc=f"quality {name}"):
        priors = _priors(ctx, batch, mix.dim, seed)
        refs = _references(ctx, mix, priors)
        gen = torch.Generator().manual_seed(2000 + seed)
        data, data2 = mix.sample(batch, gen), mix.sample(batch, gen)
        floor.append(_sw(data, data2))
        for method in METHODS:
            for nfe in nfes:
                x, n_used = method.run(ctx, priors[method.family], nfe, seed)
                used[(method.name, nfe)] = n_used
                sw[(method.name, nfe)].append(_sw(x, data))
                if method.pathwise:
                    rmse[(method.name, nfe)].append(_rmse(x, refs[method.family]))
    methods = {}
    for method in METHODS:
        methods[method.name] = {
            "pathwise": method.pathwise,
            "by_nfe": {
                str(n): {
                    "nfe_used": used[(method.name, n)],
                    "rmse": _summary(rmse[(method.name, n)]) if method.pathwise else None,
                    "sw": _summary(sw[(method.name, n)]),
                }
                for n in nfes
            },
        }
    resolved = {f"{solver} {'published' if pub else 'defaults'} nfe={n}": v
                for (solver, pub, n), v in ctx["resolved"].items()}
    return {"dim": mix.dim, "components": mix.n_components, "sw_floor": _summary(floor),
            "methods": methods, "agm_settings": resolved}


def _fmt(s: dict | None) -> str:
    if s is None:
        return "—"
    return f"{s['mean']:.2e} ± {s['std']:.1e}"


def render_table(report: dict) -> str:
    """The markdown table: per mixture and method, per NFE the RMSE and SW (mean ± std over seeds)."""
    nfes = report["nfes"]
    lines = [
        "# NFE vs quality on exact drifts",
        "",
        f"`{report['command']}`: B = {report['batch']}, seeds {report['seeds']}, mean ± std over seeds.",
        "RMSE: pathwise vs the method's own probability-flow ODE (scipy DOP853, rtol 1e-10), "
        "— for SDE samplers (not defined). SW: sliced Wasserstein-2 to fresh data "
        f"({report['sw']['n_projections']} projections). NFE = evaluations used "
        "(FM Heun: 2 per step, last step Euler, so the NFE in brackets).",
        "",
        "| mixture | method | metric | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in nfes) + " |",
    ]
    for mix_name, mix in report["mixtures"].items():
        for name, method in mix["methods"].items():
            for metric in ("rmse", "sw"):
                if metric == "rmse" and not method["pathwise"]:
                    continue
                cells = []
                for n in nfes:
                    entry = method["by_nfe"][str(n)]
                    used = "" if entry["nfe_used"] == n else f" [{entry['nfe_used']}]"
                    cells.append(_fmt(entry[metric]) + used)
                label = "RMSE" if metric == "rmse" else "SW" + ("" if method["pathwise"] else " (SDE)")
                lines.append(f"| {mix_name} | {name} | {label} | " + " | ".join(cells) + " |")
        floor = _fmt(mix["sw_floor"])
        lines.append(f"| {mix_name} | data vs data (floor) | SW | " + " | ".join(floor for _ in nfes) + " |")
    lines += ["", "Best mean per mixture, metric and NFE (AGM or peer, as measured):", ""]
    for mix_name, mix in report["mixtures"].items():
        for metric in ("rmse", "sw"):
            best = []
            for n in nfes:
                scores = {name: m["by_nfe"][str(n)][metric]["mean"]
                          for name, m in mix["methods"].items() if m["by_nfe"][str(n)][metric] is not None}
                winner = min(scores, key=scores.get)
                best.append(f"NFE {n}: {winner} ({scores[winner]:.2e})")
            lines.append(f"- {mix_name}, {metric.upper()}: " + "; ".join(best))
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Quality vs NFE per method (log-y): rows RMSE and SW, one column per mixture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["mixtures"])
    colors = {m.name: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 8), squeeze=False)
    for col, mix_name in enumerate(names):
        mix = report["mixtures"][mix_name]
        for row, metric in enumerate(("rmse", "sw")):
            ax = axes[row][col]
            for name, method in mix["methods"].items():
                points = [(e["nfe_used"], e[metric]) for e in method["by_nfe"].values() if e[metric]]
                if not points:
                    continue
                style = "-" if name.startswith("AGM") else "--"
                ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points],
                            yerr=[p[1]["std"] for p in points], label=name, linestyle=style,
                            color=colors.get(name), marker="o", markersize=3, capsize=2)
            if metric == "sw":
                ax.axhline(mix["sw_floor"]["mean"], color="k", linestyle=":", label="data vs data")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(report["nfes"], [str(n) for n in report["nfes"]])
            ax.minorticks_off()
            ax.set_xlabel("NFE")
            ax.set_ylabel("pathwise RMSE" if metric == "rmse" else "sliced W2 to data")
            ax.set_title(f"{mix_name}: {'RMSE vs own ODE' if metric == 'rmse' else 'SW to data'}")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    axes[1][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B = 256, 2 seeds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    report = run_quality(args.quick, args.out, seeds=args.seeds, progress=sys.stderr.isatty())
    print((args.out / "quality_table.md").read_text())
    print(f"{report['seconds']:.1f} s; wrote {args.out}/quality_table.md, quality.json, quality_vs_nfe.png")


if __name__ == "__main__":
    main()
