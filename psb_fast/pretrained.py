"""A trained model back from its checkpoint, ready for PhaseSampler (the CLI's sample and tune).

    trained = load_trained("runs/toy/checkpoint.pt")
    x1 = PhaseSampler(trained.bridge, nfe=10).sample(trained.model, trained.prior(64))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .bridge import PhaseBridge
from .checkpoint import load_checkpoint
from .config import TrainConfig, config_from_dict
from .data import load_data
from .distributed import resolve_device
from .models import make_model


@dataclass
class Trained:
    """model (eval mode, the EMA weights unless asked otherwise), its bridge and run config, the
    shape of one data point x_shape and the class count (None: unconditional)."""

    model: nn.Module
    bridge: PhaseBridge
    config: TrainConfig
    x_shape: tuple[int, ...]
    num_classes: int | None
    step: int

    def prior(self, n: int, seed: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
        """n prior draws m0 [n, 2C, ...] (float32) from a generator seeded with `seed`."""
        generator = torch.Generator().manual_seed(seed)
        m0 = self.bridge.sample_prior((n, *self.x_shape), generator=generator, dtype=torch.float32)
        return m0.to(device)


def load_trained(
    path: str | os.PathLike, device: str | torch.device = "cpu", ema: bool = True
) -> Trained:
    """Rebuild the network of a psb_fast training checkpoint and load its weights.

    path: a checkpoint.pt written by psb_fast.train (or its run folder). device: see
    `resolve_device`. ema: load the EMA weights (the ones to sample with) instead of the raw ones.
    """
    device = resolve_device(device)
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    state = load_checkpoint(path, map_location="cpu")
    for key in ("config", "model", "ema", "step"):
        if key not in state:
            raise ValueError(f"{str(path)!r} is not a psb_fast training checkpoint (no {key!r} entry)")
    cfg = config_from_dict(state["config"], source=str(path))
    if "x_shape" in state:
        x_shape, num_classes = tuple(state["x_shape"]), state["num_classes"]
    else:
        source = load_data(cfg.data, split="train", seed=cfg.seed)
        x_shape, num_classes = source.x_shape, (source.num_classes if cfg.conditional else None)
    model = make_model(cfg.model, x_shape, num_classes, **cfg.model_kwargs)
    if ema:
        prefix = "module."
        weights = {k[len(prefix):]: v for k, v in state["ema"].items() if k.startswith(prefix)}
    else:
        weights = state["model"]
    model.load_state_dict(weights)
    model.to(device).eval()
    bridge = PhaseBridge(cfg.p, cfg.k, cfg.varx, cfg.varv, cfg.mode)
    return Trained(model, bridge, cfg, tuple(x_shape), num_classes, int(state["step"]))
