"""`psb-fast demo`: train a toy phase-space model on the CPU, then sample it in few NFEs.

Trains a residual MLP on the 3x3 Gaussian-mixture grid (about a minute on 2 CPU cores; rerunning
resumes an interrupted run and skips a finished one), tunes the sampler for this model at NFE 5,
10 and 20 (`psb_fast.tune(..., learn=True)` on TUNE_SAMPLES prior draws: the grid search, then the
learned step times, kept per NFE only where they beat the grid search's pick on the tuning's own
held-out evaluation draws; `learn=False`: the grid search alone, on all of them), then samples at
those NFEs with the package defaults, the grid search's pick ("tuned"), the learned setting
("learned", where one was learned) and the published settings from the same fresh prior draws
(never seen by the tuning), and writes to the output folder:

- samples.png: one row per NFE: held-out data, then each setting's samples from the same prior
  draws, each panel titled with its settings (T, order, variant; "kept" marks the one tuned.json
  holds);
- trajectories.png: phase-space paths (x, v, x1_hat) of the NFE-20 run with the defaults, a dot
  per network evaluation coloured by t, with the points at the last evaluation marked;
- metrics.json: per NFE and setting, the pathwise RMSE against the model's own NFE-400 solution
  (`psb_fast.tuning.reference_solution`), the distribution quality against held-out data
  (`psb_fast.metrics`: sliced Wasserstein-2, MMD with one median-heuristic kernel width for the
  whole table, energy distance) beside its floor (the same metrics between two held-out halves),
  and the wall time of sample(); the tune time and which of tuned / learned tune kept per NFE;
- tuned.json: the kept settings (`PhaseSampler.from_tuned`; `psb-fast tune RUN --learn`
  finds the same);
- run/: the training run (checkpoint, config, metrics.jsonl).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import torch

from . import plots
from .config import TrainConfig
from .metrics import distribution_quality, held_out_halves, median_bandwidth
from .pretrained import load_trained
from .sampler import PhaseSampler
from .threads import auto_threads, intra_op_threads, work_elements
from .train import CHECKPOINT, train_or_resume
from .tuning import compared_settings, reference_solution, rmse, save_tuned, tune

NFES = (5, 10, 20)
REFERENCE_NFE = 400
SAMPLES = 2000
TUNE_SAMPLES = 512  # `psb-fast tune`'s default -n (the learning splits them: tuning, validation, evaluation)
DEMO_STEPS = 3500
#: The settings compared, in the table's and the figure's order (psb_fast.tuning.compared_settings).
COLUMNS = ("defaults", "tuned", "learned", "published")
#: What metrics.json keeps per NFE of tune's "learn" record (psb_fast.tuning.tune_learned).
LEARN_KEYS = ("kept", "grid_rmse", "learned_rmse", "ratio_to_grid", "z", "iterations", "seconds", "note")
TUNE_SEED = 2  # seed of the tuning draws (`psb-fast tune`'s default, so it finds the same settings)
log = logging.getLogger(__name__)


def demo_config(out_dir: Path, steps: int) -> TrainConfig:
    """The demo's training run: ResMLP on the 3x3 mixture grid, CPU."""
    return TrainConfig(
        data="gmm-grid", model="mlp", model_kwargs={"hidden": 128, "depth": 3}, batch_size=512,
        steps=steps, lr=2e-3, warmup_steps=200, ema_decay=0.995, ckpt_every=500, log_every=100,
        eval_every=0, eval_nfes=(5, 10, 20), eval_samples=0, out_dir=str(out_dir), device="cpu", seed=0,
    )


def run_demo(out: Path, steps: int | None = None, progress: bool = True, samples: int = SAMPLES,
             learn: bool = True) -> dict:
    """Run the demo into `out` (created); returns the metrics written to metrics.json.

    steps: training steps (None: DEMO_STEPS); samples: prior draws per sampling run (and held-out
    points per half); learn: tune with learned step times too (module docstring)."""
    steps = DEMO_STEPS if steps is None else steps
    for name, value in (("steps", steps), ("samples", samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(learn, bool):
        raise TypeError(f"learn must be a bool, got {type(learn).__name__}")
    out.mkdir(parents=True, exist_ok=True)
    with intra_op_threads(auto_threads(work_elements(samples, (2,)))):  # small calls: one thread
        return _run(out, steps, progress, samples, learn)


def _run(out: Path, steps: int, progress: bool, samples: int, learn: bool) -> dict:
    begin = time.perf_counter()
    cfg = demo_config(out / "run", steps)
    train_seconds = 0.0 if train_or_resume(cfg, progress) is None else time.perf_counter() - begin
    trained = load_trained(Path(cfg.out_dir) / CHECKPOINT)
    model, bridge = trained.model, trained.bridge
    data, other = held_out_halves(cfg.data, samples)  # two disjoint held-out halves: reference, floor
    bandwidth = median_bandwidth(data)  # one MMD kernel for every row and the floor
    m0 = trained.prior(samples, seed=1)
    with torch.no_grad():
        reference = reference_solution(model, bridge, m0, REFERENCE_NFE)
        start = time.perf_counter()
        tune_m0 = trained.prior(min(TUNE_SAMPLES, samples), seed=TUNE_SEED)
        tuned = tune(model, bridge, NFES, tune_m0, progress=progress, reference_nfe=REFERENCE_NFE,
                     learn=learn)
        tune_seconds = time.perf_counter() - start
    save_tuned(tuned, out / "tuned.json")
    rows, panels, notes, learned = [], {}, {}, {}  # panels: per NFE, per setting, samples from m0
    for nfe in NFES:
        info = tuned[nfe].get("learn")
        kept = "tuned" if info is None or info["kept"] == "grid" else "learned"
        if info is not None:
            learned[nfe] = {key: info[key] for key in LEARN_KEYS}
        for name, setting in compared_settings(tuned[nfe], nfe).items():
            sampler = (PhaseSampler(bridge, nfe, backend="cpu") if name == "defaults" else
                       PhaseSampler.from_tuned(out / "tuned.json", bridge, nfe, backend="cpu") if name == kept
                       else PhaseSampler(bridge, nfe, setting, backend="cpu"))
            start = time.perf_counter()
            x1 = sampler.sample(model, m0)
            seconds = time.perf_counter() - start
            quality = distribution_quality(x1, data, bandwidth)
            rows.append({
                "nfe": nfe, "settings": name, "kept": name == kept if name in ("tuned", "learned") else None,
                "T": sampler.T, "order": sampler.order, "grid": sampler.grid_kind, "variant": sampler.variant,
                "rmse_vs_reference": float(rmse(x1.unsqueeze(0), reference)[0]),
                "sw2_to_data": quality["sw2"], "mmd_to_data": quality["mmd"],
                "energy_distance_to_data": quality["energy"], "sample_seconds": seconds,
            })
            panels.setdefault(f"NFE {nfe}", {})[name] = x1
            kept_mark = " (kept)" if rows[-1]["kept"] else ""
            notes.setdefault(f"NFE {nfe}", {})[name] = (f"T {sampler.T:.3g}, order {sampler.order}, "
                                                       f"{sampler.variant}{kept_mark}")
        if info is not None and info["learned"] is None:
            notes[f"NFE {nfe}"]["learned"] = f"nothing learned:\n{info['note']}"
    traced = PhaseSampler(bridge, max(NFES), backend="cpu")
    _, trajectory = traced.sample(model, m0, return_trajectory=True)
    plots.toy_comparison(data, panels, out / "samples.png",
                         title=f"Demo toy model (3x3 Gaussian grid, {steps} training steps): each setting "
                               f"from the same {samples} prior draws; first column: held-out data",
                         notes=notes, columns=[c for c in COLUMNS if any(c in r for r in panels.values())])
    plots.phase_trajectories(trajectory, out / "trajectories.png",
                             title=f"defaults: {plots.sampler_label(traced)}")
    floor = distribution_quality(other, data, bandwidth)
    metrics = {
        "command": "psb-fast demo", "train_steps": steps, "train_seconds_this_call": train_seconds,
        "samples": samples, "reference_nfe": REFERENCE_NFE, "tune_seconds": tune_seconds,
        "tune_samples": min(TUNE_SAMPLES, samples), "learn": learned if learn else None,
        "held_out_points": len(data), "mmd_bandwidth": bandwidth,
        "data_vs_data": {"sw2": floor["sw2"], "mmd": floor["mmd"], "energy": floor["energy"]},
        "data_vs_data_energy": floor["energy"],
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "rows": rows,
    }
    metrics["total_seconds_this_call"] = time.perf_counter() - begin
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(format_table(metrics))
    log.info(f"wrote {out / 'samples.png'}, {out / 'trajectories.png'}, {out / 'metrics.json'}, "
             f"{out / 'tuned.json'}")
    return metrics


def format_table(metrics: dict) -> str:
    """The demo's summary table (plain text)."""
    floor, learn = metrics["data_vs_data"], metrics.get("learn")
    tuning = "grid search + learned times" if learn else "grid search"
    seconds = metrics["train_seconds_this_call"]
    lines = [f"trained {metrics['train_steps']} steps ({seconds:.0f} s this call); "
             f"tuned ({tuning}) in {metrics['tune_seconds']:.0f} s on {metrics['tune_samples']} draws; "
             f"{metrics['samples']} fresh draws per setting; {metrics['machine']['threads']} thread(s); "
             f"{metrics['total_seconds_this_call']:.0f} s in all",
             f"distribution metrics vs {metrics['held_out_points']} held-out points; data vs data (the other "
             f"held-out half): SW2 {floor['sw2']:.4f}, MMD {floor['mmd']:.4f}, energy {floor['energy']:.4f}",
             f"{'NFE':>4}  {'settings':<10} {'variant':<19} {'T':>7} {'order':>5}  {'RMSE vs ref':>11}  "
             f"{'SW2':>7}  {'MMD':>7}  {'energy':>7}  {'sample s':>8}"]
    for r in metrics["rows"]:
        name = r["settings"] + ("*" if r["kept"] else "")
        lines.append(f"{r['nfe']:>4}  {name:<10} {r['variant']:<19} {r['T']:>7.4f} {r['order']:>5}  "
                     f"{r['rmse_vs_reference']:>11.3e}  {r['sw2_to_data']:>7.4f}  {r['mmd_to_data']:>7.4f}  "
                     f"{r['energy_distance_to_data']:>7.4f}  {r['sample_seconds']:>8.3f}")
    if learn:
        lines.append("* kept by tune (in tuned.json): the learned times only where they beat the grid "
                     "search's pick on tune's held-out evaluation draws")
        for nfe, info in sorted(learn.items(), key=lambda item: int(item[0])):
            if info["learned_rmse"] is None:
                lines.append(f"  NFE {nfe}: nothing learned ({info['note']})")
            else:
                lines.append(f"  NFE {nfe}: kept {info['kept']}; learned / grid RMSE on tune's evaluation "
                             f"draws {info['ratio_to_grid']:.2f} (paired z {info['z']:.1f})")
    return "\n".join(lines)
