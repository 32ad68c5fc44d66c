"""Plots: PNG files are written, decode, have the expected layout, and bad input is refused."""

import numpy as np
import pytest
import torch
from PIL import Image

import psb_fast
from psb_fast.oracles import mixture_2d_grid
from psb_fast.plots import image_grid, phase_trajectories, toy_comparison, toy_panels

torch.set_num_threads(1)


def _read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


@pytest.mark.slow
def test_toy_panels(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(300, 2, generator=g)
    path = tmp_path / "sub" / "toy.png"
    samples = {"NFE 5": torch.randn(100, 2, generator=g), "NFE 10": torch.rand(50, 2, generator=g)}
    toy_panels(data, samples, path)
    wide = _read_png(path)
    toy_panels(data, {}, tmp_path / "one.png")
    narrow = _read_png(tmp_path / "one.png")
    assert wide.shape[1] > 2.5 * narrow.shape[1] and wide.shape[0] == narrow.shape[0]
    assert (wide < 128).any()
    with pytest.raises(ValueError, match=r"samples\['bad'\]"):
        toy_panels(data, {"bad": torch.randn(4, 3)}, tmp_path / "x.png")
    with pytest.raises(TypeError, match="samples"):
        toy_panels(data, [torch.randn(4, 2)], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_toy_comparison_draws_a_row_per_nfe_and_a_column_per_setting(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(200, 2, generator=g)
    settings = {name: torch.randn(100, 2, generator=g) for name in ("defaults", "tuned", "published")}
    toy_comparison(data, {"NFE 5": settings, "NFE 10": settings, "NFE 20": settings}, tmp_path / "grid.png")
    toy_comparison(data, {"NFE 5": {"defaults": settings["defaults"]}}, tmp_path / "one.png")
    grid, one = _read_png(tmp_path / "grid.png"), _read_png(tmp_path / "one.png")
    assert grid.shape[0] > 2.5 * one.shape[0] and grid.shape[1] > 1.8 * one.shape[1]
    with pytest.raises(ValueError, match=r"rows\['NFE 5'\]\['tuned'\]"):
        toy_comparison(data, {"NFE 5": {"tuned": torch.randn(4, 3)}}, tmp_path / "x.png")
    with pytest.raises(TypeError, match="rows"):
        toy_comparison(data, {"NFE 5": {}}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_toy_comparison_keeps_a_column_per_setting_name_across_rows(tmp_path):
    g = torch.Generator().manual_seed(1)
    data = torch.randn(200, 2, generator=g)
    full = {name: torch.randn(100, 2, generator=g) for name in ("defaults", "tuned", "learned", "published")}
    partial = {k: v for k, v in full.items() if k != "learned"}  # a row where nothing was learned
    notes = {"NFE 5": {"learned": "nothing learned"}, "NFE 10": {"tuned": "T 0.8 (kept)"}}
    toy_comparison(data, {"NFE 5": partial, "NFE 10": full}, tmp_path / "cols.png", notes=notes,
                   columns=["defaults", "tuned", "learned", "published"])
    toy_comparison(data, {"NFE 5": full, "NFE 10": full}, tmp_path / "full.png")
    cols, both = _read_png(tmp_path / "cols.png"), _read_png(tmp_path / "full.png")
    assert cols.shape == both.shape  # 5 columns both: the missing cell stays in its column, empty

    def ink(image):  # share of non-white pixels in the first row's "learned" cell (the 4th column)
        width = image.shape[1] // 5
        return (image[: image.shape[0] // 2, 3 * width + 10: 4 * width - 10] < 250).mean()

    assert ink(cols) < ink(both) / 3  # only the note's text, no axes or points
    with pytest.raises(ValueError, match="missing"):
        toy_comparison(data, {"NFE 5": full}, tmp_path / "x.png", columns=["defaults"])
    with pytest.raises(TypeError, match="notes"):
        toy_comparison(data, {"NFE 5": full}, tmp_path / "x.png", notes={"NFE 5": {"tuned": 1}})
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_phase_trajectories_from_sampler(tmp_path):
    bridge = psb_fast.PhaseBridge()
    mixture = mixture_2d_grid()
    m0 = bridge.sample_prior((32, 2), generator=torch.Generator().manual_seed(0))
    sampler = psb_fast.PhaseSampler(bridge, nfe=5, backend="reference")
    _, trajectory = sampler.sample(mixture.as_model(bridge), m0, return_trajectory=True)
    path = tmp_path / "traj.png"
    phase_trajectories(trajectory, path, n_paths=16)
    image = _read_png(path)
    assert image.shape[1] > 2 * image.shape[0]
    assert (image.std(axis=2) > 30).any()
    phase_trajectories(trajectory[:1], tmp_path / "single.png")
    assert _read_png(tmp_path / "single.png").size > 0


def test_phase_trajectories_bad_input(tmp_path):
    snap = {"t": 0.1, "x": torch.zeros(4, 2), "v": torch.zeros(4, 2), "x1_hat": torch.zeros(4, 2)}
    cases = [([], "non-empty"), ([{"t": 0.1, "x": torch.zeros(4, 2)}], "keys"),
             ([snap, dict(snap, v=torch.zeros(3, 2))], "same shape"),
             ([dict(snap, x=torch.zeros(4, 3))], r"\[N, 2\]")]
    for trajectory, message in cases:
        with pytest.raises(ValueError, match=message):
            phase_trajectories(trajectory, tmp_path / "t.png")
    with pytest.raises(ValueError, match="n_paths"):
        phase_trajectories([snap], tmp_path / "t.png", n_paths=0)


def test_image_grid_layout(tmp_path):
    x = torch.full((5, 1, 4, 3), -1.0)
    x[2] = 1.0
    image_grid(x, tmp_path / "g.png", nrow=2, scale=1)
    with Image.open(tmp_path / "g.png") as image:
        assert image.mode == "L"
        grid = np.asarray(image)
    assert grid.shape == (3 * 5 + 1, 2 * 4 + 1)
    assert (grid[6:10, 1:4] == 255).all() and grid.sum() == 255 * 12
    rgb = torch.zeros(3, 3, 2, 2)
    rgb[:, 0] = 2.0
    image_grid(rgb, tmp_path / "c.png", scale=3)
    with Image.open(tmp_path / "c.png") as image:
        assert image.mode == "RGB"
        colour = np.asarray(image)
    assert colour.shape == (3 * (2 * 3 + 1), 3 * (2 * 3 + 1), 3)
    assert tuple(colour[3, 3]) == (255, 128, 128)
    image_grid(torch.zeros(4, 1, 8, 8), tmp_path / "auto.png")
    with Image.open(tmp_path / "auto.png") as image:
        assert image.size == (19 * 14, 19 * 14)


def test_image_grid_bad_input(tmp_path):
    for x in (torch.zeros(2, 2, 4, 4), torch.zeros(2, 4, 4), torch.zeros(0, 1, 4, 4)):
        with pytest.raises(ValueError, match="B, C, H, W"):
            image_grid(x, tmp_path / "g.png")
    with pytest.raises(TypeError, match="tensor"):
        image_grid(np.zeros((1, 1, 4, 4)), tmp_path / "g.png")
    for kwargs in ({"nrow": 0}, {"scale": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            image_grid(torch.zeros(1, 1, 4, 4), tmp_path / "g.png", **kwargs)


@pytest.mark.slow
def test_titles_and_settings_label(tmp_path):
    bridge = psb_fast.PhaseBridge()
    sampler = psb_fast.PhaseSampler(bridge, nfe=10, T=0.7, order=2, grid="rev-quad", backend="reference")
    assert psb_fast.plots.sampler_label(sampler) == "NFE 10, T 0.7, order 2, rev-quad grid"
    x = torch.zeros(4, 1, 8, 8)
    image_grid(x, tmp_path / "plain.png", scale=1)
    image_grid(x, tmp_path / "titled.png", scale=1, title="NFE 10, T 0.7, order 2, rev-quad grid: 4 samples")
    plain, titled = _read_png(tmp_path / "plain.png"), _read_png(tmp_path / "titled.png")
    assert titled.shape[1] == plain.shape[1] and titled.shape[0] > plain.shape[0]
    assert (titled[: titled.shape[0] - plain.shape[0]] < 128).any()  # text drawn on the band
    data = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    toy_panels(data, {"a": data}, tmp_path / "t.png", title="settings")
    for call in (lambda: toy_panels(data, {}, tmp_path / "x.png", title=3),
                 lambda: image_grid(x, tmp_path / "x.png", title=b"x")):
        with pytest.raises(TypeError, match="title"):
            call()
    assert not (tmp_path / "x.png").exists()
