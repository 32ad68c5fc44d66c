"""Trained models for the defaults study: seven small networks, their converged targets, RMSEs.

    python -m studies.trained_models --train-only                   # train + references (cached)
    python -m studies.trained_models --settings psb_fast/defaults.json --out DIR
    python -m studies.trained_models --settings FILE.json --nfes 5 10 20

Run from the repository root (studies/ is a plain folder, not installed). Every model is trained
with `psb_fast.train.train_or_resume` on one torch thread with a small budget (a few CPU minutes
each), resumable, run folders under <cache>/<name>/run (default <cache> =
benchmarks/results/trained_models/cache, git-ignored). `MODELS` (name: kind, data, network):

- "rings-mlp", "checkerboard-mlp", "spiral-mlp": 2-D toy sets of psb_fast.data (ResMLP, hidden
  128, depth 3, TOY_STEPS steps).
- "gmm16-mlp", "gmm48-mlp": 16-D / 48-D Gaussian mixtures (`psb_fast.oracles.mixture_random`,
  12 / 10 modes) sampled into a tensor file (ResMLP, hidden 256, depth 3, GMM_STEPS[name] steps). Their
  exact drift is known, so their error splits into the network's part and the sampler's part
  (`exact_target`).
- "bars-mlp": 64-D flattened 8x8 soft-bar images (`bar_images`; ResMLP, hidden 256, depth 4).
- "digits-folder": a folder of 8x8 grayscale PNGs written from scikit-learn's digits, read with
  the `images:DIR` data spec (compact UNet, base 16, mults (1, 2)).

`FIT_MODELS` enter the defaults study's objective; `HELD_OUT_MODELS` are only scored after the
rule is fixed (studies/defaults_study.py).

Targets (`reference`): per model, fixed prior draws (B = BATCH[name], seed PRIOR_SEED) and the
model's own solution from them with REFERENCE = order 3, q = 2, T = 0.999, hop, variant
"multistep-corrector", at NFE 1600 (`REFERENCE_NFES[-1]`). Its convergence is measured: RMSE of
NFE 800 (same method) vs NFE 1600 and of an independent method (plain multistep order 3 at NFE
1600) vs the target (`reference_checks`). Where the exact drift exists, `exact_target` is the
exact flow's endpoint E[x1 | m(0.999)] (DOP853) from the same draws.

Scores: pathwise RMSE of a setting's hop output against the target (`psb_fast.tuning.settings_rmse`,
float64 state, MAX_ROWS rows per model call), cached per model in <cache>/<name>/errors.json keyed
by the model/target key, the NFE and the setting's JSON (`Setting.to_json`), so reruns are free;
`draw_errors` gives per-draw squared errors (for sampling-noise estimates) against the target and,
where it exists, the exact endpoint.

API:
- `candidate_errors(model_name, nfe, settings, cache=DEFAULT_CACHE) -> tensor [C] float64`
- `draw_errors(model_name, nfe, settings, cache=DEFAULT_CACHE) -> {"target": [C, B], "exact": [C, B] | None}`
- `evaluate(settings_by_nfe, nfes=range(3, 51), models=MODELS, cache=DEFAULT_CACHE) -> dict`
- `load_settings(path) -> {nfe: Setting}` (a defaults file, a psb_fast.tune file, or {"nfe": setting})
- `model(name, cache=DEFAULT_CACHE) -> TrainedModel` (trains / builds the target when missing)
The CLI writes <out>/trained_check.json and <out>/trained_check.md.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from psb_fast.config import TrainConfig
from psb_fast.oracles import GaussianMixture, mixture_random, ode_solution
from psb_fast.pretrained import load_trained
from psb_fast.settings import T_END, Setting, published_setting
from psb_fast.train import CHECKPOINT, train_or_resume
from psb_fast.tuning import rmse, run_settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "trained_models"
DEFAULT_CACHE = DEFAULT_OUT / "cache"
#: name -> (kind, data description, role in the defaults study).
MODELS: dict[str, tuple[str, str, str]] = {
    "rings-mlp": ("2-D toy set", "rings", "fit"),
    "checkerboard-mlp": ("2-D toy set", "checkerboard", "fit"),
    "gmm16-mlp": ("mixture, exact drift", "16-D, 12 modes", "fit"),
    "bars-mlp": ("64-D images as vectors", "8x8 soft bars", "fit"),
    "spiral-mlp": ("2-D toy set", "spiral", "held out"),
    "gmm48-mlp": ("mixture, exact drift", "48-D, 10 modes", "held out"),
    "digits-folder": ("image folder, UNet", "8x8 digits PNGs", "held out"),
}
FIT_MODELS = tuple(n for n, (_, _, role) in MODELS.items() if role == "fit")
HELD_OUT_MODELS = tuple(n for n, (_, _, role) in MODELS.items() if role == "held out")
NFES = tuple(range(3, 51))
BATCH = {"rings-mlp": 512, "checkerboard-mlp": 512, "spiral-mlp": 512, "gmm16-mlp": 256,
         "gmm48-mlp": 256, "bars-mlp": 256, "digits-folder": 256}
PRIOR_SEED = 7
T0 = 1e-5
MAX_ROWS = 16384
TOY_STEPS, BARS_STEPS, DIGITS_STEPS = 2000, 2000, 500
#: Training steps of the mixture models.
GMM_STEPS = {"gmm16-mlp": 2500, "gmm48-mlp": 1500}
BARS_N, BARS_SEED, GMM_N = 20000, 1, 20000
#: The exact mixtures of the "gmm" models: (dim, modes, seed, std range) for mixture_random.
MIXTURES = {"gmm16-mlp": (16, 12, 16, (0.1, 0.3)), "gmm48-mlp": (48, 10, 48, (0.05, 0.2))}
#: The target's method and resolutions (the last is the target; the others prove convergence).
REFERENCE = Setting(T_END, 2.0, 3, None, "multistep-corrector")
REFERENCE_NFES = (800, 1600)
#: An independent method at the target's NFE (agreement with the target is a second check).
CROSS_CHECK = Setting(T_END, 2.0, 3)


# ----------------------------------------------------------------------------- models


def bar_images(n: int, seed: int = 0) -> torch.Tensor:
    """n 8x8 images of one soft bar each, pixels in [-1, 1], float32 [n, 64] (row-major 8x8).

    Bar: centre (y, x) ~ U[2, 5]^2 pixels, angle ~ U[0, pi), length ~ U[3, 7], width ~ U[0.5, 1.1];
    intensity exp(-d_perp^2 / (2 width^2)) * sigmoid(2 (length / 2 - |d_par|)), mapped to 2 I - 1.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, 1, 1, generator=gen, dtype=torch.float64)

    cy, cx, angle = uniform(2.0, 5.0), uniform(2.0, 5.0), uniform(0.0, math.pi)
    length, width = uniform(3.0, 7.0), uniform(0.5, 1.1)
    yy, xx = torch.meshgrid(torch.arange(8.0, dtype=torch.float64), torch.arange(8.0, dtype=torch.float64),
                            indexing="ij")
    dy, dx = yy - cy, xx - cx
    along = dx * torch.cos(angle) + dy * torch.sin(angle)
    across = -dx * torch.sin(angle) + dy * torch.cos(angle)
    intensity = torch.exp(-across**2 / (2 * width**2)) * torch.sigmoid(2 * (length / 2 - along.abs()))
    return (2 * intensity - 1).reshape(n, 64).float()


def exact_mixture(name: str) -> GaussianMixture | None:
    """The data distribution of a model when it is an exact Gaussian mixture, else None."""
    if name not in MIXTURES:
        return None
    dim, k, seed, stds = MIXTURES[name]
    return mixture_random(dim, k, seed, stds)


def _data(name: str, folder: Path) -> str:
    """The data spec of a model, writing its data file / folder on first use."""
    folder.mkdir(parents=True, exist_ok=True)
    if name.endswith("-mlp") and name.split("-")[0] in ("rings", "checkerboard", "spiral"):
        return name.split("-")[0]
    if name in MIXTURES:
        path = folder / f"{name}_n{GMM_N}.npy"
        if not path.is_file():
            gen = torch.Generator().manual_seed(MIXTURES[name][2] + 1000)
            np.save(path, exact_mixture(name).sample(GMM_N, gen).float().numpy())
        return f"tensor:{path}"
    if name == "bars-mlp":
        path = folder / f"bars8x8_n{BARS_N}_s{BARS_SEED}.npy"
        if not path.is_file():
            np.save(path, bar_images(BARS_N, seed=BARS_SEED).numpy())
        return f"tensor:{path}"
    if name == "digits-folder":
        images = folder / "images"
        if not images.is_dir():
            from PIL import Image
            from sklearn.datasets import load_digits

            tmp = folder / "images.partial"
            tmp.mkdir(exist_ok=True)
            for i, image in enumerate(load_digits().images):
                pixels = (image / 16.0 * 255.0).round().astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(tmp / f"{i:05d}.png")
            tmp.rename(images)
        return f"images:{images}"
    raise ValueError(f"model name must be one of {list(MODELS)}, got {name!r}")


def train_config(name: str, cache: Path = DEFAULT_CACHE) -> TrainConfig:
    """The training run of a model (module docstring), out_dir <cache>/<name>/run, one thread."""
    data, run = _data(name, cache / name), str(cache / name / "run")
    common = dict(device="cpu", bf16=False, eval_every=0, eval_samples=0, log_every=100, out_dir=run,
                  threads=1, warmup_steps=200, ema_decay=0.995, seed=1)
    if name == "digits-folder":
        return TrainConfig(data=data, model="unet", model_kwargs={"base": 16, "mults": [1, 2]},
                           batch_size=64, steps=DIGITS_STEPS, lr=2e-3, ckpt_every=200, **common)
    if name in MIXTURES or name == "bars-mlp":
        hidden, depth = 256, (4 if name == "bars-mlp" else 3)
        steps = BARS_STEPS if name == "bars-mlp" else GMM_STEPS[name]
        return TrainConfig(data=data, model="mlp", model_kwargs={"hidden": hidden, "depth": depth},
                           batch_size=512, steps=steps, lr=2e-3, ckpt_every=500, **common)
    return TrainConfig(data=data, model="mlp", model_kwargs={"hidden": 128, "depth": 3}, batch_size=512,
                       steps=TOY_STEPS, lr=2e-3, ckpt_every=500, **common)


def ensure_trained(name: str, cache: Path = DEFAULT_CACHE, progress: bool = True) -> dict:
    """Train (or resume, or reuse) a model; returns its training record {"steps", "seconds", ...}
    (seconds summed over the calls that trained it), kept in <cache>/<name>/training.json."""
    cfg = train_config(name, cache)
    record_path = cache / name / "training.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"seconds": 0.0, "calls": []}
    if progress:
        print(f"[{name}] training to {cfg.steps} steps in {cfg.out_dir} (resumes / reuses a run there)",
              flush=True)
    start = time.perf_counter()
    summary = train_or_resume(cfg, progress=progress)
    if summary is not None:
        seconds = time.perf_counter() - start
        record["seconds"] += seconds
        record["calls"].append({"step": summary["step"], "seconds": seconds,
                                "steps_per_s": summary.get("steps_per_s"), "stopped": summary.get("stopped")})
        record["steps"] = summary["step"]
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        if progress:
            print(f"[{name}] trained to step {summary['step']} in {seconds:.0f} s", flush=True)
    return record


def describe(name: str, net: torch.nn.Module, cfg: TrainConfig) -> str:
    params = sum(p.numel() for p in net.parameters())
    kwargs = ", ".join(f"{k}={v}" for k, v in cfg.model_kwargs.items())
    kind, data, _ = MODELS[name]
    return (f"{type(net).__name__}({kwargs}), {params} parameters, data {data} ({kind}), {cfg.steps} steps, "
            f"batch {cfg.batch_size}, lr {cfg.lr}, EMA {cfg.ema_decay}")


@dataclass
class TrainedModel:
    """A trained model with its fixed prior batch m0, converged target and its checks; `exact`:
    the exact flow's endpoint from m0 where the data is an exact mixture, else None."""

    name: str
    net: torch.nn.Module
    bridge: object
    m0: torch.Tensor
    target: torch.Tensor
    exact: torch.Tensor | None
    key: str
    convergence: dict
    training: dict
    architecture: str
    errors_path: Path

    def outputs(self, nfe: int, settings: Sequence[Setting]) -> torch.Tensor:
        with torch.no_grad():
            return run_settings(self.net, self.bridge, self.m0, nfe, list(settings), T0, MAX_ROWS)

    def score(self, nfe: int, settings: Sequence[Setting]) -> torch.Tensor:
        return rmse(self.outputs(nfe, settings), self.target)


_LOADED: dict[tuple[str, str], TrainedModel] = {}


def model(name: str, cache: Path = DEFAULT_CACHE, progress: bool = True) -> TrainedModel:
    """The trained model `name` with its target (trained and built when missing; loaded once)."""
    if name not in MODELS:
        raise ValueError(f"model name must be one of {list(MODELS)}, got {name!r}")
    cache = Path(cache)
    key = (name, str(cache.resolve()))
    if key not in _LOADED:
        training = ensure_trained(name, cache, progress)
        cfg = train_config(name, cache)
        trained = load_trained(Path(cfg.out_dir) / CHECKPOINT)
        B = BATCH[name]
        m0 = trained.prior(B, seed=PRIOR_SEED)
        ref = reference(name, trained, m0, cache, progress)
        model_key = (f"{name}:step{trained.step}:B{B}:s{PRIOR_SEED}:ref{REFERENCE.label}"
                     f"@{REFERENCE_NFES[-1]}:t0{T0}")
        exact = exact_target(name, trained, m0, cache)
        _LOADED[key] = TrainedModel(name, trained.model, trained.bridge, m0, ref["target"], exact, model_key,
                                    ref["convergence"], training, describe(name, trained.model, cfg),
                                    cache / name / "errors.json")
    return _LOADED[key]


def exact_target(name: str, trained, m0: torch.Tensor, cache: Path) -> torch.Tensor | None:
    """E[x1 | m(T_END)] of the exact flow from m0 (DOP853, rtol = atol = 1e-9) for the exact
    mixtures, float64 [B, D], cached in <cache>/<name>/exact_*.pt; None for the other models."""
    mixture = exact_mixture(name)
    if mixture is None:
        return None
    path = cache / name / f"exact_B{len(m0)}_s{PRIOR_SEED}.pt"
    if path.is_file():
        return torch.load(path)
    m_end = ode_solution(mixture, trained.bridge, m0.double(), T0, T_END, rtol=1e-9, atol=1e-9)
    target = mixture.posterior_mean(trained.bridge, m_end, T_END)
    torch.save(target, path)
    return target


def reference_checks() -> dict[str, tuple[Setting, int]]:
    """The solutions compared with the target: name -> (setting, NFE): the target's method at the
    coarser REFERENCE_NFES and CROSS_CHECK at the target's NFE."""
    fine = REFERENCE_NFES[-1]
    checks = {f"rmse_nfe{n}_vs_nfe{fine}": (REFERENCE, n) for n in REFERENCE_NFES[:-1]}
    checks[f"rmse_cross_{CROSS_CHECK.variant}_order{CROSS_CHECK.order}_nfe{fine}"] = (CROSS_CHECK, fine)
    return checks


def reference(name: str, trained, m0: torch.Tensor, cache: Path, progress: bool = True) -> dict:
    """{"target" [B, ...] float64, "convergence": {...}} (module docstring), cached with torch.save;
    checks (`reference_checks`) missing from a cached file are computed and added."""
    path = (cache / name / f"reference_B{len(m0)}_s{PRIOR_SEED}_step{trained.step}"
            f"_nfe{'-'.join(map(str, REFERENCE_NFES))}.pt")
    net, bridge = trained.model, trained.bridge
    fine = REFERENCE_NFES[-1]
    if path.is_file():
        result = torch.load(path)
    else:
        start = time.perf_counter()
        with torch.no_grad():
            target = run_settings(net, bridge, m0, fine, [REFERENCE], T0, MAX_ROWS)[0]
        seconds = time.perf_counter() - start
        if progress:
            print(f"[{name}] target: NFE {fine}, {seconds:.0f} s", flush=True)
        result = {"target": target, "convergence": {
            "method": REFERENCE.to_json(), "nfes": list(REFERENCE_NFES), "target_nfe": fine,
            "B": len(m0), "prior_seed": PRIOR_SEED, "t0": T0,
            "target_rms": float(target.pow(2).mean().sqrt()), "seconds": {str(fine): seconds}}}
    conv, target = result["convergence"], result["target"]
    changed = False
    for key, (setting, nfe) in reference_checks().items():
        if key in conv:
            continue
        start = time.perf_counter()
        with torch.no_grad():
            out = run_settings(net, bridge, m0, nfe, [setting], T0, MAX_ROWS)[0]
        conv[key] = float(rmse(out.unsqueeze(0), target)[0])
        conv["seconds"][key] = time.perf_counter() - start
        changed = True
        if progress:
            print(f"[{name}] {key}: {conv[key]:.2e} ({conv['seconds'][key]:.0f} s)", flush=True)
    checks = {k: {"setting": s.to_json(), "nfe": n} for k, (s, n) in reference_checks().items()}
    if changed or conv.get("check_settings") != checks:
        conv["check_settings"] = checks
        torch.save(result, path)
    return result


# ----------------------------------------------------------------------------- scores


def _setting_key(nfe: int, setting: Setting) -> str:
    return f"{nfe}|{json.dumps(setting.to_json(), sort_keys=True)}"


def _read_cache(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def candidate_errors(
    model_name: str, nfe: int, settings: Iterable, cache: Path = DEFAULT_CACHE, progress: bool = False,
) -> torch.Tensor:
    """RMSEs [C] float64 of `settings` (Settings, setting JSON objects or (T, q, order[, fractions]))
    on model `model_name` at this NFE against its converged target; the uncached ones are scored
    (batched) and stored in <cache>/<model_name>/errors.json ({model key: {"<nfe>|<setting json>":
    rmse}}, merged under a file lock, so concurrent callers keep each other's scores)."""
    settings = [Setting.coerce(s) for s in settings]
    if not settings:
        return torch.zeros(0, dtype=torch.float64)
    tm = model(model_name, Path(cache), progress)
    keys = [_setting_key(nfe, s) for s in settings]
    known = _read_cache(tm.errors_path).get(tm.key, {})
    missing: dict[str, Setting] = {}
    for k, s in zip(keys, settings, strict=True):
        if k not in known and k not in missing:
            missing[k] = s
    if missing:
        new = dict(zip(missing, tm.score(nfe, list(missing.values())).tolist(), strict=True))
        with open(tm.errors_path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = _read_cache(tm.errors_path)
            data.setdefault(tm.key, {}).update(new)
            tmp = tm.errors_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, tm.errors_path)
        known = {**known, **new}
    return torch.tensor([known[k] for k in keys], dtype=torch.float64)


def _per_draw(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error per setting and draw, mean over coordinates: [C, B] float64."""
    diff = outputs.to(torch.float64) - target.to(torch.float64).unsqueeze(0)
    return diff.reshape(diff.shape[0], diff.shape[1], -1).pow(2).mean(2)


def draw_errors(
    model_name: str, nfe: int, settings: Iterable, cache: Path = DEFAULT_CACHE, progress: bool = False,
) -> dict[str, torch.Tensor | None]:
    """Per-draw squared errors (mean over coordinates) of `settings` at this NFE: {"target": [C, B]
    against the model's converged solution, "exact": [C, B] against the exact flow's endpoint, or
    None where there is no exact drift}; float64, cached in <cache>/<model_name>/draws.pt (the
    square root of a row's mean is `candidate_errors`'s RMSE)."""
    settings = [Setting.coerce(s) for s in settings]
    tm = model(model_name, Path(cache), progress)
    path = tm.errors_path.with_name("draws.pt")
    store = torch.load(path) if path.is_file() else {}
    known = store.setdefault(tm.key, {})
    keys = [_setting_key(nfe, s) for s in settings]
    missing = list(dict.fromkeys(k for k in keys if k not in known))
    if missing:
        chosen = {k: s for k, s in zip(keys, settings, strict=True) if k in missing}
        out = tm.outputs(nfe, [chosen[k] for k in missing])
        to_target = _per_draw(out, tm.target)
        to_exact = _per_draw(out, tm.exact) if tm.exact is not None else None
        for i, k in enumerate(missing):
            known[k] = (to_target[i].clone(), None if to_exact is None else to_exact[i].clone())
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(store, tmp)
        os.replace(tmp, path)
    target = torch.stack([known[k][0] for k in keys])
    exact = None if tm.exact is None else torch.stack([known[k][1] for k in keys])
    return {"target": target, "exact": exact}


def evaluate(
    settings_by_nfe: Mapping[int, object], nfes: Iterable[int] = NFES, models: Sequence[str] = tuple(MODELS),
    cache: Path = DEFAULT_CACHE, progress: bool = True,
) -> dict:
    """Per model and NFE (those of `nfes` that settings_by_nfe holds): the setting's RMSE, the
    published setting's RMSE and their ratio, plus per model its reference convergence, training
    record, architecture, worst ratio and the NFEs with ratio > 1. Returns {"models": {name: {...,
    "table": {nfe: {...}}}}, "nfes": [...], "skipped_nfes": [...]}."""
    settings = {int(n): Setting.coerce(s) for n, s in settings_by_nfe.items()}
    nfes = sorted(set(nfes))
    used = [n for n in nfes if n in settings]
    if not used:
        raise ValueError(f"no setting for any of the NFEs {nfes}")
    out: dict = {"nfes": used, "skipped_nfes": [n for n in nfes if n not in settings], "models": {}}
    for name in models:
        tm = model(name, Path(cache), progress)
        start = time.perf_counter()
        table = {}
        for nfe in used:
            s, pub = settings[nfe], published_setting(nfe)
            e, e_pub = candidate_errors(name, nfe, [s, pub], cache).tolist()
            table[nfe] = {"setting": s.to_json(), "label": s.label, "same_as_published": s == pub,
                          "rmse": e, "published_rmse": e_pub, "ratio": e / e_pub}
            if progress:
                print(f"[{name}] NFE {nfe:2d}: rmse {e:.3e}  published {e_pub:.3e}  ratio {e / e_pub:.3f}",
                      flush=True)
        ratios = {n: r["ratio"] for n, r in table.items()}
        tuned = {n: r for n, r in ratios.items() if not table[n]["same_as_published"]}
        worst = max(tuned, key=tuned.get) if tuned else None
        smallest_50 = min(min(r["rmse"], r["published_rmse"]) for n, r in table.items() if n == max(used))
        conv = tm.convergence
        gap = conv[f"rmse_nfe{REFERENCE_NFES[-2]}_vs_nfe{REFERENCE_NFES[-1]}"]
        out["models"][name] = {
            "key": tm.key, "architecture": tm.architecture, "training": tm.training,
            "reference": conv,
            "reference_margin": {"largest_nfe": max(used), "smallest_rmse_there": smallest_50,
                                 "over_reference_gap": smallest_50 / gap if gap > 0 else float("inf")},
            "worst_ratio": tuned[worst] if tuned else 1.0, "worst_nfe": worst,
            "nfes_same_as_published": [n for n in used if table[n]["same_as_published"]],
            "nfes_ratio_above_1": [n for n, r in ratios.items() if r > 1],
            "seconds_this_call": time.perf_counter() - start,
            "table": table,
        }
    return out


# ----------------------------------------------------------------------------- files


def load_settings(path: str | os.PathLike) -> dict[int, Setting]:
    """NFE -> Setting from a JSON file: a package defaults file ("entries": {"nfe": {"setting": ...,
    "source", ...}}, any format version), a psb_fast.tune file ("settings": {"nfe": {"T", "q",
    "order", ...}}) or a plain object {"nfe": setting JSON (Setting.to_json form) or {"setting": ...}}.
    A setting within 1e-9 in T of the published one (same q, order, grid, variant) is taken as
    `published_setting(nfe)` exactly, so it scores as the published sampler (ratio 1)."""
    payload = json.loads(Path(path).read_text())
    if isinstance(payload, dict) and isinstance(payload.get("entries"), dict):
        payload = payload["entries"]
    elif isinstance(payload, dict) and isinstance(payload.get("settings"), dict):
        payload = payload["settings"]
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a JSON object mapping NFE -> setting")
    out = {}
    for key, value in payload.items():
        if isinstance(value, dict) and "setting" in value:
            value = value["setting"]
        nfe, setting = int(key), Setting.coerce(value)
        pub = published_setting(nfe)
        if abs(setting.T - pub.T) <= 1e-9 and setting.replace(T=pub.T) == pub:
            setting = pub
        out[nfe] = setting
    return out


def markdown(report: dict) -> str:
    names = list(report["result"]["models"])
    models = report["result"]["models"]
    lines = [
        "# Settings vs the published sampler on trained models", "",
        f"Command: `{report['command']}` ({report['runtime_s']:.0f} s, {report['platform']}).",
        f"Settings: `{report['settings_file']}` (sha256 {report['settings_sha256'][:12]}).", "",
        "Ratio = pathwise RMSE of the setting / RMSE of the published setting (order 2, q = 2,",
        "published T), both against the model's own converged solution (order 3, q = 2, T = 0.999, hop,",
        f"multistep-corrector, NFE {REFERENCE_NFES[-1]}) from the same prior draws.",
        "**bold** = ratio > 1 (worse than published); `=` the setting is the published one.", "",
        f"| model | architecture | training | B | reference NFE {REFERENCE_NFES[-2]} vs {REFERENCE_NFES[-1]} "
        "| cross-check |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in names:
        m = models[name]
        c = m["reference"]
        cross = next(v for k, v in c.items() if k.startswith("rmse_cross"))
        gap = c[f"rmse_nfe{REFERENCE_NFES[-2]}_vs_nfe{REFERENCE_NFES[-1]}"]
        lines.append(f"| {name} | {m['architecture']} | {m['training'].get('seconds', 0) / 60:.1f} min | "
                     f"{c['B']} | {gap:.1e} | {cross:.1e} |")
    lines += ["", "| model | worst ratio of a non-published setting (NFE) | NFEs with ratio > 1 "
              "| smallest NFE-"
              f"{max(report['result']['nfes'])} RMSE / reference gap |", "|---|---:|---|---:|"]
    for name in names:
        m = models[name]
        above = ", ".join(map(str, m["nfes_ratio_above_1"])) or "none"
        lines.append(f"| {name} | {m['worst_ratio']:.3f} ({m['worst_nfe'] or '-'}) | {above} | "
                     f"{m['reference_margin']['over_reference_gap']:.0f}x |")
    lines += ["", "| NFE | setting | " + " | ".join(names) + " |", "|---:|---|" + "---:|" * len(names)]
    for nfe in report["result"]["nfes"]:
        first = models[names[0]]["table"][nfe]
        cells = []
        for name in names:
            r = models[name]["table"][nfe]
            text = f"{r['ratio']:.3f}"
            cells.append("=" if r["same_as_published"] else (f"**{text}**" if r["ratio"] > 1 else text))
        lines.append(f"| {nfe} | {first['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", type=Path, help="JSON: a defaults file, a tune file or {nfe: setting}")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for trained_check.json/.md")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="run folders, targets, score caches")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--nfes", type=int, nargs="*", default=list(NFES))
    ap.add_argument("--train-only", action="store_true", help="train and build the targets, then stop")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    if args.train_only:
        for name in args.models:
            tm = model(name, args.cache)
            print(f"[{name}] {tm.architecture}; trained in {tm.training.get('seconds', 0):.0f} s; "
                  f"reference {json.dumps(tm.convergence)}", flush=True)
        return 0
    if args.settings is None:
        ap.error("--settings is required (unless --train-only)")
    result = evaluate(load_settings(args.settings), args.nfes, args.models, args.cache)
    argv_text = " ".join(argv) if argv is not None else " ".join(sys.argv[1:])
    report = {
        "command": f"python -m studies.trained_models {argv_text}".strip(),
        "runtime_s": time.time() - start, "settings_file": str(args.settings),
        "settings_sha256": hashlib.sha256(args.settings.read_bytes()).hexdigest(),
        "platform": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                    f"{args.threads} thread(s)",
        "result": result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trained_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "trained_check.md").write_text(markdown(report))
    for name, m in result["models"].items():
        print(f"{name}: worst non-published ratio {m['worst_ratio']:.3f} at NFE {m['worst_nfe']}; "
              f"ratio > 1 at {m['nfes_ratio_above_1'] or 'no NFE'}")
    print(f"wrote {args.out / 'trained_check.json'} and {args.out / 'trained_check.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
