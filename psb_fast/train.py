"""The training loop: one readable loop over fused bridge samples, with checkpoints that lose nothing.

    summary = train(load_config("run.toml"))                 # one process
    torchrun --nproc_per_node 4 <entry> ...                  # several: train() reads RANK / WORLD_SIZE

Each step: a batch x1 (and labels) and times t ~ U[t0, T] are drawn from this rank's torch.Generator;
psb_fast.bridge_sample turns them into (m_t, label) in one fused pass, with noise keyed by a seed
derived from (cfg.seed, step) and the rank's row offset; the loss is mean((w(t) (F - label))^2)
(docs/math.md §5). AdamW, linear warmup then cosine decay, gradient clipping, an EMA of the weights
(torch.optim.swa_utils.AveragedModel; decay min(ema_decay, (1 + n) / (10 + n)) after n updates),
bf16 autocast on CUDA, optional torch.compile.

Files in cfg.out_dir: checkpoint.pt (and checkpoint.pt.prev, see psb_fast.checkpoint), config.json,
metrics.jsonl (one JSON object per line: logs, evaluations, events) and tb/ (TensorBoard, when
installed; psb_fast.records), eval/*.png (psb_fast.evaluation). This module is the setup and the
loop; the checkpoint-state checks live in psb_fast.checkpoint, the memory estimates in
psb_fast.resources.

Fault handling:
- resume=True continues from checkpoint.pt (model, EMA, optimizer, scheduler, step, RNG states):
  on CPU the following losses equal those of an uninterrupted run bit for bit. The checkpoint's
  structure (entries, types, tensor shapes against this model and optimizer, finite weights) is
  checked before anything is restored; a bad checkpoint.pt falls back to a good checkpoint.pt.prev
  with a RuntimeWarning saying what was wrong (that file then becomes checkpoint.pt again), and
  ValueError says why when neither is good. Keys in config.RESUME_CHANGEABLE may change at a resume
  and take effect from there (lr schedule and optimizer recomputed); changing any other key raises
  ValueError. metrics.jsonl loses its records past the resumed step (one record per step), and the
  temporary files of interrupted writes are removed (at a fresh start too).
- SIGINT / SIGTERM: the current step finishes, a checkpoint is written, train() returns with
  summary["stopped"] set to the signal's name (a second signal acts as usual).
- A non-finite loss raises FloatingPointError naming the step and the last good checkpoint (its
  step), and no checkpoint is written after it. A checkpoint is written only from finite model
  and EMA weights: non-finite weights at a save raise FloatingPointError the same way.
- One run per out_dir: rank 0 holds its lock (psb_fast.locks) from before anything is written to
  the end, so a second train() on the same out_dir raises locks.FolderLocked (a ValueError) at
  once; the lock dies with its process, kill -9 included.
- Bad config values, dataset or model names, data shapes, an out_dir that is a file or already
  holds a checkpoint without resume=True, a network whose parameters, or a batch_size whose batch
  tensors and activations, cannot fit in memory raise TypeError / ValueError before the first step.
- A failed write (disk full, read-only out_dir) raises OSError naming the file; the checkpoint on
  disk stays as it was.

Distributed (torchrun): gloo on CPU, NCCL on CUDA; cfg.batch_size is the global batch, split
evenly over ranks; each rank draws from its own shard with its own generator; rank 0 logs,
evaluates and writes checkpoints (out_dir must be visible to every rank to resume).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from .bridge import PhaseBridge
from .checkpoint import (
    CheckpointMismatch,
    all_finite,
    check_training_state,
    load_checkpoint,
    naming,
    previous_path,
    read_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    write_atomic,
)
from .config import TrainConfig, config_to_dict, resume_changes, resume_fixed
from .data import DataSource, load_data
from .distributed import distributed_env, init_group, resolve_device
from .evaluation import energy_distance as energy_distance  # re-exported: psb_fast.train.energy_distance
from .evaluation import evaluate
from .locks import exclusive
from .models import make_model
from .ops import float64 as f64
from .ops.bridge_sample import bridge_sample
from .progress import progress_bar
from .records import METRICS, Records
from .resources import check_batch_fits, check_model_fits
from .seeds import derive_seed
from .threads import choose_threads, work_elements

CHECKPOINT = "checkpoint.pt"
CONFIG_JSON = "config.json"
# Fields a resumed run must share with its checkpoint (config.RESUME_CHANGEABLE lists the others).
RESUME_FIXED = tuple(resume_fixed())


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The lr multiplier after `step` scheduler steps: linear warmup over `warmup`, then cosine to 0."""
    warmup = min(warmup, total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def training_loss(
    model: Callable[..., torch.Tensor],
    bridge: PhaseBridge,
    x1: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor | None = None,
    seed: int | None = None,
    weighting: str = "reciprocal",
    backend: str = "auto",
    row_offset: int = 0,
) -> torch.Tensor:
    """The loss mean((w(t) (F - label))^2) of docs/math.md §5.3 on a batch, a 0-dim float tensor with grad.

    x1: data [B, C, ...]; t: times [B] on x1's device; cond: labels [B] or None (model(m, t) then).
    seed / row_offset: the bridge noise (psb_fast.bridge_sample). weighting: "reciprocal"
    (w = 1/sqrt(1 - t)) or "none" (w = 1). backend "float64" takes the plain float64 PyTorch
    data path and loss (psb_fast.ops.float64); the others the fused bridge_sample and a
    float32 loss.
    """
    if weighting not in ("reciprocal", "none"):
        raise ValueError(f"weighting must be 'reciprocal' or 'none', got {weighting!r}")
    m_t, label = bridge_sample(bridge, x1, t, seed=seed, backend=backend, row_offset=row_offset)
    F = model(m_t, t) if cond is None else model(m_t, t, cond)
    if F.shape != label.shape:
        raise ValueError(f"model output must have x1's shape {tuple(label.shape)}, got {tuple(F.shape)}")
    if backend in ("float64", "reference"):  # "reference": the old name of "float64"
        return f64.training_loss(F, label, t, weighting)
    err = F.float() - label.float()
    if weighting == "reciprocal":
        w = torch.rsqrt(1.0 - t.double()).float().reshape((-1,) + (1,) * (err.dim() - 1))
        err = err * w
    return err.square().mean()


def train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    *,
    model: nn.Module | None = None,
    stop_after: int | None = None,
    callback: Callable[[dict], None] | None = None,
) -> dict:
    """Train per `cfg` (module docstring); returns a summary (on every rank).

    Args:
        cfg: the run's TrainConfig.
        resume: continue from cfg.out_dir/checkpoint.pt (its previous file if it is unreadable).
        progress: show a tqdm bar (rank 0) with loss, lr and steps/s.
        model: a network to train instead of make_model(cfg.model, ...); called model(m, t[, cond]).
        stop_after: run at most this many steps in this call, then checkpoint and return (the
            schedule still spans cfg.steps; resume later to continue).
        callback: called on every rank after each step with {"step", "rank", "x1", "y", "t", "loss"}.

    Returns:
        {"step": steps completed, "start_step", "losses": per-step losses of this call (mean over
        ranks), "steps_per_s", "stopped": None | "SIGINT" | "SIGTERM" | "stop_after",
        "checkpoint", "metrics", "out_dir" (paths as str), "eval": last evaluation's numbers,
        "images": PNG paths, "model": the trained nn.Module, "ema": its EMA copy, "rank", "world_size"}.

    Raises:
        TypeError / ValueError before any step on bad input (checkpoint.CheckpointMismatch, a ValueError,
        for a resume that changes a fixed key); FloatingPointError on a non-finite loss or non-finite
        weights at a save; OSError naming the file when out_dir cannot be written.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                   or stop_after < 1):
        raise ValueError(f"stop_after must be an int >= 1 or None, got {stop_after!r}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    rank, world_size, local_rank = distributed_env()
    if cfg.warmup_steps >= cfg.steps and rank == 0:
        logging.getLogger(__name__).warning(
            f"warmup_steps {cfg.warmup_steps} >= steps {cfg.steps}: the learning rate never reaches lr "
            f"(it warms up linearly over warmup_steps); set warmup_steps below steps")
    device = resolve_device(cfg.device, "device", local_rank if world_size > 1 else None)
    init_group(device, world_size)
    _check_out_dir(Path(cfg.out_dir))
    # one run per out_dir: rank 0 holds its lock from before anything is written to the end
    lock = exclusive(cfg.out_dir, "training run") if rank == 0 else contextlib.nullcontext()
    with lock:
        run = _Run(cfg, rank, world_size, device, model, resume)
        previous = torch.get_num_threads()
        torch.set_num_threads(thread_count(cfg, run.source.x_shape, device))
        try:
            return run.loop(progress, stop_after, callback)
        finally:
            torch.set_num_threads(previous)


def thread_count(cfg: TrainConfig, x_shape: tuple[int, ...], device: torch.device) -> int:
    """torch's CPU threads for this run: cfg.threads, or with 0 (auto) psb_fast.threads' choice for
    network calls on batches of cfg.batch_size points of shape x_shape (one thread for small calls)."""
    return choose_threads(cfg.threads, work_elements(cfg.batch_size, x_shape), device)


def train_or_resume(
    cfg: TrainConfig, progress: bool = True, *, callback: Callable[[dict], None] | None = None
) -> dict | None:
    """train(cfg), continuing cfg.out_dir's checkpoint when there is one; None (nothing run) when
    that checkpoint already holds cfg.steps steps, so a finished run is reused as it is."""
    ckpt = Path(cfg.out_dir) / CHECKPOINT
    found = ckpt.exists() or previous_path(ckpt).exists()
    if found:
        step = load_checkpoint(ckpt).get("step")
        if isinstance(step, int) and not isinstance(step, bool) and step >= cfg.steps:
            return None
    return train(cfg, resume=found, progress=progress, callback=callback)


class _StopFlag:
    """Records the first SIGINT / SIGTERM and then restores the previous handler (main thread only)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.name = signal.Signals(signum).name
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _WarmEma:
    """AveragedModel's multi_avg_fn: ema <- d ema + (1 - d) current, d = min(decay, (1+n)/(10+n))
    after n = `updates` updates (the score-SDE warmup, so short runs are not dominated by the
    initial weights). The run sets `updates` before each update."""

    def __init__(self, decay: float) -> None:
        self.decay, self.updates = decay, 0

    def __call__(self, ema: list[torch.Tensor], current: list[torch.Tensor], num_averaged: object) -> None:
        n = self.updates
        decay = min(self.decay, (1 + n) / (10 + n))
        if torch.is_floating_point(ema[0]) or torch.is_complex(ema[0]):
            torch._foreach_lerp_(ema, current, 1 - decay)
        else:
            for e, c in zip(ema, current, strict=True):
                e.copy_(e * decay + c * (1 - decay))


class _Run:
    """One training run: everything built and checked before the first step (__init__), then the loop."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, device: torch.device,
                 model: nn.Module | None, resume: bool) -> None:
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.out_dir = Path(cfg.out_dir)
        if cfg.batch_size % world_size:
            raise ValueError(f"batch_size must be divisible by the number of ranks {world_size}, "
                             f"got {cfg.batch_size}")
        self.local_batch = cfg.batch_size // world_size
        self.source: DataSource = load_data(cfg.data, split="train", seed=cfg.seed)
        if cfg.conditional and self.source.num_classes is None:
            raise ValueError(f"conditional=True needs a labelled dataset, got data={cfg.data!r} (no labels)")
        self.shard = self.source.shard(rank, world_size)
        self.num_classes = self.source.num_classes if cfg.conditional else None
        x_shape = self.source.x_shape
        if model is None:  # the parameters must fit before anything is allocated
            model = partial(make_model, cfg.model, x_shape, self.num_classes, **cfg.model_kwargs)
            check_model_fits(model, device)
            torch.manual_seed(cfg.seed)
            self.net = model()
        else:
            torch.manual_seed(cfg.seed)
            self.net = model
        self.net.to(device)
        self.bridge = PhaseBridge(cfg.p, cfg.k, cfg.varx, cfg.varv, cfg.mode)
        self.amp = cfg.bf16 and device.type == "cuda"
        _check_output(self.net, x_shape, self.num_classes, device, cfg.data)
        check_batch_fits(self.net, x_shape, self.num_classes, device, self.amp, self.local_batch, world_size)
        self.ema_average = _WarmEma(cfg.ema_decay)
        self.ema = AveragedModel(self.net, multi_avg_fn=self.ema_average, use_buffers=True)
        self.ema.eval()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, partial(lr_factor, warmup=cfg.warmup_steps, total=cfg.steps))
        self.gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "data", rank, 0))
        self.ckpt_path = self.out_dir / CHECKPOINT
        self.records = Records(self.out_dir) if rank == 0 else None
        self.step = 0
        self.good: tuple[Path, int] | None = None  # the last checkpoint known good: (file, step)
        self.changes: dict[str, tuple] = {}  # config keys changed at this resume: (saved, new)
        if resume:
            self._restore()
        elif self.ckpt_path.exists() or previous_path(self.ckpt_path).exists():
            raise ValueError(f"out_dir {str(self.out_dir)!r} already holds a checkpoint; pass resume=True "
                             f"(--resume) to continue it, or choose another out_dir")
        if self.step >= cfg.steps:
            raise ValueError(f"steps must be > the checkpoint's step {self.step} to train further, "
                             f"got {cfg.steps}")
        self.forward: nn.Module = self.net
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.net, device_ids=ids)
        if cfg.compile:
            self.forward = torch.compile(self.forward)
        self.images: list[str] = []
        self.eval_numbers: dict = {}

    def _restore(self) -> None:
        """Load the checkpoint (checked by checkpoint.check_training_state before anything is
        restored; a bad checkpoint.pt falls back to a good .prev, which then becomes checkpoint.pt
        again) and apply the config keys changed since (config.RESUME_CHANGEABLE)."""
        prev = previous_path(self.ckpt_path)
        if not (self.ckpt_path.exists() or prev.exists()):
            raise ValueError(f"resume=True but out_dir {str(self.out_dir)!r} holds no checkpoint "
                             f"({CHECKPOINT}); start without resume")
        state, used = read_checkpoint(self.ckpt_path, map_location="cpu", check=self._check_state)
        self.changes = resume_changes(state["config"], self.cfg, str(used))
        self.net.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = state["step"]
        _apply_schedule(self.opt, self.sched, self.cfg)
        _restore_rng(state["rng"], self.gen, self.device, self.rank, self.world_size,
                     derive_seed(self.cfg.seed, "data", self.rank, self.step))
        if used != self.ckpt_path:  # the good previous file becomes checkpoint.pt again
            if self.world_size > 1:
                dist.barrier()  # every rank has read it
            if self.rank == 0:
                try:
                    os.replace(used, self.ckpt_path)
                except OSError as err:
                    raise naming(err, self.ckpt_path) from None
        self.good = (self.ckpt_path, self.step)

    def _check_state(self, state: dict) -> None:
        """checkpoint.check_training_state against this run (CheckpointMismatch for a config that
        differs in a key a resume must keep)."""
        check_training_state(
            state, model=self.net.state_dict(), ema=self.ema.state_dict(), optimizer=self.opt,
            scheduler=self.sched.state_dict(), rng_bytes=(self.gen.get_state().numel(),
                                                          torch.get_rng_state().numel()),
            x_shape=self.source.x_shape, num_classes=self.num_classes,
            check_config=partial(_check_resume, cfg=self.cfg, source=str(self.ckpt_path)))

    def loop(self, progress: bool, stop_after: int | None, callback: Callable[[dict], None] | None) -> dict:
        cfg = self.cfg
        start = self.step
        end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
        if self.records is not None:
            self._record(_open_out_dir(self.out_dir, self.records, self.cfg, start, self.changes, self.device,
                                       self.world_size))
        losses: list[float] = []
        pending: list[torch.Tensor] = []
        stopped = None
        busy = 0.0  # seconds spent on checkpoints and evaluations, left out of steps/s
        t_start = t_log = time.perf_counter()
        bar = progress_bar(total=cfg.steps, initial=start, disable=not (progress and self.rank == 0),
                           desc="train")
        self.net.train()
        try:
            with _StopFlag() as flag:
                for step in range(start, end):
                    loss, x1, y, t = self._train_step(step)
                    pending.append(loss.detach())
                    self.step = done = step + 1
                    bar.update(1)
                    if callback is not None:
                        callback({"step": done, "rank": self.rank, "x1": x1, "y": y, "t": t, "loss": loss})
                    stopped = _agree_stop(flag.name, self.device, self.world_size)
                    if stopped is None and done == end and end < cfg.steps:
                        stopped = "stop_after"
                    periodic = cfg.ckpt_every > 0 and done % cfg.ckpt_every == 0
                    save = done == end or stopped is not None or periodic
                    evaluate = cfg.eval_samples > 0 and stopped is None and (
                        done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0))
                    if save or evaluate or done % cfg.log_every == 0:
                        rate = len(pending) / max(time.perf_counter() - t_log, 1e-9)
                        losses += self._flush(pending, done, rate, bar)
                        pending, t_log = [], time.perf_counter()
                    tic = time.perf_counter()
                    if save:
                        self._save(done)
                    if evaluate:
                        self._evaluate(done)
                    busy += time.perf_counter() - tic
                    t_log += time.perf_counter() - tic
                    if stopped is not None:
                        break
        finally:
            bar.close()
            if self.records is not None:
                self.records.close()
        elapsed = max(time.perf_counter() - t_start - busy, 1e-9)
        summary = {
            "step": self.step, "start_step": start, "losses": losses,
            "steps_per_s": (self.step - start) / elapsed, "stopped": stopped,
            "checkpoint": str(self.ckpt_path), "metrics": str(self.out_dir / METRICS),
            "out_dir": str(self.out_dir),
            "eval": self.eval_numbers, "images": self.images, "model": self.net, "ema": self.ema.module,
            "rank": self.rank, "world_size": self.world_size,
        }
        self._record({"event": "end", "step": self.step, "stopped": stopped,
                      "steps_per_s": summary["steps_per_s"]})
        return summary

    def _train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One optimizer step; returns (loss, x1, y, t)."""
        cfg = self.cfg
        x1, y = self.shard.sample(self.local_batch, self.gen)
        t = cfg.t0 + (cfg.T - cfg.t0) * torch.rand(self.local_batch, generator=self.gen, dtype=torch.float64)
        x1 = x1.to(self.device, non_blocking=True)
        t = t.to(self.device, torch.float32)
        cond = y.to(self.device) if cfg.conditional else None
        loss = training_loss(self._model_call, self.bridge, x1, t, cond,
                             seed=derive_seed(cfg.seed, "noise", step), weighting=cfg.weighting,
                             backend=cfg.backend, row_offset=self.rank * self.local_batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.ema_average.updates = step
        self.ema.update_parameters(self.net)
        return loss, x1, y, t

    def _model_call(self, m: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with ctx:
            return self.forward(m, t) if cond is None else self.forward(m, t, cond)

    def _flush(self, pending: list[torch.Tensor], done: int, rate: float, bar: tqdm) -> list[float]:
        """Per-step losses since the last flush (mean over ranks); raises on a non-finite one."""
        values = torch.stack(pending).float()
        if self.world_size > 1:
            dist.all_reduce(values)
            values /= self.world_size
        values = values.tolist()
        first = done - len(values) + 1
        for i, value in enumerate(values):
            if not math.isfinite(value):
                self._fail(first + i, f"loss is {value} at step {first + i}", "loss")
        lr = self.sched.get_last_lr()[0]
        mean = sum(values) / len(values)
        if self.records is not None:
            bar.set_postfix(loss=f"{mean:.4g}", lr=f"{lr:.3g}", steps_per_s=f"{rate:.3g}")
            self.records.record({"step": done, "loss": mean, "lr": lr, "steps_per_s": rate})
            self.records.scalars("train", {"loss": mean, "lr": lr, "steps_per_s": rate}, done)
        return values

    def _fail(self, step: int, what: str, kind: str) -> None:
        """Stop on a non-finite loss or weights: record it, raise FloatingPointError naming the step
        and the last good checkpoint (or saying that none exists)."""
        if self.good is None:
            kept = f"no good checkpoint exists in {str(self.out_dir)!r}"
        else:
            kept = f"the last good checkpoint {self.good[0]} (step {self.good[1]}) is kept"
        self._record({"event": "nonfinite", "step": step, "what": kind, "detail": what,
                      "good_step": None if self.good is None else self.good[1]})
        raise FloatingPointError(f"{what}: training stopped; {kept}")

    def _save(self, done: int) -> None:
        """Checkpoint step `done` (rank 0 writes; every rank takes part); only finite model and EMA
        weights are written, non-finite ones stop the run (FloatingPointError) on every rank."""
        if not all_finite([*self.net.state_dict().values(), *self.ema.state_dict().values()]):
            self._fail(done, f"the weights are non-finite after step {done} (not saved)", "weights")
        rng = _gather_rng(self.gen, self.device, self.world_size)
        if self.rank == 0:
            state = {
                "step": done, "config": config_to_dict(self.cfg), "model": self.net.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng": rng,
                "x_shape": list(self.source.x_shape), "num_classes": self.num_classes,
            }
            save_checkpoint(self.ckpt_path, state)
            self._record({"event": "checkpoint", "step": done, "path": str(self.ckpt_path)})
        self.good = (self.ckpt_path, done)
        if self.world_size > 1:
            dist.barrier()

    def _record(self, entry: dict) -> None:
        if self.records is not None:
            self.records.record(entry)

    def _evaluate(self, done: int) -> None:
        if self.records is not None:
            numbers, images = evaluate(self.cfg, self.bridge, self.ema.module, self.source,
                                       self.out_dir / "eval", f"step{done:07d}", self.device)
            self.eval_numbers, self.images = numbers, self.images + images
            self.records.record({"event": "eval", "step": done, **numbers, "images": images})
            self.records.scalars("eval", numbers, done)
        if self.world_size > 1:
            dist.barrier()


def _check_out_dir(out_dir: Path) -> None:
    """ValueError when out_dir is, or lies inside, an existing file (the run could never write it)."""
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                what = "is an existing file" if folder == out_dir else f"lies inside the file {str(folder)!r}"
                raise ValueError(f"out_dir must be a folder, got {str(out_dir)!r}, which {what}")
            return


def _check_resume(saved: dict, cfg: TrainConfig, source: str) -> None:
    """CheckpointMismatch when a checkpoint's config differs from cfg in a key a resume must keep."""
    try:
        resume_changes(saved, cfg, source)
    except ValueError as err:
        raise CheckpointMismatch(str(err)) from None


def _open_out_dir(out_dir: Path, records: Records, cfg: TrainConfig, start: int, changes: dict,
                  device: torch.device, world_size: int) -> dict:
    """Prepare out_dir (rank 0): remove the temporary files of interrupted writes, drop the metrics
    records past `start`, write config.json (atomically). Returns the start / resume event."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise naming(err, out_dir) from None
    removed = remove_stale_temporaries(out_dir, (CHECKPOINT, METRICS, CONFIG_JSON))
    dropped = records.open(start)
    text = json.dumps(config_to_dict(cfg), indent=2) + "\n"
    write_atomic(out_dir / CONFIG_JSON, lambda f: f.write(text.encode("utf-8")))
    event = {"event": "resume" if start else "start", "step": start, "world_size": world_size,
             "device": str(device)}
    if changes:
        event["changed"] = {key: list(values) for key, values in changes.items()}
    if removed:
        event["removed_temporary_files"] = [p.name for p in removed]
    if dropped:
        event["dropped_records"] = dropped
    return event


def _check_output(net: nn.Module, x_shape: tuple[int, ...], num_classes: int | None, device: torch.device,
                  data: str) -> None:
    """One tiny forward pass (eval mode, no grad, no RNG drawn) to catch shape mismatches early."""
    m = torch.zeros((2, 2 * x_shape[0], *x_shape[1:]), device=device)
    t = torch.full((2,), 0.5, device=device)
    cond = None if num_classes is None else torch.zeros(2, dtype=torch.long, device=device)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            F = net(m, t) if cond is None else net(m, t, cond)
    finally:
        net.train(was_training)
    if not isinstance(F, torch.Tensor) or tuple(F.shape) != (2, *x_shape):
        got = tuple(F.shape) if isinstance(F, torch.Tensor) else type(F).__name__
        raise ValueError(f"model must map m [B, {2 * x_shape[0]}, ...] to F of the data's shape "
                         f"[B, {', '.join(map(str, x_shape))}], got {got} for data={data!r}")


def _apply_schedule(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR,
                    cfg: TrainConfig) -> None:
    """Set the scheduler's base lr and the optimizer's lr / weight decay from cfg at the scheduler's
    step, so that lr, weight_decay, steps and warmup_steps changed at a resume act from the next
    step (the lr is computed as LambdaLR does: unchanged keys give back the saved values bit for bit)."""
    sched.base_lrs = [cfg.lr for _ in opt.param_groups]
    for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["weight_decay"] = cfg.weight_decay
        group["lr"] = base * factor(sched.last_epoch)


def _agree_stop(name: str | None, device: torch.device, world_size: int) -> str | None:
    """The signal name if any rank got one (every rank stops at the same step)."""
    if world_size == 1:
        return name
    code = {None: 0, "SIGINT": 1, "SIGTERM": 2}[name]
    flag = torch.tensor([code], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return {0: None, 1: "SIGINT", 2: "SIGTERM"}[int(flag.item())]


def _restore_rng(rng: dict, gen: torch.Generator, device: torch.device, rank: int, world_size: int,
                 reseed: int) -> None:
    """Set this rank's RNG states from a checkpoint's (_gather_rng); written by another number of
    ranks, the data generator is reseeded with `reseed` instead (with a RuntimeWarning)."""
    if rng["world_size"] == world_size:
        gen.set_state(rng["data"][rank])
        torch.set_rng_state(rng["torch"][rank])
        if device.type == "cuda" and rng["cuda"][rank] is not None:
            torch.cuda.set_rng_state(rng["cuda"][rank], device)
    else:
        warnings.warn(f"checkpoint was written by {rng['world_size']} rank(s), resuming on "
                      f"{world_size}: data streams are reseeded", RuntimeWarning, stacklevel=4)
        gen.manual_seed(reseed)


def _gather_rng(gen: torch.Generator, device: torch.device, world_size: int) -> dict:
    """Every rank's RNG states (data generator, torch CPU, CUDA), for the checkpoint."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    mine = (gen.get_state(), torch.get_rng_state(), cuda)
    if world_size == 1:
        every = [mine]
    else:
        every = [None] * world_size
        dist.all_gather_object(every, mine)
    return {"world_size": world_size, "data": [s[0] for s in every], "torch": [s[1] for s in every],
            "cuda": [None if s[2] is None else s[2].cpu() for s in every]}
