"""The example configs in examples/configs load, build their model, and the small ones train."""

from pathlib import Path

import pytest
import torch

from psb_fast.config import apply_overrides, load_config
from psb_fast.models import make_model
from psb_fast.train import train

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.toml"))
IMAGE_SHAPES = {"images": (3, 32, 32), "multi_gpu": (3, 32, 32)}


def test_the_four_examples_exist():
    assert {p.stem for p in CONFIGS} == {"toy", "digits", "images", "multi_gpu"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_builds_its_model(path):
    cfg = load_config(path)
    shape = IMAGE_SHAPES.get(path.stem, (1, 8, 8) if cfg.data == "digits" else (2,))
    model = make_model(cfg.model, shape, 10 if cfg.conditional else None, **cfg.model_kwargs)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", ["toy", "digits"])
def test_small_examples_train(tmp_path, name):
    torch.set_num_threads(1)
    cfg = load_config(next(p for p in CONFIGS if p.stem == name))
    cfg = apply_overrides(cfg, ["steps=2", "batch_size=16", "eval_samples=0", "device=cpu", "ckpt_every=0",
                                f"out_dir={tmp_path / name}"])
    summary = train(cfg, progress=False)
    assert summary["step"] == 2 and Path(summary["checkpoint"]).is_file()
