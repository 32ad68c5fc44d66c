"""Checkpoints that lose nothing: atomic writes, a kept previous file, and code-free loading.

save_checkpoint(path, state) writes `path.tmp-<pid>` in the same folder, fsyncs it, moves the
current `path` to `path.prev` and renames the new file to `path` (os.replace is atomic on POSIX),
then fsyncs the folder. A crash or a failed write at any point leaves at least one complete
checkpoint: `path`, or `path.prev` while `path` is missing.

load_checkpoint(path) reads with torch.load(weights_only=True), so a checkpoint file cannot run
code: states must hold only tensors and str / int / float / bool / None / list / tuple / dict.
A missing, truncated or corrupt `path` falls back to a good `path.prev` with a warning
(fallback=True, the default); without a good file it raises ValueError naming the file and why.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

FORMAT = "psb_fast.checkpoint/1"


def previous_path(path: str | Path) -> Path:
    """Where save_checkpoint keeps the previous good checkpoint of `path`: `<path>.prev`."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write `state` (a dict of tensors and plain values) to `path` atomically; returns the path.

    The previous file at `path` is kept as `<path>.prev`. On any error the temporary file is
    removed and the files already on disk are left as they were.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def load_checkpoint(
    path: str | Path, fallback: bool = True, map_location: str | torch.device = "cpu"
) -> dict:
    """The state saved at `path` (without its "format" tag), tensors on `map_location`.

    Args:
        path: the checkpoint file written by save_checkpoint.
        fallback: if `path` is missing or unreadable, load `<path>.prev` instead (with a
            RuntimeWarning naming both files) when that one is good.
        map_location: device for the loaded tensors.

    Raises:
        FileNotFoundError if neither file exists; ValueError if no readable checkpoint is found
        (truncated, corrupt, not a psb_fast checkpoint, or holding objects weights_only refuses).
    """
    path = Path(path)
    try:
        return _read(path, map_location)
    except (FileNotFoundError, ValueError) as error:
        prev = previous_path(path)
        if not fallback or not prev.exists():
            raise
        try:
            state = _read(prev, map_location)
        except ValueError as prev_error:
            raise ValueError(f"{error}; the previous checkpoint is unreadable too: {prev_error}") from error
        warnings.warn(f"{error}; loaded the previous good checkpoint {prev} instead", RuntimeWarning,
                      stacklevel=2)
        return state


def _read(path: Path, map_location: str | torch.device) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... on bad files
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(
            f"checkpoint {str(path)!r} is unreadable (truncated, corrupt, or holding objects that "
            f"weights_only loading refuses): {type(exc).__name__}: {reason}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} is not a {FORMAT} file")
    state.pop("format")
    return state


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
