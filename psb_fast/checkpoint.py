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

check_training_state(state, ...) is the check of a training checkpoint (psb_fast.train's resume):
every entry, type and tensor shape against this run's model, EMA, optimizer, scheduler and RNG
states, and finite weights; check_tensors(name, saved, expected) the part for one state_dict
(also used by psb_fast.pretrained).
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
# Entries of a training checkpoint (psb_fast.train), all checked by check_training_state.
TRAINING_STATE = ("step", "config", "model", "ema", "optimizer", "scheduler", "rng", "x_shape", "num_classes")
ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")


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
    the temporary file is removed and `path` is left as it was. An OSError naming `path` is raised
    for a failed write, also when `write` turned it into another exception (torch.save reports a
    full disk as "RuntimeError: ... unexpected pos"): the first OSError of f.write is raised instead.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                recording = _Recording(f)
                try:
                    write(recording)
                except OSError:
                    raise
                except Exception as err:
                    if recording.error is None:
                        raise
                    raise recording.error from err
                f.flush()
                os.fsync(f.fileno())
            if keep_previous and path.exists():
                os.replace(path, previous_path(path))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
    except OSError as err:
        raise naming(err, path) from None
    return path


class _Recording:
    """A binary file whose write() remembers the first OSError it raised (other calls pass through)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self._file.write(data)
        except OSError as err:
            if self.error is None:
                self.error = err
            raise

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)


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


def check_tensors(name: str, saved: object, expected: dict) -> None:
    """ValueError unless `saved` is a dict of tensors with the keys, shapes and dtypes of `expected`
    (a state_dict of the model the checkpoint must fit); `name` is the checkpoint entry, for messages."""
    if not isinstance(saved, dict):
        raise ValueError(f"entry {name!r} must be a dict of tensors, got {type(saved).__name__}")
    missing = [k for k in expected if k not in saved]
    extra = [k for k in saved if k not in expected]
    if missing or extra:
        raise ValueError(f"entry {name!r} must hold this model's tensors: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for key, want in expected.items():
        got = saved[key]
        if not isinstance(got, torch.Tensor):
            raise ValueError(f"entry {name!r}: {key!r} must be a tensor, got {type(got).__name__}")
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(f"entry {name!r}: {key!r} must have shape {tuple(want.shape)} and dtype "
                             f"{want.dtype}, got {tuple(got.shape)} {got.dtype}")


def all_finite(tensors: Iterable[object]) -> bool:
    """Whether every floating-point tensor in `tensors` is finite (one device sync in all; other
    values are skipped)."""
    flags = [torch.isfinite(t).all() for t in tensors
             if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]
    return not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def check_training_state(
    state: dict, *, model: dict, ema: dict, optimizer: torch.optim.Optimizer, scheduler: dict,
    rng_bytes: tuple[int, int], x_shape: tuple[int, ...], num_classes: int | None,
    check_config: Callable[[dict], None],
) -> None:
    """Check that a loaded training checkpoint can restore a run exactly, before anything is restored.

    state: the loaded checkpoint (TRAINING_STATE entries). model / ema / scheduler: this run's
    state_dicts, the shapes and dtypes the saved ones must have; optimizer: this run's AdamW;
    rng_bytes: sizes of a data generator state and of torch's CPU RNG state; x_shape, num_classes:
    this run's data. check_config(state["config"]) raises CheckpointMismatch when the checkpoint's
    config differs in a key a resume must keep.

    Raises ValueError saying what is wrong (missing entries, wrong types, tensor shapes or dtypes
    that do not fit, non-finite weights, another data shape), or CheckpointMismatch from check_config.
    """
    missing = [key for key in TRAINING_STATE if key not in state]
    if missing:
        raise ValueError(f"entries {missing} are missing")
    if not isinstance(state["config"], dict):
        raise ValueError(f"entry 'config' must be a dict, got {type(state['config']).__name__}")
    check_config(state["config"])
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"entry 'step' must be an int >= 0, got {step!r}")
    check_tensors("model", state["model"], model)
    check_tensors("ema", state["ema"], ema)
    if not all_finite([*state["model"].values(), *state["ema"].values()]):
        raise ValueError("entries 'model' / 'ema' hold non-finite weights")
    _check_optimizer(state["optimizer"], optimizer)
    _check_scheduler(state["scheduler"], scheduler, step)
    _check_rng(state["rng"], *rng_bytes)
    if state["x_shape"] != list(x_shape):
        raise ValueError(f"entry 'x_shape' must be the data's {list(x_shape)}, got {state['x_shape']!r}")
    if state["num_classes"] != num_classes:
        raise ValueError(f"entry 'num_classes' must be {num_classes!r}, got {state['num_classes']!r}")


def _check_optimizer(saved: object, opt: torch.optim.Optimizer) -> None:
    """ValueError unless `saved` is an AdamW state_dict for opt's parameter groups and shapes."""
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list)):
        raise ValueError("entry 'optimizer' must be a dict with 'state' (a dict) and 'param_groups' (a list)")
    groups = saved["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"entry 'optimizer' must have {len(opt.param_groups)} parameter group(s), "
                         f"got {len(groups)}")
    shapes = {}
    for i, (group, ours) in enumerate(zip(groups, opt.param_groups, strict=True)):
        ids = group.get("params") if isinstance(group, dict) else None
        if not isinstance(ids, list) or len(ids) != len(ours["params"]):
            raise ValueError(f"entry 'optimizer': parameter group {i} must list {len(ours['params'])} "
                             f"parameters")
        missing = [k for k in ours if k not in group]
        if missing:
            raise ValueError(f"entry 'optimizer': parameter group {i} lacks {missing}")
        shapes.update(zip(ids, (p.shape for p in ours["params"]), strict=True))
    for pid, entry in saved["state"].items():
        if pid not in shapes or not isinstance(entry, dict):
            raise ValueError(f"entry 'optimizer': state of unknown parameter {pid!r}")
        for key in ADAMW_STATE:
            value = entry.get(key)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"entry 'optimizer': parameter {pid} lacks the tensor {key!r}")
            if key != "step" and value.shape != shapes[pid]:
                raise ValueError(f"entry 'optimizer': {key!r} of parameter {pid} must have shape "
                                 f"{tuple(shapes[pid])}, got {tuple(value.shape)}")


def _check_scheduler(saved: object, expected: dict, step: int) -> None:
    """ValueError unless `saved` is a LambdaLR state_dict like `expected`, at `step`."""
    needed = ("base_lrs", "last_epoch", "lr_lambdas")
    if not isinstance(saved, dict) or any(k not in saved for k in needed):
        raise ValueError(f"entry 'scheduler' must be a dict with {list(needed)}")
    if saved["lr_lambdas"] != expected["lr_lambdas"]:
        raise ValueError(f"entry 'scheduler': 'lr_lambdas' must be {expected['lr_lambdas']!r}, "
                         f"got {saved['lr_lambdas']!r}")
    base = saved["base_lrs"]
    if not isinstance(base, list) or len(base) != len(expected["base_lrs"]):
        raise ValueError(f"entry 'scheduler': 'base_lrs' must be a list of {len(expected['base_lrs'])} "
                         f"number(s), got {base!r}")
    if saved["last_epoch"] != step:
        raise ValueError(f"entry 'scheduler' must be at the checkpoint's step {step}, "
                         f"got {saved['last_epoch']!r}")


def _check_rng(saved: object, data_size: int, torch_size: int) -> None:
    """ValueError unless `saved` holds per-rank RNG states (uint8 tensors of the right sizes)."""
    if not isinstance(saved, dict):
        raise ValueError(f"entry 'rng' must be a dict, got {type(saved).__name__}")
    n = saved.get("world_size")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"entry 'rng': 'world_size' must be an int >= 1, got {n!r}")
    for key, size in (("data", data_size), ("torch", torch_size), ("cuda", None)):
        states = saved.get(key)
        if not isinstance(states, list) or len(states) != n:
            raise ValueError(f"entry 'rng': {key!r} must be a list of {n} state(s)")
        for state in states:
            if size is None and state is None:
                continue
            if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1
                    and (size is None or state.numel() == size)):
                raise ValueError(f"entry 'rng': {key!r} must hold uint8 generator states"
                                 f"{'' if size is None else f' of {size} bytes'}")


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
