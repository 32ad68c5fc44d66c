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
kill or SIGTERM) finds the plan in OUT/shards/plan.json, keeps every complete shard and samples
only the missing ones. When all chunks exist, rank 0 merges them, in order, into OUT/samples.npz.
"""

from __future__ import annotations

import json
import math
import os
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .bridge import PhaseBridge
from .checkpoint import write_atomic
from .sampler import PhaseSampler
from .seeds import derive_seed

SHARDS = "shards"
PLAN = "plan.json"


@dataclass(frozen=True)
class ShardPlan:
    """What a sharded run makes: n samples of shape x_shape in chunks of `chunk` indices.

    `sampler` (the sampler's repr), `label` and `checkpoint_step` pin the run, so that a rerun into
    the same folder with other settings is refused instead of mixing shards of two runs.
    """

    n: int
    chunk: int
    seed: int
    x_shape: tuple[int, ...]
    sampler: str
    label: int | None
    checkpoint_step: int

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.n / self.chunk)

    def indices(self, k: int) -> range:
        """The sample indices of chunk k."""
        return range(k * self.chunk, min(self.n, (k + 1) * self.chunk))

    def to_json(self) -> dict:
        values = asdict(self)
        values["x_shape"] = list(self.x_shape)
        return values


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
    guide: object | None = None,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[np.ndarray | None, float]:
    """Make this rank's missing chunks of `plan` into OUT/shards, then (rank 0) merge them.

    Returns (x1 [n, *x_shape] float32 on rank 0 and None elsewhere, seconds this call spent
    sampling). Under torch.distributed (world_size > 1) every rank must call it; the merge waits
    at a barrier for all ranks.
    """
    out = Path(out)
    folder = out / SHARDS
    if rank == 0:
        _prepare(folder, plan)
    _barrier(world_size)
    mine = [k for k in range(plan.num_chunks) if k % world_size == rank]
    todo = [k for k in mine if not _complete(shard_path(out, k), plan, k)]
    bar = tqdm(total=plan.n, disable=not progress or rank != 0, unit="sample",
               desc=f"sampling ({world_size} rank{'s' if world_size > 1 else ''})")
    bar.update(_present(out, plan))
    start = time.perf_counter()
    for k in todo:
        index = plan.indices(k)
        m0 = prior_rows(sampler.bridge, plan.x_shape, plan.seed, index).to(device)
        cond = None if cond_label is None else torch.full((len(index),), cond_label, dtype=torch.long,
                                                            device=device)
        with torch.no_grad():
            x1 = sampler.sample(model, m0, cond=cond, seed=derive_seed(plan.seed, "noise", k), guide=guide)
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


def merge_shards(out: str | os.PathLike, plan: ShardPlan) -> np.ndarray:
    """All chunks of `plan` in OUT/shards, in index order, as one array [n, *x_shape]."""
    out = Path(out)
    missing = [k for k in range(plan.num_chunks) if not _complete(shard_path(out, k), plan, k)]
    if missing:
        raise ValueError(f"{out / SHARDS} lacks {len(missing)} of {plan.num_chunks} chunks "
                         f"(first: {missing[0]}); rerun the same command to make them")
    parts = []
    for k in range(plan.num_chunks):
        with np.load(shard_path(out, k), allow_pickle=False) as shard:
            parts.append(shard["x1"])
    return np.concatenate(parts)


def _prepare(folder: Path, plan: ShardPlan) -> None:
    """Create the shard folder and its plan, or check that an existing plan is this one."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out: {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PLAN
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is unreadable ({exc}); remove {folder} to start over") from exc
        new = plan.to_json()
        if not isinstance(old, dict) or old != new:
            old = old if isinstance(old, dict) else {}
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"{folder} holds shards of another run (differs in {', '.join(changed)}); "
                             f"use another --out or remove {folder}")
    else:
        text = json.dumps(plan.to_json(), indent=2) + "\n"
        write_atomic(path, lambda f: f.write(text.encode()))
    for stale in folder.glob("*.tmp-*"):
        stale.unlink(missing_ok=True)


def _complete(path: Path, plan: ShardPlan, k: int) -> bool:
    """Whether `path` is a readable shard holding exactly chunk k's samples."""
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as shard:
            x1, chunk = shard["x1"], int(shard["chunk"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False
    return chunk == k and x1.shape == (len(plan.indices(k)), *plan.x_shape) and x1.dtype == np.float32


def _present(out: Path, plan: ShardPlan) -> int:
    """Samples in the shard files present now, on any rank (for the progress bar only)."""
    return sum(len(plan.indices(k)) for k in range(plan.num_chunks) if shard_path(out, k).is_file())


def _barrier(world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.barrier()

