"""Real data on a CPU: train a UNet on scikit-learn's 8x8 digits, sample it, measure quality.

    python -m studies.digits_study --out benchmarks/results/digits [--steps 3000] [--minutes 25]

Run from the repository root (studies/ is a plain folder of scripts, not installed; it imports
only psb_fast). `--eval-only` re-evaluates the saved run, e.g. after the defaults changed.

1. Trains (resumable: rerunning continues an interrupted run) an unconditional compact UNet on
   the digits train split (1438 images scaled to [-1, 1]) for `--steps` steps or until
   `--minutes` of training time, whichever comes first (the run then stops cleanly).
2. Samples 1000 digits at NFE 10 and 20 with the package's tuned defaults (and the published
   settings) from the same prior draws; writes a sample grid per NFE.
3. Quality, by a classifier trained on the real train split (scikit-learn logistic regression on
   the 64 pixels; its held-out accuracy is reported): mean top-class confidence and the entropy
   of the predicted-class histogram (coverage; log 10 = 2.303 is uniform over the 10 digits) of
   the generated digits vs the 359 held-out real ones.
4. Tuned defaults vs published settings on this trained model: pathwise RMSE of each sampler's
   output against the model's own NFE-200 solution from the same draws, at NFE 3..50.
Outputs: results.json, digits_table.md, samples_nfe10.png, samples_nfe20.png, real.png, run/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from psb_fast import PhaseSampler
from psb_fast.checkpoint import load_checkpoint
from psb_fast.config import TrainConfig
from psb_fast.data import load_data
from psb_fast.plots import image_grid
from psb_fast.pretrained import load_trained
from psb_fast.settings import published_setting
from psb_fast.train import CHECKPOINT, train_or_resume
from psb_fast.tuning import reference_solution, rmse

SAMPLES = 1000
COMPARE_NFES = (3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 50)


def config(out: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        data="digits", model="unet", model_kwargs={"base": 32, "mults": [1, 2]}, batch_size=128,
        steps=steps,
        lr=2e-3, warmup_steps=200, ema_decay=0.999, ckpt_every=250, log_every=50, eval_every=0,
        eval_samples=0, out_dir=str(out / "run"), device="cpu", seed=0,
    )


def train_for(cfg: TrainConfig, minutes: float) -> dict:
    """Train (or resume) until cfg.steps or `minutes` of wall time, whichever first."""
    deadline = time.monotonic() + 60 * minutes
    start = time.perf_counter()
    stop = {"flag": False}

    def watch(entry: dict) -> None:
        if time.monotonic() > deadline and not stop["flag"]:
            stop["flag"] = True
            os.kill(os.getpid(), signal.SIGINT)  # train() checkpoints and returns cleanly

    summary = train_or_resume(cfg, progress=True, callback=watch)
    if summary is None:  # the run already holds cfg.steps steps
        return {"step": int(load_checkpoint(Path(cfg.out_dir) / CHECKPOINT)["step"]), "seconds": 0.0}
    return {"step": summary["step"], "seconds": time.perf_counter() - start,
            "steps_per_s": summary["steps_per_s"], "stopped": summary["stopped"]}


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [B, 1, 8, 8] -> [B, 64] in the classifier's 0..16 units."""
    return ((x.clamp(-1, 1) + 1) * 8).reshape(len(x), -1).double().numpy()


def quality(clf: LogisticRegression, x: torch.Tensor) -> dict:
    proba = clf.predict_proba(to_pixels(x))
    counts = np.bincount(proba.argmax(1), minlength=10) / len(proba)
    entropy = float(-(counts[counts > 0] * np.log(counts[counts > 0])).sum())
    return {"top_confidence": float(proba.max(1).mean()), "class_entropy": entropy,
            "class_shares": [round(float(c), 4) for c in counts]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/digits"))
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--eval-only", action="store_true", help="skip training; evaluate the saved run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = config(args.out, args.steps)
    previous = args.out / "results.json"
    if args.eval_only:  # keep the training record of the run that trained the model
        training = json.loads(previous.read_text())["training"] if previous.exists() else {"skipped": True}
    else:
        training = train_for(cfg, args.minutes)
    trained = load_trained(Path(cfg.out_dir) / CHECKPOINT)
    model, bridge = trained.model, trained.bridge

    train_x, train_y = load_data("digits", split="train").all()
    test_x, test_y = load_data("digits", split="test").all()
    clf = LogisticRegression(max_iter=5000).fit(to_pixels(train_x), train_y.numpy())
    accuracy = float((clf.predict(to_pixels(test_x)) == test_y.numpy()).mean())
    image_grid(test_x[:64], args.out / "real.png")

    m0 = trained.prior(SAMPLES, seed=1)
    with torch.no_grad():
        reference = reference_solution(model, bridge, m0, 200)
    generated, compare = {}, []
    for nfe in COMPARE_NFES:
        tuned = PhaseSampler(bridge, nfe, backend="cpu")
        published = PhaseSampler(bridge, nfe, published_setting(nfe), backend="cpu")
        start = time.perf_counter()
        x_tuned = tuned.sample(model, m0)
        seconds = time.perf_counter() - start
        x_pub = published.sample(model, m0)
        e_tuned, e_pub = (float(rmse(x.unsqueeze(0), reference)[0]) for x in (x_tuned, x_pub))
        compare.append({"nfe": nfe, "tuned_rmse": e_tuned, "published_rmse": e_pub,
                        "ratio": e_tuned / e_pub, "tuned_T": tuned.T, "tuned_order": tuned.order,
                        "sample_seconds": seconds})
        if nfe in (10, 20):
            generated[nfe] = {"tuned": quality(clf, x_tuned), "published": quality(clf, x_pub)}
            image_grid(x_tuned[:64], args.out / f"samples_nfe{nfe}.png")
    results = {
        "command": "python -m studies.digits_study --out benchmarks/results/digits "
                   + ("--eval-only" if args.eval_only else f"--steps {args.steps} --minutes {args.minutes}"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "training": training, "trained_steps": trained.step, "samples": SAMPLES,
        "classifier_test_accuracy": accuracy,
        "real_heldout": quality(clf, test_x), "generated": {str(k): v for k, v in generated.items()},
        "tuned_vs_published": compare, "uniform_entropy": math.log(10),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "digits_table.md").write_text(markdown(results))
    print(markdown(results))


def _training_time(training: dict) -> str:
    if "seconds" not in training or not training["seconds"]:
        return ""
    return f", {training['seconds'] / 60:.1f} min at {training['steps_per_s']:.2f} steps/s"


def markdown(r: dict) -> str:
    lines = [
        "# Digits (8x8, scikit-learn) on a CPU", "", f"Command: `{r['command']}`", "",
        f"UNet trained {r['trained_steps']} steps (batch 128{_training_time(r['training'])}). "
        "Classifier: logistic regression on the "
        f"real train split, held-out accuracy {r['classifier_test_accuracy']:.3f}. {r['samples']} samples "
        f"per row, same prior draws. Entropy of the predicted-class shares: uniform = "
        f"{r['uniform_entropy']:.3f}.",
        "", "| images | mean top-class confidence | class-coverage entropy |", "|---|---:|---:|",
        f"| real held-out (359) | {r['real_heldout']['top_confidence']:.3f} | "
        f"{r['real_heldout']['class_entropy']:.3f} |",
    ]
    for nfe, q in r["generated"].items():
        for name in ("tuned", "published"):
            lines.append(f"| generated, NFE {nfe}, {name} | {q[name]['top_confidence']:.3f} | "
                         f"{q[name]['class_entropy']:.3f} |")
    lines += ["", "Tuned defaults vs published settings on this model: pathwise RMSE against the model's own "
              "NFE-200 solution (order 3, T = 0.999, hop) from the same prior draws.", "",
              "| NFE | tuned T | tuned order | tuned RMSE | published RMSE | ratio |",
              "|---:|---:|---:|---:|---:|---:|"]
    for c in r["tuned_vs_published"]:
        lines.append(f"| {c['nfe']} | {c['tuned_T']:.4f} | {c['tuned_order']} | {c['tuned_rmse']:.3e} | "
                     f"{c['published_rmse']:.3e} | {c['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
