"""Checkpoints that lose nothing: atomic writes, a kept previous file, and code-free, checked loading.

save_checkpoint(path, state) writes `path.tmp-<pid>` in the same folder, fsyncs it, moves the
current `path` to `path.prev` and renames the new file to `path` (os.replace is atomic on POSIX),
then fsyncs the folder. A crash or a failed write at any point leaves at least one complete
checkpoint: `path`, or `path.prev` while `path` is missing. A failed write (disk full, read-only
folder) raises an OSError naming the file and leaves the files already on disk as they were; the
`<name>.tmp-<pid>` files a killed process leaves behind are removed by remove_stale_temporaries.

load_checkpoint(path) reads with torch.load(weights_only=True), so a checkpoint file cannot run
code: states must hold only tensors and str / int / float / bool / None / list / tuple / dict.
An optional check(state) validates the structure before the caller restores anything. A missing,
truncated, corrupt or failing-the-check `path` falls back to a good `path.prev` with a warning
saying what was wrong (fallback=True, the default); without a good file it raises ValueError
naming the file and why. CheckpointMismatch (a readable file that does not fit the caller, e.g.
another model's config) is raised as is, without trying `path.prev`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import torch

FORMAT = "psb_fast.checkpoint/1"
TEMPORARY = ".tmp-"  # atomic writes go through `<name>.tmp-<pid>` in the target's folder


class CheckpointMismatch(ValueError):
    """A readable checkpoint that cannot serve the caller (e.g. it was written for another config).

    Raised by a load_checkpoint `check` and passed on as is: the previous file, written by the same
    run, would not fit either.
    """


def previous_path(path: str | Path) -> Path:
    """Where save_checkpoint keeps the previous good checkpoint of `path`: `<path>.prev`."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def temporary_path(path: str | Path, pid: int | None = None) -> Path:
    """The file an atomic write of `path` by process `pid` (default: this one) goes through."""
    path = Path(path)
    return path.with_name(f"{path.name}{TEMPORARY}{os.getpid() if pid is None else pid}")


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write `state` (a dict of tensors and plain values) to `path` atomically; returns the path.

    The previous file at `path` is kept as `<path>.prev`. On any error the temporary file is
    removed and the files already on disk are left as they were; an OSError names the file.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    return write_atomic(path, lambda f: torch.save({"format": FORMAT, **state}, f), keep_previous=True)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None], keep_previous: bool = False) -> Path:
    """Write a file with write(f) on `<path>.tmp-<pid>`, fsync it and rename it to `path` at once.

    keep_previous: move the current `path` to `<path>.prev` first (save_checkpoint). On any error
    the temporary file is removed, `path` is left as it was and an OSError names the file.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            if keep_previous and path.exists():
                os.replace(path, previous_path(path))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
    except OSError as err:
        raise naming(err, tmp) from None
    return path


def naming(err: OSError, path: str | Path) -> OSError:
    """`err` with `path` as its file when it names none, so that its message says which file failed."""
    if err.filename is None:
        if err.errno is None:
            err.args = (f"{err}: {str(path)!r}",)
        else:
            err.filename = str(path)
    return err


def remove_stale_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the `<name>.tmp-<pid>` files in `folder` (for each of `names`) that interrupted atomic
    writes left behind: those of processes that no longer run, or of this process. Returns them.

    Only that exact pattern (a decimal pid after `.tmp-`) is touched; a temporary file of another
    live process is kept (it may be writing it now).
    """
    folder = Path(folder)
    removed = []
    for name in names:
        for candidate in folder.glob(f"{name}{TEMPORARY}*"):
            pid = candidate.name[len(name) + len(TEMPORARY):]
            if not (pid.isdigit() and pid.isascii()) or not candidate.is_file():
                continue
            if int(pid) == os.getpid() or not _process_alive(int(pid)):
                candidate.unlink(missing_ok=True)
                removed.append(candidate)
    return removed


def load_checkpoint(
    path: str | Path, fallback: bool = True, map_location: str | torch.device = "cpu",
    check: Callable[[dict], None] | None = None,
) -> dict:
    """The state saved at `path` (without its "format" tag), tensors on `map_location`.

    Args:
        path: the checkpoint file written by save_checkpoint.
        fallback: if `path` is missing, unreadable or fails `check`, load `<path>.prev` instead
            (with a RuntimeWarning naming both files and what was wrong) when that one is good.
        map_location: device for the loaded tensors.
        check: validates a loaded state before it is returned: raises ValueError saying what is
            wrong (then the file counts as bad) or CheckpointMismatch (raised as is).

    Raises:
        FileNotFoundError if neither file exists; ValueError if no good checkpoint is found
        (truncated, corrupt, not a psb_fast checkpoint, holding objects weights_only refuses, or
        failing `check`); CheckpointMismatch from `check`.
    """
    return read_checkpoint(path, fallback=fallback, map_location=map_location, check=check)[0]


def read_checkpoint(
    path: str | Path, fallback: bool = True, map_location: str | torch.device = "cpu",
    check: Callable[[dict], None] | None = None,
) -> tuple[dict, Path]:
    """load_checkpoint(...) and the file it came from (`path` or `<path>.prev`)."""
    path = Path(path)
    try:
        return _read_checked(path, map_location, check), path
    except CheckpointMismatch:
        raise
    except (FileNotFoundError, ValueError) as error:
        prev = previous_path(path)
        if not fallback or not prev.exists():
            raise
        try:
            state = _read_checked(prev, map_location, check)
        except CheckpointMismatch:
            raise
        except _Unusable as prev_error:
            raise ValueError(f"{error}; the previous checkpoint is unusable too: {prev_error}") from error
        except ValueError as prev_error:
            raise ValueError(f"{error}; the previous checkpoint is unreadable too: {prev_error}") from error
        warnings.warn(f"{error}; loaded the previous good checkpoint {prev} instead", RuntimeWarning,
                      stacklevel=3)
        return state, prev


class _Unusable(ValueError):
    """A readable checkpoint that failed the caller's check."""


def _read_checked(path: Path, map_location: str | torch.device, check: Callable[[dict], None] | None) -> dict:
    state = _read(path, map_location)
    if check is not None:
        try:
            check(state)
        except CheckpointMismatch:
            raise
        except ValueError as err:
            raise _Unusable(f"checkpoint {str(path)!r} cannot be used: {err}") from err
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


def _process_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (True when that cannot be told, e.g. on Windows,
    where os.kill would not merely probe)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # PermissionError: it runs as another user
        return True
    return True


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
