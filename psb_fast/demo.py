"""`psb-fast demo`: train a toy phase-space model on the CPU, then sample it in few NFEs.

Trains a residual MLP on the 3x3 Gaussian-mixture grid (a few minutes on 2 CPU cores; rerunning
resumes an interrupted run and skips a finished one), tunes the sampler for this model at NFE 5,
10 and 20 (`psb_fast.tune` on TUNE_SAMPLES prior draws; about a minute), then samples at those
NFEs with the package defaults, the tuned settings and the published settings from the same
prior draws, and writes to the output folder:

- samples.png: held-out data next to the default-settings samples per NFE, each panel titled
  with its settings (NFE, T, solver order, grid);
- trajectories.png: phase-space paths (x, v, x1_hat) of the NFE-20 run, coloured by t, with
  the points at the last evaluation marked;
- metrics.json: per NFE and setting (defaults, tuned, published), the pathwise RMSE against the
  model's own NFE-400 solution (`psb_fast.tuning.reference_solution`), the energy distance to
  fresh data, and the wall time of sample(); the tune time;
- tuned.json: the tuned settings (`PhaseSampler.from_tuned`);
- run/: the training run (checkpoint, config, metrics.jsonl).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from . import plots
from .config import TrainConfig
from .data import load_data
from .pretrained import load_trained
from .sampler import PhaseSampler
from .settings import published_setting
from .train import CHECKPOINT, energy_distance, train_or_resume
from .tuning import reference_solution, rmse, save_tuned, tune

NFES = (5, 10, 20)
REFERENCE_NFE = 400
SAMPLES = 2000
TUNE_SAMPLES = 512
DEMO_STEPS = 3500


def demo_config(out_dir: Path, steps: int) -> TrainConfig:
    """The demo's training run: ResMLP on the 3x3 mixture grid, CPU."""
    return TrainConfig(
        data="gmm-grid", model="mlp", model_kwargs={"hidden": 128, "depth": 3}, batch_size=512,
        steps=steps, lr=2e-3, warmup_steps=200, ema_decay=0.995, ckpt_every=500, log_every=100,
        eval_every=0, eval_nfes=(5, 10, 20), eval_samples=0, out_dir=str(out_dir), device="cpu", seed=0,
    )


def run_demo(out: Path, steps: int | None = None, progress: bool = True, samples: int = SAMPLES) -> dict:
    """Run the demo into `out` (created); returns the metrics written to metrics.json.

    steps: training steps (None: DEMO_STEPS); samples: prior draws per sampling run."""
    steps = DEMO_STEPS if steps is None else steps
    for name, value in (("steps", steps), ("samples", samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # small tensors: one thread beats two on a shared 2-core machine
    cfg = demo_config(out / "run", steps)
    start = time.perf_counter()
    train_seconds = 0.0 if train_or_resume(cfg, progress) is None else time.perf_counter() - start
    trained = load_trained(Path(cfg.out_dir) / CHECKPOINT)
    model, bridge = trained.model, trained.bridge
    data, _ = load_data(cfg.data, split="test", seed=1).all(samples)
    m0 = trained.prior(samples, seed=1)
    with torch.no_grad():
        reference = reference_solution(model, bridge, m0, REFERENCE_NFE)
        start = time.perf_counter()
        tune_m0 = trained.prior(min(TUNE_SAMPLES, samples), seed=2)
        tuned = tune(model, bridge, NFES, tune_m0, progress=progress, reference_nfe=REFERENCE_NFE)
        tune_seconds = time.perf_counter() - start
    save_tuned(tuned, out / "tuned.json")
    rows, panels = [], {}
    for nfe in NFES:
        settings = {"defaults": PhaseSampler(bridge, nfe, backend="cpu"),
                    "tuned": PhaseSampler.from_tuned(out / "tuned.json", bridge, nfe, backend="cpu"),
                    "published": PhaseSampler(bridge, nfe, **published_setting(nfe).sampler_kwargs(),
                                              backend="cpu")}
        for name, sampler in settings.items():
            start = time.perf_counter()
            x1 = sampler.sample(model, m0)
            seconds = time.perf_counter() - start
            rows.append({
                "nfe": nfe, "settings": name, "T": sampler.T, "order": sampler.order,
                "grid": sampler.grid_kind, "variant": sampler.variant,
                "rmse_vs_reference": float(rmse(x1.unsqueeze(0), reference)[0]),
                "energy_distance_to_data": energy_distance(data, x1), "sample_seconds": seconds,
            })
            if name == "defaults":
                panels[f"defaults: {plots.sampler_label(sampler)}"] = x1
    traced = PhaseSampler(bridge, max(NFES), backend="cpu")
    _, trajectory = traced.sample(model, m0, return_trajectory=True)
    plots.toy_panels(data, panels, out / "samples.png",
                     title=f"Demo toy model (3x3 Gaussian grid, {steps} training steps): "
                           "samples with the default settings per NFE")
    plots.phase_trajectories(trajectory, out / "trajectories.png",
                             title=f"defaults: {plots.sampler_label(traced)}")
    metrics = {
        "command": "psb-fast demo", "train_steps": steps, "train_seconds_this_call": train_seconds,
        "samples": samples, "reference_nfe": REFERENCE_NFE, "tune_seconds": tune_seconds,
        "tune_samples": min(TUNE_SAMPLES, samples), "data_vs_data_energy": energy_distance(
            data, load_data(cfg.data, split="test", seed=2).all(samples)[0]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "rows": rows,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(format_table(metrics))
    print(f"wrote {out / 'samples.png'}, {out / 'trajectories.png'}, {out / 'metrics.json'}, "
          f"{out / 'tuned.json'}")
    return metrics


def format_table(metrics: dict) -> str:
    """The demo's summary table (plain text)."""
    seconds = metrics["train_seconds_this_call"]
    lines = [f"trained {metrics['train_steps']} steps ({seconds:.0f} s this call); "
             f"{metrics['samples']} samples; tuned in {metrics['tune_seconds']:.0f} s on "
             f"{metrics['tune_samples']} draws; data-vs-data energy distance "
             f"{metrics['data_vs_data_energy']:.4f}",
             f"{'NFE':>4}  {'settings':<9} {'variant':<19} {'T':>7} {'order':>5}  {'RMSE vs ref':>14}  "
             f"{'energy dist':>11}  {'sample s':>8}"]
    for r in metrics["rows"]:
        lines.append(f"{r['nfe']:>4}  {r['settings']:<9} {r['variant']:<19} {r['T']:>7.4f} {r['order']:>5}  "
                     f"{r['rmse_vs_reference']:>14.3e}  {r['energy_distance_to_data']:>11.4f}  "
                     f"{r['sample_seconds']:>8.3f}")
    return "\n".join(lines)
