"""Evaluation during training: samples at each eval NFE, figures, and the energy distance to the data.

    numbers, images = evaluate(cfg, bridge, ema_model, source, out_dir / "eval", "step0001000", device)

2-D data: a data-vs-samples panel per NFE, phase-space trajectories at the largest NFE and the
energy distance per NFE (docs/math.md notation: samples x1 against data points). Other shapes: a
grid of at most IMAGE_GRID_MAX samples per NFE. Called by psb_fast.train on rank 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .bridge import PhaseBridge
from .config import TrainConfig
from .data import DataSource
from .metrics import energy_distance as energy_distance  # re-exported (its home: psb_fast.metrics)
from .sampler import PhaseSampler
from .seeds import derive_seed

IMAGE_GRID_MAX = 64


@torch.no_grad()
def evaluate(cfg: TrainConfig, bridge: PhaseBridge, model: nn.Module, source: DataSource, folder: Path,
             tag: str, device: torch.device) -> tuple[dict, list[str]]:
    """Sample with PhaseSampler(bridge, nfe) (package defaults) at each of cfg.eval_nfes; write PNGs.

    2-D data: a data-vs-samples panel per NFE, phase-space trajectories (x, v, x1_hat) at the
    largest NFE, and the energy distance to the data per NFE (returned as "energy_nfe<N>").
    Other shapes: a grid of at most 64 samples per NFE. Prior noise is seeded by cfg.seed, so
    evaluations at different steps start from the same m0. Returns (numbers, PNG paths).
    """
    from . import plots

    toy = source.x_shape == (2,)
    n = cfg.eval_samples if toy else min(cfg.eval_samples, IMAGE_GRID_MAX)
    if source.size is not None:
        n = min(n, source.size)
    data, labels = source.all(n)
    cond = labels.to(device) if cfg.conditional and labels is not None else None
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "eval"))
    m0 = bridge.sample_prior((n, *source.x_shape), generator=generator, dtype=torch.float32).to(device)
    solver = "ode" if bridge.mode == "probODE" else "sde"
    folder.mkdir(parents=True, exist_ok=True)
    numbers: dict = {}
    images: list[str] = []
    samples: dict[str, torch.Tensor] = {}
    for nfe in sorted(cfg.eval_nfes):
        sampler = PhaseSampler(bridge, nfe, solver=solver, backend=cfg.backend)
        trajectory = None
        if toy and nfe == max(cfg.eval_nfes):
            x1, trajectory = sampler.sample(model, m0, cond=cond, seed=cfg.seed, return_trajectory=True)
        else:
            x1 = sampler.sample(model, m0, cond=cond, seed=cfg.seed)
        x1 = x1.float().cpu()
        if toy:
            samples[plots.sampler_label(sampler)] = x1
            numbers[f"energy_nfe{nfe}"] = energy_distance(data, x1)
            if trajectory is not None:
                path = folder / f"{tag}_trajectories.png"
                plots.phase_trajectories(trajectory, path, title=f"{tag}: {plots.sampler_label(sampler)}")
                images.append(str(path))
        else:
            path = folder / f"{tag}_nfe{nfe}.png"
            plots.image_grid(x1, path, title=f"{tag}: {plots.sampler_label(sampler)}")
            images.append(str(path))
    if toy:
        path = folder / f"{tag}_samples.png"
        plots.toy_panels(data, samples, path, title=f"{tag}: samples with the default settings per NFE")
        images.append(str(path))
    return numbers, images
