"""Evaluation figures written as PNG files: 2-D sample scatters, phase-space paths and image grids.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend change, no
window). Every function creates the output's parent folder if needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from PIL import Image

_PANEL_INCHES = 3.2
_DPI = 100
_MIN_GRID_PIXELS = 256


def _points(name: str, value: object) -> np.ndarray:
    """A [N, 2] tensor as a float64 numpy array (N >= 1)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [N, 2], got {type(value).__name__}")
    if value.dim() != 2 or value.shape[1] != 2 or value.shape[0] < 1:
        raise ValueError(f"{name} must have shape [N, 2] with N >= 1, got {tuple(value.shape)}")
    return value.detach().double().cpu().numpy()


def _save(fig: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=_DPI)


def _limits(arrays: list[np.ndarray]) -> tuple[float, float]:
    """Shared square axis limits covering every finite point with a 5 % margin."""
    stacked = np.concatenate(arrays)
    stacked = stacked[np.isfinite(stacked).all(axis=1)]
    if stacked.size == 0:
        return -1.0, 1.0
    lo, hi = float(stacked.min()), float(stacked.max())
    margin = 0.05 * max(hi - lo, 1e-6)
    return lo - margin, hi + margin


def toy_panels(data: torch.Tensor, samples: dict[str, torch.Tensor], path: str | Path) -> None:
    """Side-by-side scatter panels with the same limits: `data` [N, 2] first, then one panel per
    entry of `samples` (title: its key, e.g. "NFE 5"; value [B, 2]).
    """
    if not isinstance(samples, dict):
        raise TypeError(f"samples must be a dict of name -> tensor [B, 2], got {type(samples).__name__}")
    panels = {"data": _points("data", data)}
    panels.update({str(key): _points(f"samples[{key!r}]", value) for key, value in samples.items()})
    lo, hi = _limits(list(panels.values()))
    fig = Figure(figsize=(_PANEL_INCHES * len(panels), _PANEL_INCHES + 0.3))
    for i, (title, points) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5, color="k" if i == 0 else f"C{i - 1}",
                   linewidths=0)
        ax.set(title=title, xlim=(lo, hi), ylim=(lo, hi), aspect="equal")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    _save(fig, path)


def _trajectory_arrays(trajectory: object, n_paths: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Times [S] and, per key x / v / x1_hat, the first n_paths paths [n_paths, S, 2]."""
    if not isinstance(trajectory, list) or not trajectory:
        raise ValueError("trajectory must be a non-empty list of snapshots {'t', 'x', 'v', 'x1_hat'}")
    if isinstance(n_paths, bool) or not isinstance(n_paths, int) or n_paths < 1:
        raise ValueError(f"n_paths must be a positive int, got {n_paths!r}")
    for i, snap in enumerate(trajectory):
        if not isinstance(snap, dict) or not {"t", "x", "v", "x1_hat"} <= set(snap):
            raise ValueError(f"trajectory[{i}] must be a dict with keys 't', 'x', 'v', 'x1_hat', got "
                             f"{sorted(snap) if isinstance(snap, dict) else type(snap).__name__}")
    times = np.array([float(snap["t"]) for snap in trajectory])
    paths = {}
    for key in ("x", "v", "x1_hat"):
        arrays = [_points(f"trajectory[{i}][{key!r}]", snap[key]) for i, snap in enumerate(trajectory)]
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"every snapshot's {key!r} must have the same shape [B, 2], got "
                             f"{sorted({a.shape for a in arrays})}")
        paths[key] = np.stack(arrays, axis=1)[:n_paths]
    return times, paths


def phase_trajectories(trajectory: list[dict], path: str | Path, n_paths: int = 64) -> None:
    """Phase-space figure of a sampling run (PhaseSampler.sample(..., return_trajectory=True)).

    trajectory: snapshots {"t": float, "x", "v", "x1_hat": [B, 2]}, one per network evaluation.
    Three panels for the first n_paths samples: position paths x(t), velocity paths v(t) and the
    path of the data estimate x1_hat(t), each coloured from early (dark) to late t (light), with
    the final points marked.
    """
    times, paths = _trajectory_arrays(trajectory, n_paths)
    span = max(times.max() - times.min(), 1e-12)
    shade = (times - times.min()) / span
    titles = {"x": "position x(t)", "v": "velocity v(t)", "x1_hat": "estimate x1_hat(t)"}
    fig = Figure(figsize=(3 * _PANEL_INCHES + 0.8, _PANEL_INCHES + 0.3))
    for i, key in enumerate(("x", "v", "x1_hat")):
        ax = fig.add_subplot(1, 3, i + 1)
        lines = paths[key]
        if lines.shape[1] > 1:
            segments = np.concatenate([lines[:, :-1, None], lines[:, 1:, None]], axis=2).reshape(-1, 2, 2)
            colours = np.tile(0.5 * (shade[:-1] + shade[1:]), lines.shape[0])
            collection = LineCollection(segments, array=colours, cmap="viridis", linewidths=0.7, alpha=0.8)
            collection.set_clim(0.0, 1.0)
            ax.add_collection(collection)
        ax.scatter(lines[:, -1, 0], lines[:, -1, 1], s=6, color="crimson", zorder=3, linewidths=0)
        lo, hi = _limits([lines.reshape(-1, 2)])
        ax.set(title=titles[key], xlim=(lo, hi), ylim=(lo, hi), aspect="equal")
        ax.tick_params(labelsize=7)
    fig.suptitle(f"t from {times.min():.3g} (dark) to {times.max():.3g} (light)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def image_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int | None = None) -> None:
    """PNG grid of images x [B, C, H, W] (C = 1 or 3) in [-1, 1] (clipped), nrow images per row
    (default ceil(sqrt(B))), 1-pixel black gaps between images, then enlarged `scale` times by pixel
    repetition (default: the smallest factor making the longer side >= 256 pixels, 1 for large grids).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor [B, C, H, W], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[0] < 1:
        raise ValueError(f"x must have shape [B, C, H, W] with B >= 1 and C = 1 or 3, got {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(batch))
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive int or None, got {nrow!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int) or scale < 1):
        raise ValueError(f"scale must be a positive int or None, got {scale!r}")
    n_rows = math.ceil(batch / nrow)
    pixels = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.zeros(channels, n_rows * (height + 1) + 1, nrow * (width + 1) + 1, dtype=torch.uint8)
    for i in range(batch):
        row, col = divmod(i, nrow)
        top, left = 1 + row * (height + 1), 1 + col * (width + 1)
        grid[:, top:top + height, left:left + width] = pixels[i]
    if scale is None:
        scale = math.ceil(_MIN_GRID_PIXELS / max(grid.shape[1:]))
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    array = grid[0].numpy() if channels == 1 else grid.permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="L" if channels == 1 else "RGB").save(path, format="PNG")
