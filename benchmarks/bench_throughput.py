"""Sampler and training throughput (issue 6, items 3 and 4), run by `psb-fast bench`.

Sampler: samples/s of PhaseSampler.sample against a loop written the published way
(bench_sampler.published_loop: float64 state, per-step 50,000-point Riemann-sum coefficients,
torch.cat of x and v), both with the published settings (`published_setting(nfe)`: T =
published_T(nfe), order 2, rev-quad, hop) on an untrained network: a small MLP on 2-D data and the
digits UNet ([1, 8, 8]).
On CUDA, PhaseSampler also runs with cuda_graph=True. Medians of interleaved runs, no grad.

Training: optimizer steps/s of psb_fast.train.train (summary["steps_per_s"], checkpoint time
excluded) with the fused data path (backend "cpu" on CPU, "triton" on CUDA) against the
plain-PyTorch one (backend "float64"), on toy (gmm-grid, MLP) and digits (UNet); after one
untimed 2-step run per backend, the backends' timed runs alternate and the median over runs is reported.

Every figure is {"value": v, "unit": u}.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch

from psb_fast.bridge import PhaseBridge
from psb_fast.config import TrainConfig
from psb_fast.models import make_model
from psb_fast.sampler import PhaseSampler
from psb_fast.settings import published_setting

from ._timing import interleaved_medians, synchronizer
from .bench_sampler import published_loop


def figure(value: float, unit: str) -> dict:
    """A measured number with its unit."""
    return {"value": value, "unit": unit}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch.set_num_threads(n) inside the block, the previous count after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class SamplerModel:
    """A network for the sampler benchmark: name, x's shape (without batch) and its constructor."""

    name: str
    x_shape: tuple[int, ...]
    build: Callable[[], torch.nn.Module]


SAMPLER_MODELS = {
    "mlp-2d": SamplerModel("mlp-2d", (2,), lambda: make_model("mlp", (2,), hidden=128, depth=3)),
    "unet-digits": SamplerModel("unet-digits", (1, 8, 8), lambda: make_model("unet", (1, 8, 8))),
}
SAMPLER_SETTINGS = {  # model -> (batches, nfes) per mode
    "quick": {"mlp-2d": ((256, 4096), (5, 10)), "unet-digits": ((16,), (5, 10))},
    "full": {"mlp-2d": ((256, 4096, 16384), (5, 10, 20, 50)), "unet-digits": ((64, 256), (5, 10, 20))},
}
THREADS = 1  # torch threads for these small networks: more only adds contention on a shared CPU
TRAIN_SETTINGS = {  # workload -> (data, model, batch, steps) per mode
    "quick": {"toy": ("gmm-grid", "mlp", 256, 20), "digits": ("digits", "unet", 16, 4)},
    "full": {"toy": ("gmm-grid", "mlp", 1024, 300), "digits": ("digits", "unet", 128, 60)},
}


def sampler_throughput(
    device: str, quick: bool, reps: int | None = None, threads: int = THREADS, errors: list | None = None
) -> list[dict]:
    """Per model, batch and NFE: samples/s of each implementation ("PhaseSampler", "published loop",
    and on CUDA "PhaseSampler + CUDA graph"), with `threads` torch threads. A CUDA-graph capture
    that fails is appended to `errors` ({"model", "batch", "nfe", "impl", "error"}) and left out."""
    with torch_threads(threads):
        return _sampler_rows(device, quick, reps, [] if errors is None else errors)


def _graph_fn(bridge: PhaseBridge, model: torch.nn.Module, m0: torch.Tensor, nfe: int, T: float,
              where: dict, errors: list) -> Callable[[], object] | None:
    """PhaseSampler(cuda_graph=True).sample, captured now; None (and an `errors` entry) if capture fails."""
    published_at_T = published_setting(nfe).replace(T=T)
    graphed = PhaseSampler(bridge, nfe, published_at_T, cuda_graph=True)
    fn = partial(graphed.sample, model, m0)
    try:
        with torch.no_grad():
            fn()
    except Exception as err:  # a model that cannot be captured: record, time the rest
        errors.append({**where, "impl": "PhaseSampler + CUDA graph", "error": f"{type(err).__name__}: {err}"})
        return None
    return fn


def _sampler_rows(device: str, quick: bool, reps: int | None, errors: list) -> list[dict]:
    settings = SAMPLER_SETTINGS["quick" if quick else "full"]
    reps = reps or (2 if quick else 7)
    bridge = PhaseBridge()
    sync = synchronizer(device)
    rows = []
    for name in settings:
        spec = SAMPLER_MODELS[name]
        model = spec.build().to(device).eval()
        batches, nfes = settings[name]
        for batch in batches:
            gen = torch.Generator().manual_seed(0)
            m0 = bridge.sample_prior((batch, *spec.x_shape), generator=gen).to(device)
            for nfe in nfes:
                T = published_setting(nfe).T
                ours = PhaseSampler(bridge, nfe, published_setting(nfe), backend="auto")
                fns = {
                    "PhaseSampler": partial(ours.sample, model, m0),
                    "published loop": partial(published_loop, model, m0, bridge, nfe, T),
                }
                if device == "cuda":
                    where = {"model": name, "batch": figure(batch, "samples"), "nfe": figure(nfe, "NFE")}
                    graph_fn = _graph_fn(bridge, model, m0, nfe, T, where, errors)
                    if graph_fn is not None:
                        fns["PhaseSampler + CUDA graph"] = graph_fn
                with torch.no_grad():
                    medians = interleaved_medians(fns, warmup=1, reps=reps, sync=sync)
                for impl, seconds in medians.items():
                    rows.append({
                        "model": name, "impl": impl, "batch": figure(batch, "samples"),
                        "nfe": figure(nfe, "NFE"),
                        "median": figure(seconds, "s"), "throughput": figure(batch / seconds, "samples/s"),
                    })
    return rows


def _steps_per_s(data: str, model: str, batch: int, steps: int, device: str, backend: str) -> float:
    """summary["steps_per_s"] of one short train() run in a temporary folder."""
    from psb_fast.train import train

    with tempfile.TemporaryDirectory() as out_dir:
        cfg = TrainConfig(data=data, model=model, batch_size=batch, steps=steps, warmup_steps=1,
                          out_dir=out_dir, ckpt_every=0, log_every=steps, eval_samples=0, device=device,
                          backend=backend)
        return train(cfg, progress=False)["steps_per_s"]


def training_throughput(
    device: str, quick: bool, runs: int | None = None, threads: int = THREADS
) -> list[dict]:
    """Per workload: steps/s of the fused and the reference data path, the median over `runs`
    timed runs each, after one untimed 2-step run per backend; the backends' order alternates;
    `threads` torch threads."""
    with torch_threads(threads):
        return _training_rows(device, quick, runs)


def _training_rows(device: str, quick: bool, runs: int | None) -> list[dict]:
    settings = TRAIN_SETTINGS["quick" if quick else "full"]
    runs = runs or 3
    fused = "triton" if device == "cuda" else "cpu"
    rows = []
    for workload in settings:
        data, model, batch, steps = settings[workload]
        rates: dict[str, list[float]] = {fused: [], "float64": []}
        for backend in rates:
            _steps_per_s(data, model, batch, 2, device, backend)
        for run in range(runs):
            for backend in (fused, "float64") if run % 2 == 0 else ("float64", fused):
                rates[backend].append(_steps_per_s(data, model, batch, steps, device, backend))
        for backend, values in rates.items():
            rows.append({
                "workload": workload, "data": data, "model": model, "backend": backend,
                "batch": figure(batch, "samples"), "steps": figure(steps, "steps"),
                "runs": figure(runs, "runs"), "steps_per_s": figure(statistics.median(values), "steps/s"),
                "samples_per_s": figure(batch * statistics.median(values), "samples/s"),
            })
    return rows
