"""Bits/dim through the phase-space probability flow (psb_fast.likelihood), beside simple baselines.

    python benchmarks/bench_likelihood.py --runs runs/toy [runs/digits] --out benchmarks/results/likelihood

1. Exact drift (psb_fast.oracles) of the 3x3 grid mixture (2-D) and a random 16-D mixture: the
   bound's nll against the data's own -log p(x1), max error per dimension, NFE and seconds, at
   rtol = atol in {1e-5, 1e-8} (T_end = 0.99).
2. Each trained run: bits/dim on its held-out split (`psb_fast.likelihood.evaluate_run`, defaults:
   T_end 0.99, rtol = atol = 1e-5, exact trace up to 16 dims), wall time and NFE; for 2-D toy sets
   beside a Gaussian and a Gaussian KDE fitted on the train split (KDE bandwidth chosen on a
   validation draw of the train stream), and for "gmm-grid" the data's own density.
Writes OUT/likelihood.json and OUT/likelihood_table.md; one thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from psb_fast import PhaseBridge, likelihood
from psb_fast.data import load_data
from psb_fast.likelihood import evaluate_run
from psb_fast.oracles import GaussianMixture, mixture_2d_grid, mixture_random
from psb_fast.pretrained import load_trained

LN2 = math.log(2)


def mixture_nll(mix: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """-log p(x) of an isotropic mixture, [B] nats."""
    var = mix.stds**2
    sq = ((x.double()[:, None, :] - mix.means[None]) ** 2).sum(-1)
    logits = torch.log(mix.weights) - 0.5 * sq / var - 0.5 * mix.dim * torch.log(2 * math.pi * var)
    return -torch.logsumexp(logits, 1)


def exact_drift_rows(n: int) -> list[dict]:
    bridge = PhaseBridge()
    rows = []
    problems = (("grid 3x3 (2-D)", mixture_2d_grid()), ("random K=4 (16-D)", mixture_random(16, 4, seed=3)))
    for name, mix in problems:
        x1 = mix.sample(n, torch.Generator().manual_seed(0))
        truth = mixture_nll(mix, x1)
        for tol in (1e-5, 1e-8):
            start = time.perf_counter()
            r = likelihood(mix.as_model(bridge), bridge, x1, rtol=tol, atol=tol)
            rows.append({"problem": name, "tol": tol, "nfe": r.nfe, "seconds": time.perf_counter() - start,
                         "max_err_per_dim": ((r.nll - truth) / mix.dim).abs().max().item(),
                         "bpd": r.bpd.mean().item(),
                         "true_bpd": (truth.mean() / (mix.dim * LN2)).item()})
            print(rows[-1], flush=True)
    return rows


def baselines(spec: str, test: torch.Tensor, seed: int) -> dict:
    """bits/dim of a Gaussian and a KDE fitted on the train stream (toy sets), and the true density."""
    from sklearn.neighbors import KernelDensity

    train, _ = load_data(spec, split="train", seed=seed).all(5000)
    valid = train[4000:].double().numpy()
    train = train[:4000].double()
    x = test.double()
    mean, cov = train.mean(0), torch.cov(train.T)
    gauss = torch.distributions.MultivariateNormal(mean, cov)
    out = {"gaussian": (-gauss.log_prob(x).mean() / (2 * LN2)).item()}
    best = None
    for h in (0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.2):
        score = KernelDensity(bandwidth=h).fit(train.numpy()).score_samples(valid).mean()
        best = (score, h) if best is None or score > best[0] else best
    kde = KernelDensity(bandwidth=best[1]).fit(train.numpy())
    out["kde"] = float(-np.mean(kde.score_samples(x.numpy())) / (2 * LN2))
    out["kde_bandwidth"] = best[1]
    if spec == "gmm-grid":
        out["true_density"] = (mixture_nll(mixture_2d_grid(), x).mean() / (2 * LN2)).item()
    return out


def run_row(run: str, out: Path, seed: int) -> dict:
    trained = load_trained(run)
    start = time.perf_counter()
    summary = evaluate_run(run, out / Path(run).name, seed=seed, progress=False)
    keys = ("bpd", "bpd_stderr", "n", "dims", "nfe_mean", "seconds", "exact_trace")
    row = {"run": Path(run).name, "data": trained.config.data, "step": trained.step,
           "wall_seconds": time.perf_counter() - start, **{k: summary[k] for k in keys}}
    if trained.x_shape == (2,):
        test, _ = load_data(trained.config.data, split="test", seed=seed).all(summary["n"])
        row.update(baselines(trained.config.data, test, seed))
    print(row, flush=True)
    return row


def table(exact: list[dict], runs: list[dict]) -> str:
    lines = ["| exact drift | tol | NFE | seconds | max error of nll vs -log p (nats/dim) | bits/dim | "
             "true bits/dim |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['problem']} | {r['tol']:g} | {r['nfe']} | {r['seconds']:.1f} | "
              f"{r['max_err_per_dim']:.1e} | {r['bpd']:.4f} | {r['true_bpd']:.4f} |" for r in exact]
    lines += ["", "| run | data | held-out points | bits/dim (model) | Gaussian | KDE | true density | NFE | "
              "seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        cells = [f"{r[k]:.3f}" if k in r else "-" for k in ("gaussian", "kde", "true_density")]
        lines.append(f"| {r['run']} (step {r['step']}) | {r['data']} | {r['n']} | {r['bpd']:.3f} +- "
                     f"{r['bpd_stderr']:.3f} | {' | '.join(cells)} | {r['nfe_mean']:.0f} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", default=[], help="training run folders (checkpoint.pt inside)")
    parser.add_argument("--out", default="benchmarks/results/likelihood", help="output folder")
    parser.add_argument("--n-exact", type=int, default=64, help="points per exact-drift problem")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out draws and the estimator")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exact = exact_drift_rows(args.n_exact)
    runs = [run_row(run, out, args.seed) for run in args.runs]
    (out / "likelihood.json").write_text(json.dumps({"exact_drift": exact, "runs": runs}, indent=1))
    (out / "likelihood_table.md").write_text(table(exact, runs))
    print(table(exact, runs))


if __name__ == "__main__":
    main()
