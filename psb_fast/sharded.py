"""Sampling at scale: N samples split into fixed chunks, spread over torchrun ranks, resumable.

    psb-fast sample RUN -n 50000 --out fid                                   # one process
    torchrun --nproc_per_node 8 -m psb_fast.cli sample RUN -n 50000 --out fid  # eight ranks

The N samples are cut into chunks of `chunk` consecutive indices; chunk k goes to rank
k mod world_size. Sample i starts from its own prior draw m0_i, made by a generator seeded with
derive_seed(seed, "prior", i), and chunk k's SDE noise (SDE solvers only) is seeded with
derive_seed(seed, "noise", k). So what sample i is depends on (seed, chunk) and the sampler, never
on how many ranks ran or in which order: the union of the shards equals a one-process run with
the same seed and chunk size.

Each finished chunk is written atomically to OUT/shards/chunk-KKKKKK.npz; a rerun (after a crash,
kill or SIGTERM) finds the plan in OUT/shards/plan.json, keeps every complete shard (readable, of
the right shape, finite) and samples only the missing ones. When all chunks exist, rank 0 merges
them, in order, into the returned array (`psb-fast sample` writes it atomically to OUT/samples.npz).

What makes a result this run's is pinned in plan.json, and a rerun that differs in any of it is
refused with one line naming what differs (instead of merging shards of two runs):

    n, chunk, seed, x_shape    the plan
    model                      SHA-256 of the model's weights (its state_dict: names, dtypes,
                               shapes, bytes), or the caller's model_id
    sampler                    the full resolved setting: nfe, solver, variant, order, hop, T, t0,
                               backend and the exact grid times, and the bridge (p, k, varx, varv, mode)
    guide                      None, or the stroke's shape and SHA-256, mode, strength, init_weight
    label                      the class label of conditional sampling (None: unconditional)

Rank 0 holds the exclusive lock of OUT/shards (psb_fast.locks) from the plan check to the merge,
so a second run started into the same folder is refused at once; the lock dies with its process
(kill -9 included), so a rerun after a crash never finds a stale lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .bridge import PhaseBridge
from .checkpoint import write_atomic
from .files import read_json
from .guidance import StrokeGuide
from .locks import exclusive
from .progress import progress_bar
from .sampler import PhaseSampler
from .seeds import derive_seed

SHARDS = "shards"
PLAN = "plan.json"
FORMAT = "psb_fast.shards/2"


@dataclass(frozen=True)
class ShardPlan:
    """What a sharded run makes: n samples of shape x_shape in chunks of `chunk` indices, from `seed`.

    The model, sampler, guide and label are pinned by sample_sharded itself (module docstring).
    sampler, label and checkpoint_step are the old way to pin them: they warn and are not used.
    """

    n: int
    chunk: int
    seed: int
    x_shape: tuple[int, ...]
    sampler: str | None = None
    label: int | None = None
    checkpoint_step: int | None = None

    def __post_init__(self) -> None:
        for name in ("n", "chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ShardPlan {name} must be an int >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"ShardPlan seed must be an int, got {self.seed!r}")
        object.__setattr__(self, "x_shape", tuple(self.x_shape))
        old = [name for name in ("sampler", "label", "checkpoint_step") if getattr(self, name) is not None]
        if old:
            warnings.warn(f"ShardPlan({', '.join(f'{k}=...' for k in old)}) is no longer used: "
                          f"sample_sharded pins the sampler's setting, the model's weights (model_id) and "
                          f"the label (cond_label) itself", DeprecationWarning, stacklevel=3)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.n / self.chunk)

    def indices(self, k: int) -> range:
        """The sample indices of chunk k."""
        return range(k * self.chunk, min(self.n, (k + 1) * self.chunk))

    def to_json(self) -> dict:
        return {"n": self.n, "chunk": self.chunk, "seed": self.seed, "x_shape": list(self.x_shape)}


def prior_rows(bridge: PhaseBridge, x_shape: tuple[int, ...], seed: int, indices: range) -> torch.Tensor:
    """m0 [len(indices), 2C, ...] (float32, CPU): row j drawn by its own generator seeded with
    derive_seed(seed, "prior", indices[j]), so a sample's start never depends on its batch."""
    rows = [bridge.sample_prior((1, *x_shape), dtype=torch.float32,
                                generator=torch.Generator().manual_seed(derive_seed(seed, "prior", i)))
            for i in indices]
    return torch.cat(rows)


def shard_path(out: Path, k: int) -> Path:
    return out / SHARDS / f"chunk-{k:06d}.npz"


def sample_sharded(
    model: nn.Module,
    sampler: PhaseSampler,
    plan: ShardPlan,
    out: str | os.PathLike,
    *,
    device: torch.device,
    cond_label: int | None = None,
    guide: StrokeGuide | None = None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    model_id: str | None = None,
) -> tuple[np.ndarray | None, float]:
    """Make this rank's missing chunks of `plan` into OUT/shards, then (rank 0) merge them.

    Args:
        model: F = model(m, t[, cond]); an nn.Module, or any callable when model_id is given.
        sampler, plan, out: the sampler, what to make, and the output folder (shards in OUT/shards).
        device: where m0 and the model live. cond_label: class label of every sample (None: none).
        guide: a StrokeGuide whose stroke is [*x_shape] (the same for every sample) or
            [n, *x_shape] (row i guides sample i; chunk k gets the rows of its indices).
        progress: a progress bar on rank 0. rank, world_size: this process under torch.distributed.
        model_id: what identifies the model in plan.json (None: the SHA-256 of its state_dict).

    Returns (x1 [n, *x_shape] float32 on rank 0 and None elsewhere, seconds this call spent
    sampling). Under torch.distributed (world_size > 1) every rank must call it; the merge waits
    at a barrier for all ranks.

    Raises:
        ValueError before any sampling: a stroke with another row count than n or 1, a plan.json of
        another run (naming what differs), or another process holding OUT/shards (locks.FolderLocked).
    """
    out = Path(out)
    folder = out / SHARDS
    identity = run_identity(model, sampler, plan, cond_label=cond_label, guide=guide, model_id=model_id)
    for path in (out, folder):
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out: {str(path)!r} exists and is not a folder")
    lock = exclusive(folder, "sharded sampling") if rank == 0 else contextlib.nullcontext()
    with lock:
        if rank == 0:
            _prepare(folder, identity)
        _barrier(world_size)
        mine = [k for k in range(plan.num_chunks) if k % world_size == rank]
        todo = [k for k in mine if not _complete(shard_path(out, k), plan, k)]
        bar = progress_bar(total=plan.n, disable=not progress or rank != 0, unit="sample",
                   desc=f"sampling ({world_size} rank{'s' if world_size > 1 else ''})")
        bar.update(_present(out, plan))
        start = time.perf_counter()
        for k in todo:
            index = plan.indices(k)
            m0 = prior_rows(sampler.bridge, plan.x_shape, plan.seed, index).to(device)
            cond = None if cond_label is None else torch.full((len(index),), cond_label, dtype=torch.long,
                                                                device=device)
            with torch.no_grad():
                x1 = sampler.sample(model, m0, cond=cond, seed=derive_seed(plan.seed, "noise", k),
                                    guide=_chunk_guide(guide, plan, index))
            x1 = x1.float().cpu().numpy()
            write_atomic(shard_path(out, k), lambda f, x1=x1, k=k: np.savez(f, x1=x1, chunk=np.int64(k)))
            if rank == 0:
                bar.n = _present(out, plan)
                bar.refresh()
        seconds = time.perf_counter() - start
        _barrier(world_size)
        if rank == 0:
            bar.n = plan.n
            bar.close()
            return merge_shards(out, plan), seconds
    bar.close()
    return None, seconds


def run_identity(
    model: nn.Module, sampler: PhaseSampler, plan: ShardPlan, *, cond_label: int | None = None,
    guide: StrokeGuide | None = None, model_id: str | None = None,
) -> dict:
    """What plan.json pins (module docstring), as plain JSON values; checks the guide's stroke rows."""
    if not isinstance(plan, ShardPlan):
        raise TypeError(f"plan must be a ShardPlan, got {type(plan).__name__}")
    if model_id is None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (its weights identify the run), or pass "
                            f"model_id=...; got {type(model).__name__}")
        model_id = "sha256:" + _digest(model.state_dict().items())
    elif not isinstance(model_id, str) or not model_id:
        raise TypeError(f"model_id must be a non-empty str or None, got {model_id!r}")
    if cond_label is not None and (isinstance(cond_label, bool) or not isinstance(cond_label, int)):
        raise TypeError(f"cond_label must be an int or None, got {cond_label!r}")
    if guide is not None and not isinstance(guide, StrokeGuide):
        raise TypeError(f"guide must be a StrokeGuide or None, got {type(guide).__name__}")
    return {"format": FORMAT, **plan.to_json(), "model": model_id, "sampler": sampler_setting(sampler),
            "guide": None if guide is None else _guide_identity(guide, plan), "label": cond_label}


def sampler_setting(sampler: PhaseSampler) -> dict:
    """The sampler's full resolved setting as JSON values (the grid times exactly: JSON floats
    round-trip), which with the model fixes every sample it makes."""
    if not isinstance(sampler, PhaseSampler):
        raise TypeError(f"sampler must be a PhaseSampler, got {type(sampler).__name__}")
    bridge = sampler.bridge
    return {"nfe": sampler.nfe, "solver": sampler.solver, "variant": sampler.variant,
            "order": sampler.order, "hop": sampler.hop, "T": sampler.T, "t0": sampler.t0,
            "backend": sampler.backend, "grid": [float(t) for t in sampler.grid.tolist()],
            "bridge": {"p": float(bridge.p), "k": float(bridge.k), "varx": float(bridge.varx),
                       "varv": float(bridge.varv), "mode": bridge.mode}}


def _guide_identity(guide: StrokeGuide, plan: ShardPlan) -> dict:
    stroke = guide.stroke
    shape = tuple(stroke.shape)
    if shape != plan.x_shape and shape != (plan.n, *plan.x_shape):
        raise ValueError(f"the stroke must have shape {list(plan.x_shape)} (one for every sample) or "
                         f"{[plan.n, *plan.x_shape]} (one row per sample), got {list(shape)}")
    return {"stroke_shape": list(shape), "stroke": "sha256:" + _digest([("stroke", stroke)]),
            "mode": guide.mode, "strength": guide.strength, "init_weight": float(guide.init_weight)}


def _chunk_guide(guide: StrokeGuide | None, plan: ShardPlan, index: range) -> StrokeGuide | None:
    """The guide of chunk `index`: a per-sample stroke [n, ...] is cut to the chunk's rows."""
    if guide is None or tuple(guide.stroke.shape) == plan.x_shape:
        return guide
    return dataclasses.replace(guide, stroke=guide.stroke[index.start:index.stop])


def _digest(named: object) -> str:
    """SHA-256 (hex) of (name, dtype, shape, bytes) of each named tensor, in order."""
    h = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def merge_shards(out: str | os.PathLike, plan: ShardPlan) -> np.ndarray:
    """All chunks of `plan` in OUT/shards, in index order, as one array [n, *x_shape]."""
    out = Path(out)
    missing = [k for k in range(plan.num_chunks) if not _complete(shard_path(out, k), plan, k)]
    if missing:
        raise ValueError(f"{out / SHARDS} lacks {len(missing)} of {plan.num_chunks} chunks "
                         f"(first: {missing[0]}; missing, unreadable or non-finite); rerun the same "
                         f"command to make them")
    parts = []
    for k in range(plan.num_chunks):
        with np.load(shard_path(out, k), allow_pickle=False) as shard:
            parts.append(shard["x1"])
    merged = np.concatenate(parts)
    if not np.isfinite(merged).all():  # a shard replaced after the check above
        raise ValueError(f"{out / SHARDS}: the merged samples hold NaN or Inf; rerun the same command")
    return merged


def save_samples(path: str | os.PathLike, **arrays: object) -> Path:
    """Write `arrays` (x1 and scalars) to the .npz `path` atomically (checkpoint.write_atomic): a
    failed write leaves the previous file whole and raises an OSError naming the file."""
    return write_atomic(path, lambda f: np.savez(f, **arrays))


def _prepare(folder: Path, identity: dict) -> None:
    """Create the shard folder and its plan, or check that an existing plan is this one."""
    path = folder / PLAN
    if path.exists():
        try:
            old = read_json(path, "shard plan")
        except ValueError as exc:
            raise ValueError(f"{exc}; remove {folder} to start over") from None
        new = json.loads(json.dumps(identity))  # tuples -> lists, as read back
        if old != new:
            raise ValueError(f"{folder} holds shards of another run (differs in "
                             f"{', '.join(_differences(old, new))}); use another --out or remove {folder}")
    else:
        text = json.dumps(identity, indent=1) + "\n"
        write_atomic(path, lambda f: f.write(text.encode()))
    for stale in folder.glob("*.tmp-*"):
        stale.unlink(missing_ok=True)


def _differences(old: object, new: dict) -> list[str]:
    """The keys (dotted one level into dicts, e.g. "sampler.grid") where `old` differs from `new`."""
    if not isinstance(old, dict):
        return ["format"]
    out = []
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in b if a.get(k) != b.get(k)] + [f"{key}.{k}" for k in a if k not in b]
        else:
            out.append(key)
    return out


def _complete(path: Path, plan: ShardPlan, k: int) -> bool:
    """Whether `path` is a readable shard holding exactly chunk k's samples, all finite."""
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as shard:
            x1, chunk = shard["x1"], int(shard["chunk"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False
    return (chunk == k and x1.shape == (len(plan.indices(k)), *plan.x_shape) and x1.dtype == np.float32
            and bool(np.isfinite(x1).all()))


def _present(out: Path, plan: ShardPlan) -> int:
    """Samples in the shard files present now, on any rank (for the progress bar only)."""
    return sum(len(plan.indices(k)) for k in range(plan.num_chunks) if shard_path(out, k).is_file())


def _barrier(world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.barrier()
