"""Evaluation figures written as PNG files: 2-D sample scatters, phase-space paths and image grids.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend change, no
window). Every function creates the output's parent folder if needed.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

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


def _title(name: str, value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
    return value


def sampler_label(sampler: object) -> str:
    """A short description of a PhaseSampler's settings for figure titles, e.g.
    "NFE 10, T 0.753, order 2, tuned grid" (solver named when it is not the ODE)."""
    solver = getattr(sampler, "solver", "ode")
    parts = [f"NFE {sampler.nfe}", f"T {sampler.T:.3g}", f"order {sampler.order}",
             f"{sampler.grid_kind} grid"]
    if solver != "ode":
        parts.append(f"solver {solver}")
    return ", ".join(parts)


def toy_panels(data: torch.Tensor, samples: dict[str, torch.Tensor], path: str | Path,
               title: str | None = None) -> None:
    """Side-by-side scatter panels with the same limits: `data` [N, 2] first, then one panel per
    entry of `samples` (panel title: its key, e.g. "NFE 5 (T 0.4, order 2, rev-quad grid)";
    value [B, 2]). Axes are the two data coordinates; `title` heads the figure, with the point
    counts of each panel below their titles.
    """
    title = _title("title", title)
    if not isinstance(samples, dict):
        raise TypeError(f"samples must be a dict of name -> tensor [B, 2], got {type(samples).__name__}")
    panels = {"data": _points("data", data)}
    panels.update({str(key): _points(f"samples[{key!r}]", value) for key, value in samples.items()})
    lo, hi = _limits(list(panels.values()))
    fig = Figure(figsize=(_PANEL_INCHES * len(panels), _PANEL_INCHES + 0.8))
    for i, (name, points) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5, color="k" if i == 0 else f"C{i - 1}",
                   linewidths=0)
        ax.set(xlim=(lo, hi), ylim=(lo, hi), aspect="equal", xlabel="x[0]", ylabel="x[1]" if i == 0 else None)
        ax.set_title(f"{name}\n{len(points)} points", fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def toy_comparison(data: torch.Tensor, rows: dict[str, dict[str, torch.Tensor]], path: str | Path,
                   title: str | None = None, notes: dict[str, dict[str, str]] | None = None,
                   columns: list[str] | None = None) -> None:
    """A grid of scatter panels with shared limits: one row per entry of `rows` (e.g. "NFE 5"), its
    first panel `data` [N, 2], then one column per setting name (e.g. "defaults", "tuned",
    "learned", "published"; value [B, 2], drawn from the same prior draws so panels compare point
    for point). Columns are `columns` (None: the names in order of first appearance; every name
    of `rows` must be in it), each in one colour on every row; a row without a name leaves its
    cell empty. notes[row][name] (optional) is a second line
    under a panel's title (e.g. the setting's T and order), or the text of an empty cell. Panel
    titles are "<row>, <name>" with the point count; `title` heads the figure."""
    title = _title("title", title)
    if not isinstance(rows, dict) or not rows or not all(isinstance(r, dict) and r for r in rows.values()):
        raise TypeError("rows must be a non-empty dict: row name -> non-empty dict of name -> tensor [B, 2]")
    notes = {} if notes is None else notes
    if not isinstance(notes, dict) or not all(
            isinstance(n, dict) and all(isinstance(v, str) for v in n.values()) for n in notes.values()):
        raise TypeError("notes must be a dict: row name -> dict of name -> str, or None")
    reference = _points("data", data)
    grid = {row: {str(key): _points(f"rows[{row!r}][{key!r}]", value) for key, value in columns.items()}
            for row, columns in rows.items()}
    names = list(dict.fromkeys(key for cells in grid.values() for key in cells))
    if columns is not None:
        if not isinstance(columns, list | tuple) or not all(isinstance(c, str) for c in columns):
            raise TypeError(f"columns must be a list of names or None, got {columns!r}")
        missing = [name for name in names if name not in columns]
        if missing:
            raise ValueError(f"columns must name every setting of rows, missing {missing}")
        names = list(dict.fromkeys(columns))
    lo, hi = _limits([reference] + [points for cells in grid.values() for points in cells.values()])
    n_cols = 1 + len(names)
    fig = Figure(figsize=(_PANEL_INCHES * n_cols, (_PANEL_INCHES + 0.45) * len(grid) + 0.6))
    for r, (row, cells) in enumerate(grid.items()):
        row_notes = {str(k): v for k, v in notes.get(row, {}).items()}
        for c, name in enumerate(["data"] + names):
            ax = fig.add_subplot(len(grid), n_cols, r * n_cols + c + 1)
            points = reference if c == 0 else cells.get(name)
            if points is None:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{row}, {name}:\n{row_notes.get(name, 'none')}", ha="center", va="center",
                        fontsize=8, transform=ax.transAxes, wrap=True)
                continue
            ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5, color="k" if c == 0 else f"C{c - 1}",
                       linewidths=0)
            ax.set(xlim=(lo, hi), ylim=(lo, hi), aspect="equal")
            note = "" if c == 0 or name not in row_notes else f"\n{row_notes[name]}"
            label = "data" if c == 0 else f"{row}, {name}"
            ax.set_title(f"{label}{note}\n{len(points)} points", fontsize=8)
            ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
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


def phase_trajectories(trajectory: list[dict], path: str | Path, n_paths: int = 64,
                       title: str | None = None) -> None:
    """Phase-space figure of a sampling run (PhaseSampler.sample(..., return_trajectory=True)).

    trajectory: snapshots {"t": float, "x", "v", "x1_hat": [B, 2]}, one per network evaluation.
    Three panels for the first n_paths samples: position paths x(t), velocity paths v(t) and the
    path of the data estimate x1_hat(t), coloured by t (colour bar). The state exists only at the
    evaluation times, so each evaluation is a dot and thin lines join consecutive ones (a long
    segment is one long step of the grid, not a straight path); each path's point at the last
    evaluation is marked in red (legend). `title` (e.g. the sampler's settings,
    `sampler_label(sampler)`) heads the figure.
    """
    title = _title("title", title)
    times, paths = _trajectory_arrays(trajectory, n_paths)
    span = max(times.max() - times.min(), 1e-12)
    titles = {"x": "position x(t)", "v": "velocity v(t)", "x1_hat": "data estimate x1_hat(t)"}
    fig = Figure(figsize=(3 * _PANEL_INCHES + 1.4, _PANEL_INCHES + 0.6), layout="constrained")
    collection = None
    for i, key in enumerate(("x", "v", "x1_hat")):
        ax = fig.add_subplot(1, 3, i + 1)
        lines = paths[key]
        if lines.shape[1] > 1:
            segments = np.concatenate([lines[:, :-1, None], lines[:, 1:, None]], axis=2).reshape(-1, 2, 2)
            colours = np.tile(0.5 * (times[:-1] + times[1:]), lines.shape[0])
            collection = LineCollection(segments, array=colours, cmap="viridis", linewidths=0.4, alpha=0.45)
            collection.set_clim(times.min(), times.min() + span)
            ax.add_collection(collection)
        ax.scatter(lines[:, :, 0].ravel(), lines[:, :, 1].ravel(), c=np.tile(times, lines.shape[0]),
                   cmap="viridis", vmin=times.min(), vmax=times.min() + span, s=3, linewidths=0, zorder=2)
        ax.scatter(lines[:, -1, 0], lines[:, -1, 1], s=6, color="crimson", zorder=3, linewidths=0,
                   label=f"at the last evaluation, t = {times[-1]:.3g}")
        lo, hi = _limits([lines.reshape(-1, 2)])
        ax.set(title=titles[key], xlim=(lo, hi), ylim=(lo, hi), aspect="equal", xlabel=f"{key}[0]",
               ylabel=f"{key}[1]")
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(loc="upper left", fontsize=6, markerscale=2, frameon=True)
    if collection is not None:
        fig.colorbar(collection, ax=fig.axes, label="t (sampler time)", shrink=0.8)
    heading = (f"{lines.shape[0]} sample paths, a dot per network evaluation ({len(times)}, "
               f"t = {times.min():.3g} .. {times.max():.3g})")
    fig.suptitle(f"{title}: {heading}" if title else heading, fontsize=10)
    _save(fig, path)


def image_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int | None = None,
               title: str | None = None) -> None:
    """PNG grid of images x [B, C, H, W] (C = 1 or 3) in [-1, 1] (clipped), nrow images per row
    (default ceil(sqrt(B))), 1-pixel black gaps between images, then enlarged `scale` times by pixel
    repetition (default: the smallest factor making the longer side >= 256 pixels, 1 for large grids).
    `title` (one line, e.g. the sampler's settings) is written on a white band above the grid.
    """
    title = _title("title", title)
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
    image = Image.fromarray(array, mode="L" if channels == 1 else "RGB")
    if title:
        image = _with_title(image, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _with_title(image: Image.Image, title: str) -> Image.Image:
    """`image` below a white band holding `title` in black (wrapped to the image's width)."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(image)
    char_w = max(1, probe.textlength("M", font=font))
    per_line = max(8, int(image.width // char_w))
    lines = textwrap.wrap(title, per_line) or [""]
    top, bottom = font.getbbox("Mg")[1::2]
    line_h = int(bottom - top) + 4
    band = Image.new(image.mode, (image.width, line_h * len(lines) + 4), 255 if image.mode == "L" else
                     (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((2, 2 + i * line_h), line, fill=0 if image.mode == "L" else (0, 0, 0), font=font)
    out = Image.new(image.mode, (image.width, band.height + image.height))
    out.paste(band, (0, 0))
    out.paste(image, (0, band.height))
    return out
