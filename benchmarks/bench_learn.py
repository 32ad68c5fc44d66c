"""Learned step times vs grid search: defaults, grid-tuned, learned and published at NFE 5/10/20.

    python -m benchmarks.bench_learn                      # both models, NFE 5 10 20
    python -m benchmarks.bench_learn --models demo-toy --nfes 5 10 --jacobian none

Per model: `psb_fast.tune(model, bridge, nfes, m0, learn=Learn(...))` on TUNE_DRAWS prior draws
(seed 2; split inside into tuning, validation and evaluation draws, psb_fast.learn), timed. Then,
on EVAL_DRAWS fresh prior draws (seed 1, never seen by the grid search or the learning), every
setting's pathwise RMSE against the model's own NFE-400 solution (`tuning.reference_solution`)
and the sliced Wasserstein-2 distance of its samples to held-out data (psb_fast.metrics, 200
projections, seed 0); the rows: the package defaults, the grid search's pick, the learned setting (whether or
not tune kept it), the kept one, the published setting. Diagnosis columns: the hop floor, the
RMSE of a 200-NFE path to the same T followed by the hop (what no grid at that T can beat), and
the learning's tuning / validation RMSE from start to its best iterate, and the share of the squared
error carried by the 1% of draws with the largest errors.
Writes <out>/learn.json and <out>/learn.md and prints the table; the time of each tune call is in
both (machine load: os.getloadavg at the start and end).

Models (`MODELS`), trained on first use with `psb_fast.train.train_or_resume` on one thread
(resumable; run folders under --cache):

- "demo-toy": the demo's network (`psb_fast.demo.demo_config`: ResMLP on the 3x3 Gaussian grid).
- "mix8-mlp": a ResMLP on an 8-D Gaussian mixture of 6 modes (`psb_fast.oracles.mixture_random`
  with seed MIX8_SEED) that no choice of the package was made on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from psb_fast import metrics, tune
from psb_fast.config import TrainConfig
from psb_fast.data import load_data
from psb_fast.defaults import default_setting
from psb_fast.demo import DEMO_STEPS, demo_config
from psb_fast.learn import JACOBIANS, Learn
from psb_fast.oracles import GaussianMixture, mixture_random
from psb_fast.pretrained import Trained, load_trained
from psb_fast.settings import Setting, published_setting
from psb_fast.train import CHECKPOINT, train_or_resume
from psb_fast.tuning import reference_solution, rmse, run_settings, settings_rmse

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "learn"
DEFAULT_CACHE = DEFAULT_OUT / "cache"
MODELS = ("demo-toy", "mix8-mlp")
#: The 8-D mixture: dimension, modes, seed of mixture_random, training points, training steps.
MIX8 = (8, 6, 808)
MIX8_TRAIN_N, MIX8_STEPS = 20_000, 2000


def mixture_8d() -> GaussianMixture:
    """The data distribution of "mix8-mlp"."""
    dim, k, seed = MIX8
    return mixture_random(dim, k, seed)


def train_config(name: str, cache: Path) -> TrainConfig:
    """The training run of a model, out_dir <cache>/<name>/run."""
    run = cache / name / "run"
    if name == "demo-toy":
        return dataclasses.replace(demo_config(run, DEMO_STEPS), threads=1)
    if name == "mix8-mlp":
        path = cache / name / f"train_n{MIX8_TRAIN_N}.npy"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            x = mixture_8d().sample(MIX8_TRAIN_N, torch.Generator().manual_seed(MIX8[2] + 1))
            np.save(path, x.float().numpy())
        return TrainConfig(data=f"tensor:{path}", model="mlp", model_kwargs={"hidden": 256, "depth": 3},
                           batch_size=512, steps=MIX8_STEPS, lr=2e-3, warmup_steps=200, ema_decay=0.995,
                           ckpt_every=250, log_every=100, eval_every=0, eval_samples=0, out_dir=str(run),
                           device="cpu", bf16=False, threads=1, seed=1)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def ensure_model(name: str, cache: Path, progress: bool = True) -> Trained:
    """Train (or resume, or reuse) a model and load it."""
    cfg = train_config(name, cache)
    train_or_resume(cfg, progress=progress)
    return load_trained(Path(cfg.out_dir) / CHECKPOINT)


def held_out(name: str, n: int) -> torch.Tensor:
    """n held-out data points of a model's distribution (never used in training)."""
    if name == "demo-toy":
        return load_data("gmm-grid", split="test", seed=1).all(n)[0]
    return mixture_8d().sample(n, torch.Generator().manual_seed(MIX8[2] + 2)).float()


TUNE_DRAWS, EVAL_DRAWS, REFERENCE_NFE, FLOOR_NFE = 1024, 2000, 400, 200
SW_PROJECTIONS, SW_SEED = 200, 0


def sliced_w2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sliced Wasserstein-2 distance between point sets [N, D] (`psb_fast.metrics.sliced_w2`)."""
    return metrics.sliced_w2(a, b, n_projections=SW_PROJECTIONS, seed=SW_SEED)


def run_model(name: str, nfes: list[int], options: Learn, cache: Path, progress: bool) -> dict:
    """tune(learn=...) on one model, then every setting on fresh evaluation draws (module doc)."""
    trained = ensure_model(name, cache, progress)
    model, bridge = trained.model, trained.bridge
    m0 = trained.prior(TUNE_DRAWS, seed=2)
    load = [os.getloadavg()[0]]
    start = time.perf_counter()
    with torch.no_grad():
        target = reference_solution(model, bridge, m0, REFERENCE_NFE)
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = tune(model, bridge, nfes, m0, target=target, learn=options, progress=progress)
    tune_seconds = time.perf_counter() - start
    load.append(os.getloadavg()[0])
    m_eval = trained.prior(EVAL_DRAWS, seed=1)
    data = held_out(name, EVAL_DRAWS)
    with torch.no_grad():
        reference = reference_solution(model, bridge, m_eval, REFERENCE_NFE)
    rows = []
    for nfe in nfes:
        entry, info = result[nfe], result[nfe]["learn"]
        named = {"defaults": default_setting(nfe), "grid-tuned": Setting.from_json(info["grid"])}
        if info["learned"] is not None:
            named["learned"] = Setting.from_json(info["learned"])
        named["kept"] = Setting.from_json(entry)
        named["published"] = published_setting(nfe)
        with torch.no_grad():
            outs = run_settings(model, bridge, m_eval, nfe, list(named.values()))
            floor_settings = [Setting(s.T, 1.0, 3, None, "multistep-corrector") for s in named.values()]
            floors = settings_rmse(model, bridge, m_eval, reference, FLOOR_NFE, floor_settings)
        errs = rmse(outs, reference).tolist()
        per_draw = (outs - reference.unsqueeze(0)).pow(2).flatten(2).sum(2)  # [settings, draws]
        top = per_draw.topk(max(1, EVAL_DRAWS // 100), dim=1).values.sum(1) / per_draw.sum(1)
        grid_err = errs[1]
        for k, (label, setting) in enumerate(named.items()):
            rows.append({"model": name, "nfe": nfe, "settings": label, "setting": setting.to_json(),
                         "rmse": errs[k], "ratio_to_grid": errs[k] / grid_err,
                         "sw_to_data": sliced_w2(outs[k], data), "hop_floor": float(floors[k]),
                         "top1_share": float(top[k]),
                         "kept": info["kept"] if label == "kept" else None})
        keys = ("validation_rmse", "tuning_rmse", "iterations", "seconds", "note", "ratio_to_grid", "draws")
        rows[-1]["learn"] = {k: info[k] for k in keys}
    return {"model": name, "tune_seconds": tune_seconds, "reference_seconds": reference_seconds,
            "loadavg": load, "reference_sw_to_data": sliced_w2(reference, data),
            "data_sw_to_data": sliced_w2(held_out(name, 2 * EVAL_DRAWS)[EVAL_DRAWS:], data),
            "tuned": result, "rows": rows}


def format_markdown(report: dict) -> str:
    """The report's tables (one per model) as markdown."""
    lines = [f"`{report['command']}` ({report['threads']} thread, torch {report['torch']}); Learn options: "
             f"{report['options']}", ""]
    for model in report["models"]:
        lines += [f"### {model['model']}", "",
                  f"tune(learn=...) {model['tune_seconds']:.1f} s for NFE {report['nfes']} (plus "
                  f"{model['reference_seconds']:.1f} s for the reference on the tuning draws; load average "
                  f"{model['loadavg'][0]:.1f} -> "
                  f"{model['loadavg'][1]:.1f} on {os.cpu_count()} cores). SW of the NFE-400 reference to "
                  "data "
                  f"{model['reference_sw_to_data']:.4f}, of data to data {model['data_sw_to_data']:.4f}.", "",
                  "| NFE | settings | RMSE vs ref | / grid | SW to data | T | hop floor at T "
                  "| top 1% share |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in model["rows"]:
            label = r["settings"] + (f" ({r['kept']})" if r["kept"] else "")
            s = r["setting"]
            lines.append(f"| {r['nfe']} | {label} | {r['rmse']:.3e} | {r['ratio_to_grid']:.2f} | "
                         f"{r['sw_to_data']:.4f} | {s['T']:.4f} | {r['hop_floor']:.2e} | "
                         f"{r['top1_share']:.2f} |")
        lines += ["", "| NFE | tuning RMSE start -> best | validation RMSE start -> best | iterations | s | "
                      "in-tune eval ratio learned / grid | note |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in model["rows"]:
            if "learn" in r:
                info = r["learn"]
                tr = info["tuning_rmse"] or [math.nan] * 2
                va = info["validation_rmse"] or [math.nan] * 2
                ratio = "-" if info["ratio_to_grid"] is None else f"{info['ratio_to_grid']:.2f}"
                lines.append(f"| {r['nfe']} | {tr[0]:.3e} -> {tr[1]:.3e} | {va[0]:.3e} -> {va[1]:.3e} | "
                             f"{info['iterations']} | {info['seconds']:.1f} | {ratio} | {info['note']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--nfes", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--jacobian", default=Learn.jacobian, choices=JACOBIANS)
    parser.add_argument("--teacher-ball", type=float, default=Learn.teacher_ball)
    parser.add_argument("--steps", type=int, default=Learn.steps)
    parser.add_argument("--lr", type=float, default=Learn.lr)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="trained models (reused when present)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for learn.json and learn.md")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    options = Learn(steps=args.steps, lr=args.lr, jacobian=args.jacobian, teacher_ball=args.teacher_ball)
    given = argv if argv is not None else sys.argv[1:]
    report = {"command": "python -m benchmarks.bench_learn " + " ".join(given),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
              "nfes": args.nfes, "options": dataclasses.asdict(options),
              "models": [run_model(name, args.nfes, options, args.cache, not args.no_progress)
                         for name in args.models]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learn.json").write_text(json.dumps(report, indent=1) + "\n")
    text = format_markdown(report)
    (args.out / "learn.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
