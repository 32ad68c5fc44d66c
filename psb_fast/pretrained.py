"""A trained model back from its checkpoint, ready for PhaseSampler (the CLI's sample and tune).

    trained = load_trained("runs/toy/checkpoint.pt")
    x1 = PhaseSampler(trained.bridge, nfe=10).sample(trained.model, trained.prior(64))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .bridge import PhaseBridge
from .checkpoint import check_tensors, load_checkpoint
from .config import TrainConfig, config_from_dict
from .data import load_data
from .distributed import resolve_device
from .models import make_model

_EMA_PREFIX = "module."  # torch.optim.swa_utils.AveragedModel's prefix of the averaged model's keys


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

    Raises ValueError naming the file before any weights are loaded when the checkpoint does not fit
    its own config: entries missing, x_shape / num_classes malformed, weights of other keys, shapes
    or dtypes (the checks of a training resume, checkpoint.check_tensors), or non-finite weights. A
    bad checkpoint.pt falls back to a good checkpoint.pt.prev with a warning, as a resume does.
    """
    device = resolve_device(device)
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    built: dict = {}
    state = load_checkpoint(path, map_location="cpu", check=partial(_check_state, ema=ema, built=built))
    model = built["make"]()
    model.load_state_dict(built["weights"])
    model.to(device).eval()
    cfg = built["config"]
    bridge = PhaseBridge(cfg.p, cfg.k, cfg.varx, cfg.varv, cfg.mode)
    return Trained(model, bridge, cfg, built["x_shape"], built["num_classes"], int(state["step"]))


def _check_state(state: dict, ema: bool, built: dict) -> None:
    """ValueError saying what is wrong unless `state` rebuilds its own model with its weights; fills
    `built` with the config, x_shape, num_classes, a model factory and the weights to load."""
    for key in ("config", "model", "ema", "step"):
        if key not in state:
            raise ValueError(f"not a psb_fast training checkpoint (no {key!r} entry)")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"entry 'step' must be an int >= 0, got {step!r}")
    try:
        cfg = config_from_dict(state["config"], source="entry 'config'")
    except TypeError as err:
        raise ValueError(str(err)) from None
    if "x_shape" in state:
        x_shape, num_classes = _shape_entries(state["x_shape"], state.get("num_classes"))
    else:  # checkpoints written before x_shape was recorded: the data source says
        source = load_data(cfg.data, split="train", seed=cfg.seed)
        x_shape, num_classes = source.x_shape, (source.num_classes if cfg.conditional else None)

    def make() -> nn.Module:
        return make_model(cfg.model, x_shape, num_classes, **cfg.model_kwargs)

    try:
        with torch.device("meta"):  # the shapes to check, without allocating a model of any size
            expected = make().state_dict()
    except (TypeError, ValueError) as err:
        raise ValueError(f"its config and x_shape {list(x_shape)} do not build a model: {err}") from None
    if ema:
        saved = state["ema"]
        if isinstance(saved, dict):  # an AveragedModel's state: "module." + the model's keys, n_averaged
            saved = {k: v for k, v in saved.items() if k != "n_averaged"}
        check_tensors("ema", saved, {_EMA_PREFIX + k: v for k, v in expected.items()})
        weights = {k[len(_EMA_PREFIX):]: v for k, v in saved.items()}
    else:
        weights = state["model"]
        check_tensors("model", weights, expected)
    if not all(bool(torch.isfinite(w).all()) for w in weights.values() if w.is_floating_point()):
        raise ValueError(f"entry {'ema' if ema else 'model'!r} holds non-finite weights")
    built.update(config=cfg, x_shape=x_shape, num_classes=num_classes, make=make, weights=weights)


def _shape_entries(x_shape: object, num_classes: object) -> tuple[tuple[int, ...], int | None]:
    """The checkpoint's x_shape (a list of 1 to 3 positive ints) and num_classes (None or an int >= 1)."""
    if not isinstance(x_shape, (list, tuple)) or not 1 <= len(x_shape) <= 3 or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in x_shape):
        raise ValueError(f"entry 'x_shape' must be a list of 1 to 3 positive ints, got {x_shape!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"entry 'num_classes' must be None or an int >= 1, got {num_classes!r}")
    return tuple(x_shape), num_classes
