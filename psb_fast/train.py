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
metrics.jsonl (one JSON object per line: logs, evaluations, events), eval/*.png, tb/ (TensorBoard,
when installed).

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
- Bad config values, dataset or model names, data shapes, an out_dir that is a file or already
  holds a checkpoint without resume=True, or a batch_size whose batch tensors and activations
  cannot fit in memory raise TypeError / ValueError before the first step.
- A failed write (disk full, read-only out_dir) raises OSError naming the file; the checkpoint on
  disk stays as it was.

Distributed (torchrun): gloo on CPU, NCCL on CUDA; cfg.batch_size is the global batch, split
evenly over ranks; each rank draws from its own shard with its own generator; rank 0 logs,
evaluates and writes checkpoints (out_dir must be visible to every rank to resume).
"""

from __future__ import annotations

import contextlib
import json
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
    load_checkpoint,
    naming,
    previous_path,
    read_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    write_atomic,
)
from .config import AUTO_THREADS_SMALL, TrainConfig, config_to_dict, resume_changes, resume_fixed
from .data import DataSource, load_data
from .distributed import distributed_env, init_group, resolve_device
from .models import make_model
from .ops import float64 as f64
from .ops.bridge_sample import bridge_sample
from .sampler import PhaseSampler
from .seeds import derive_seed

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG_JSON = "config.json"
# Fields a resumed run must share with its checkpoint (config.RESUME_CHANGEABLE lists the others).
RESUME_FIXED = tuple(resume_fixed())
# Entries of a training checkpoint (all checked before a resume restores anything).
STATE_KEYS = ("step", "config", "model", "ema", "optimizer", "scheduler", "rng", "x_shape", "num_classes")
ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")
IMAGE_GRID_MAX = 64


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
    (w = 1/sqrt(1 - t)) or "none" (w = 1). backend "reference" takes the plain float64 PyTorch
    data path and loss (psb_fast.ops.float64); the others the fused bridge_sample and a
    float32 loss.
    """
    if weighting not in ("reciprocal", "none"):
        raise ValueError(f"weighting must be 'reciprocal' or 'none', got {weighting!r}")
    m_t, label = bridge_sample(bridge, x1, t, seed=seed, backend=backend, row_offset=row_offset)
    F = model(m_t, t) if cond is None else model(m_t, t, cond)
    if F.shape != label.shape:
        raise ValueError(f"model output must have x1's shape {tuple(label.shape)}, got {tuple(F.shape)}")
    if backend == "reference":
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
    device = resolve_device(cfg.device, "device", local_rank if world_size > 1 else None)
    init_group(device, world_size)
    run = _Run(cfg, rank, world_size, device, model, resume)
    previous = torch.get_num_threads()
    torch.set_num_threads(thread_count(cfg, run.source.x_shape, device))
    try:
        return run.loop(progress, stop_after, callback)
    finally:
        torch.set_num_threads(previous)


def thread_count(cfg: TrainConfig, x_shape: tuple[int, ...], device: torch.device) -> int:
    """torch's CPU threads for this run: cfg.threads, or with 0 (auto) AUTO_THREADS_SMALL for
    1-D data on the CPU (small MLPs, where more threads only add synchronisation) and torch's
    current count otherwise."""
    if cfg.threads:
        return cfg.threads
    if device.type == "cpu" and len(x_shape) == 1:
        return AUTO_THREADS_SMALL
    return torch.get_num_threads()


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


class _Run:
    """The state of one training run: built and checked before the first step."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, device: torch.device,
                 model: nn.Module | None, resume: bool) -> None:
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.out_dir = Path(cfg.out_dir)
        _check_out_dir(self.out_dir)
        if cfg.batch_size % world_size:
            raise ValueError(f"batch_size must be divisible by the number of ranks {world_size}, "
                             f"got {cfg.batch_size}")
        self.local_batch = cfg.batch_size // world_size
        self.source: DataSource = load_data(cfg.data, split="train", seed=cfg.seed)
        if cfg.conditional and self.source.num_classes is None:
            raise ValueError(f"conditional=True needs a labelled dataset, got data={cfg.data!r} (no labels)")
        self.shard = self.source.shard(rank, world_size)
        num_classes = self.source.num_classes if cfg.conditional else None
        self.num_classes = num_classes
        torch.manual_seed(cfg.seed)
        self.net = model if model is not None else make_model(
            cfg.model, self.source.x_shape, num_classes, **cfg.model_kwargs)
        self.net.to(device)
        self.bridge = PhaseBridge(cfg.p, cfg.k, cfg.varx, cfg.varv, cfg.mode)
        self.amp = cfg.bf16 and device.type == "cuda"
        self._check_model(num_classes)
        self._check_memory(num_classes)
        self._ema_updates = 0
        self.ema = AveragedModel(self.net, multi_avg_fn=self._ema_lerp, use_buffers=True)
        self.ema.eval()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, partial(lr_factor, warmup=cfg.warmup_steps, total=cfg.steps))
        self.gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "data", rank, 0))
        self.ckpt_path = self.out_dir / CHECKPOINT
        self.metrics_path = self.out_dir / METRICS
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
        self.writer = None
        self.images: list[str] = []
        self.eval_numbers: dict = {}

    def _check_model(self, num_classes: int | None) -> None:
        """One tiny forward pass (eval mode, no grad, no RNG drawn) to catch shape mismatches early."""
        x_shape = self.source.x_shape
        m = torch.zeros((2, 2 * x_shape[0], *x_shape[1:]), device=self.device)
        t = torch.full((2,), 0.5, device=self.device)
        cond = None if num_classes is None else torch.zeros(2, dtype=torch.long, device=self.device)
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                F = self.net(m, t) if cond is None else self.net(m, t, cond)
        finally:
            self.net.train(was_training)
        if not isinstance(F, torch.Tensor) or tuple(F.shape) != (2, *x_shape):
            got = tuple(F.shape) if isinstance(F, torch.Tensor) else type(F).__name__
            raise ValueError(f"model must map m [B, {2 * x_shape[0]}, ...] to F of the data's shape "
                             f"[B, {', '.join(map(str, x_shape))}], got {got} for data={self.cfg.data!r}")

    def _check_memory(self, num_classes: int | None) -> None:
        """ValueError before any step when the batch cannot fit: batch_size x the bytes per sample of
        the batch tensors (x1, t, m_t, label, F, the weighted error) and the activations the model
        keeps for backward (measured on two tiny batches) exceeds the memory of the device (CPU:
        physical memory, or the cgroup limit when lower, shared by this machine's ranks; CUDA: the
        free memory). A lower bound: a batch that passes may still not fit."""
        available, where = _available_memory(self.device)
        if available is None:
            return
        d = math.prod(self.source.x_shape)
        per_sample = 4 * 6 * d + 12 + self._activation_bytes(num_classes)
        sharing = _local_ranks() if self.device.type == "cpu" else 1
        need = per_sample * self.local_batch * sharing
        if need > available:
            limit = available // (per_sample * sharing) * self.world_size
            raise ValueError(
                f"batch_size must be <= {limit} to fit in the {available / 2**30:.1f} GiB of {where} "
                f"(~{per_sample} bytes per sample for the batch tensors and the activations kept for "
                f"backward, ~{need / 2**30:.1f} GiB in all), got {self.cfg.batch_size}")

    def _activation_bytes(self, num_classes: int | None) -> int:
        """Bytes per sample of the tensors a forward pass saves for backward: the difference between
        batches of 4 and 2 (eval mode, no RNG drawn, nothing kept; parameters cancel out)."""
        x_shape = self.source.x_shape

        def saved(n: int) -> int:
            m = torch.zeros((n, 2 * x_shape[0], *x_shape[1:]), device=self.device)
            t = torch.full((n,), 0.5, device=self.device)
            cond = None if num_classes is None else torch.zeros(n, dtype=torch.long, device=self.device)
            inputs = {x.untyped_storage().data_ptr() for x in (m, t, cond) if x is not None}
            storages: dict[int, int] = {}  # the inputs are counted with the batch tensors

            def pack(tensor: torch.Tensor) -> torch.Tensor:
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in inputs:
                    storages[storage.data_ptr()] = storage.nbytes()
                return tensor

            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), ctx:
                self.net(m, t) if cond is None else self.net(m, t, cond)
            return sum(storages.values())

        was_training = self.net.training
        self.net.eval()
        try:
            return max(0, (saved(4) - saved(2)) // 2)
        finally:
            self.net.train(was_training)

    def _restore(self) -> None:
        """Load the checkpoint (checked by _check_state before anything is restored; a bad
        checkpoint.pt falls back to a good .prev, which then becomes checkpoint.pt again) and apply
        the config keys changed since (config.RESUME_CHANGEABLE)."""
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
        self._apply_schedule()
        rng = state["rng"]
        if rng["world_size"] == self.world_size:
            self.gen.set_state(rng["data"][self.rank])
            torch.set_rng_state(rng["torch"][self.rank])
            if self.device.type == "cuda" and rng["cuda"][self.rank] is not None:
                torch.cuda.set_rng_state(rng["cuda"][self.rank], self.device)
        else:
            warnings.warn(f"checkpoint was written by {rng['world_size']} rank(s), resuming on "
                          f"{self.world_size}: data streams are reseeded", RuntimeWarning, stacklevel=3)
            self.gen.manual_seed(derive_seed(self.cfg.seed, "data", self.rank, self.step))
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
        """ValueError saying what is wrong when a loaded checkpoint cannot restore this run exactly
        (missing entries, wrong types, tensor shapes or dtypes that do not fit the model, optimizer,
        scheduler or RNG states, non-finite weights); CheckpointMismatch when its config differs in a
        key a resume must keep."""
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"entries {missing} are missing")
        if not isinstance(state["config"], dict):
            raise ValueError(f"entry 'config' must be a dict, got {type(state['config']).__name__}")
        try:
            resume_changes(state["config"], self.cfg, str(self.ckpt_path))
        except ValueError as err:
            raise CheckpointMismatch(str(err)) from None
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"entry 'step' must be an int >= 0, got {step!r}")
        _check_tensors("model", state["model"], self.net.state_dict())
        _check_tensors("ema", state["ema"], self.ema.state_dict())
        if not _all_finite([*state["model"].values(), *state["ema"].values()]):
            raise ValueError("entries 'model' / 'ema' hold non-finite weights")
        _check_optimizer(state["optimizer"], self.opt)
        _check_scheduler(state["scheduler"], self.sched.state_dict(), step)
        _check_rng(state["rng"], self.gen.get_state().numel(), torch.get_rng_state().numel())
        if state["x_shape"] != list(self.source.x_shape):
            raise ValueError(f"entry 'x_shape' must be the data's {list(self.source.x_shape)}, "
                             f"got {state['x_shape']!r}")
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"entry 'num_classes' must be {self.num_classes!r}, "
                             f"got {state['num_classes']!r}")

    def _apply_schedule(self) -> None:
        """Set the scheduler's base lr and the optimizer's lr / weight decay from cfg at self.step, so
        that lr, weight_decay, steps and warmup_steps changed at a resume act from the next step (the
        lr is computed as LambdaLR does: unchanged keys give back the saved values bit for bit)."""
        self.sched.base_lrs = [self.cfg.lr for _ in self.opt.param_groups]
        for group, base, factor in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas,
                                       strict=True):
            group["initial_lr"] = base
            group["weight_decay"] = self.cfg.weight_decay
            group["lr"] = base * factor(self.sched.last_epoch)

    def loop(self, progress: bool, stop_after: int | None, callback: Callable[[dict], None] | None) -> dict:
        cfg = self.cfg
        start = self.step
        end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
        lead = self.rank == 0
        if lead:
            self._open_records(start)
        losses: list[float] = []
        pending: list[torch.Tensor] = []
        stopped = None
        busy = 0.0  # seconds spent on checkpoints and evaluations, left out of steps/s
        t_start = t_log = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and lead), desc="train")
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
                    stopped = self._agree_stop(flag.name)
                    if stopped is None and done == end and end < cfg.steps:
                        stopped = "stop_after"
                    periodic = cfg.ckpt_every > 0 and done % cfg.ckpt_every == 0
                    save = done == end or stopped is not None or periodic
                    evaluate = cfg.eval_samples > 0 and stopped is None and (
                        done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0))
                    if save or evaluate or done % cfg.log_every == 0:
                        now = time.perf_counter()
                        rate = len(pending) / max(now - t_log, 1e-9)
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
            if self.writer is not None:
                self.writer.close()
        elapsed = max(time.perf_counter() - t_start - busy, 1e-9)
        summary = {
            "step": self.step, "start_step": start, "losses": losses,
            "steps_per_s": (self.step - start) / elapsed, "stopped": stopped,
            "checkpoint": str(self.ckpt_path), "metrics": str(self.metrics_path),
            "out_dir": str(self.out_dir),
            "eval": self.eval_numbers, "images": self.images, "model": self.net, "ema": self.ema.module,
            "rank": self.rank, "world_size": self.world_size,
        }
        if lead:
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
        self._ema_updates = step
        self.ema.update_parameters(self.net)
        return loss, x1, y, t

    def _ema_lerp(self, ema: list[torch.Tensor], current: list[torch.Tensor], num_averaged: object) -> None:
        """AveragedModel's multi_avg_fn: ema <- d ema + (1 - d) current, d = min(ema_decay, (1+n)/(10+n))
        after n updates (the score-SDE warmup, so short runs are not dominated by the initial weights).
        """
        n = self._ema_updates
        decay = min(self.cfg.ema_decay, (1 + n) / (10 + n))
        if torch.is_floating_point(ema[0]) or torch.is_complex(ema[0]):
            torch._foreach_lerp_(ema, current, 1 - decay)
        else:
            for e, c in zip(ema, current, strict=True):
                e.copy_(e * decay + c * (1 - decay))

    def _model_call(self, m: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with ctx:
            return self.forward(m, t) if cond is None else self.forward(m, t, cond)

    def _agree_stop(self, name: str | None) -> str | None:
        """The signal name if any rank got one (every rank stops at the same step)."""
        if self.world_size == 1:
            return name
        code = {None: 0, "SIGINT": 1, "SIGTERM": 2}[name]
        flag = torch.tensor([code], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return {0: None, 1: "SIGINT", 2: "SIGTERM"}[int(flag.item())]

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
        if self.rank == 0:
            bar.set_postfix(loss=f"{mean:.4g}", lr=f"{lr:.3g}", steps_per_s=f"{rate:.3g}")
            self._record({"step": done, "loss": mean, "lr": lr, "steps_per_s": rate})
            if self.writer is not None:
                self.writer.add_scalar("train/loss", mean, done)
                self.writer.add_scalar("train/lr", lr, done)
                self.writer.add_scalar("train/steps_per_s", rate, done)
        return values

    def _fail(self, step: int, what: str, kind: str) -> None:
        """Stop on a non-finite loss or weights: record it, raise FloatingPointError naming the step
        and the last good checkpoint (or saying that none exists)."""
        if self.good is None:
            kept = f"no good checkpoint exists in {str(self.out_dir)!r}"
        else:
            kept = f"the last good checkpoint {self.good[0]} (step {self.good[1]}) is kept"
        if self.rank == 0:
            self._record({"event": "nonfinite", "step": step, "what": kind, "detail": what,
                          "good_step": None if self.good is None else self.good[1]})
        raise FloatingPointError(f"{what}: training stopped; {kept}")

    def _rng_state(self) -> dict:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        mine = (self.gen.get_state(), torch.get_rng_state(), cuda)
        if self.world_size == 1:
            every = [mine]
        else:
            every = [None] * self.world_size
            dist.all_gather_object(every, mine)
        return {"world_size": self.world_size, "data": [s[0] for s in every], "torch": [s[1] for s in every],
                "cuda": [None if s[2] is None else s[2].cpu() for s in every]}

    def _save(self, done: int) -> None:
        """Checkpoint step `done` (rank 0 writes; every rank takes part); only finite model and EMA
        weights are written, non-finite ones stop the run (FloatingPointError) on every rank."""
        if not _all_finite([*self.net.state_dict().values(), *self.ema.state_dict().values()]):
            self._fail(done, f"the weights are non-finite after step {done} (not saved)", "weights")
        rng = self._rng_state()
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

    def _open_records(self, start: int) -> None:
        """Prepare out_dir (rank 0): remove the temporary files of interrupted writes, drop the
        metrics records past `start`, write config.json (atomically), open TensorBoard, record the
        start / resume."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise naming(err, self.out_dir) from None
        removed = remove_stale_temporaries(self.out_dir, (CHECKPOINT, METRICS, CONFIG_JSON))
        dropped = self._truncate_metrics(start)
        text = json.dumps(config_to_dict(self.cfg), indent=2) + "\n"
        write_atomic(self.out_dir / CONFIG_JSON, lambda f: f.write(text.encode("utf-8")))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(self.out_dir / "tb"))
        event = {"event": "resume" if start else "start", "step": start, "world_size": self.world_size,
                 "device": str(self.device)}
        if self.changes:
            event["changed"] = {key: list(values) for key, values in self.changes.items()}
        if removed:
            event["removed_temporary_files"] = [p.name for p in removed]
        if dropped:
            event["dropped_records"] = dropped
        self._record(event)

    def _truncate_metrics(self, start: int) -> int:
        """Drop the metrics records of steps after `start` (an earlier run's, written past the
        checkpoint this run starts from) and torn lines, so every step keeps one record; rewrites
        the file atomically when anything is dropped. Returns the number of lines dropped."""
        if not self.metrics_path.exists():
            return 0
        try:
            lines = self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as err:
            raise naming(err, self.metrics_path) from None
        keep = [line for line in lines if _record_at_or_before(line, start)]
        if len(keep) < len(lines):
            text = "".join(line + "\n" for line in keep)
            write_atomic(self.metrics_path, lambda f: f.write(text.encode("utf-8")))
        return len(lines) - len(keep)

    def _record(self, entry: dict) -> None:
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": time.time(), **entry}) + "\n")
        except OSError as err:
            raise naming(err, self.metrics_path) from None

    def _evaluate(self, done: int) -> None:
        if self.rank == 0:
            numbers, images = evaluate(self.cfg, self.bridge, self.ema.module, self.source,
                                       self.out_dir / "eval", f"step{done:07d}", self.device)
            self.eval_numbers, self.images = numbers, self.images + images
            self._record({"event": "eval", "step": done, **numbers, "images": images})
            if self.writer is not None:
                for key, value in numbers.items():
                    self.writer.add_scalar(f"eval/{key}", value, done)
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


def _available_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes, description) of the memory a batch may use on `device`: CUDA free memory; on the CPU
    the physical memory, or the cgroup v2 limit when lower. (None, "") when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory on {device}"
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None, ""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        limit = "max"
    if limit.isdigit() and int(limit) < total:
        return int(limit), "memory allowed to this container (cgroup memory.max)"
    return total, "physical memory"


def _local_ranks() -> int:
    """Ranks of this run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without it)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) >= 1 else 1


def _all_finite(tensors: list) -> bool:
    """Whether every floating-point tensor in `tensors` is finite (one device sync in all)."""
    flags = [torch.isfinite(t).all() for t in tensors
             if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]
    return not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def _check_tensors(name: str, saved: object, expected: dict) -> None:
    """ValueError unless `saved` is a dict of tensors with the keys, shapes and dtypes of `expected`."""
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


def _record_at_or_before(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line is a whole record of a step <= `step` (or of no step)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    if not isinstance(record, dict):
        return False
    at = record.get("step")
    return not (isinstance(at, (int, float)) and not isinstance(at, bool) and at > step)


@torch.no_grad()
def evaluate(cfg: TrainConfig, bridge: PhaseBridge, model: nn.Module, source: DataSource, folder: Path,
             tag: str, device: torch.device) -> tuple[dict, list[str]]:
    """Sample with PhaseSampler(bridge, nfe) (package defaults) at each of cfg.eval_nfes; write PNGs.

    2-D data: a data-vs-samples panel per NFE, phase-space trajectories (x, v, x1_hat) at the
    largest NFE, and the energy distance to the data per NFE (returned as "energy_nfe<N>").
    Other shapes: a grid of at most 64 samples per NFE. Prior noise is seeded by cfg.seed, so
    evaluations at different steps start from the same m0. Returns (numbers, PNG paths).
    """
    from . import plots

    toy = source.x_shape == (2,)
    n = cfg.eval_samples if toy else min(cfg.eval_samples, IMAGE_GRID_MAX)
    if source.size is not None:
        n = min(n, source.size)
    data, labels = source.all(n)
    cond = labels.to(device) if cfg.conditional and labels is not None else None
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "eval"))
    m0 = bridge.sample_prior((n, *source.x_shape), generator=generator, dtype=torch.float32).to(device)
    solver = "ode" if bridge.mode == "probODE" else "sde"
    folder.mkdir(parents=True, exist_ok=True)
    numbers: dict = {}
    images: list[str] = []
    samples: dict[str, torch.Tensor] = {}
    for nfe in sorted(cfg.eval_nfes):
        sampler = PhaseSampler(bridge, nfe, solver=solver, backend=cfg.backend)
        trajectory = None
        if toy and nfe == max(cfg.eval_nfes):
            x1, trajectory = sampler.sample(model, m0, cond=cond, seed=cfg.seed, return_trajectory=True)
        else:
            x1 = sampler.sample(model, m0, cond=cond, seed=cfg.seed)
        x1 = x1.float().cpu()
        if toy:
            samples[plots.sampler_label(sampler)] = x1
            numbers[f"energy_nfe{nfe}"] = energy_distance(data, x1)
            if trajectory is not None:
                path = folder / f"{tag}_trajectories.png"
                plots.phase_trajectories(trajectory, path, title=f"{tag}: {plots.sampler_label(sampler)}")
                images.append(str(path))
        else:
            path = folder / f"{tag}_nfe{nfe}.png"
            plots.image_grid(x1, path, title=f"{tag}: {plots.sampler_label(sampler)}")
            images.append(str(path))
    if toy:
        path = folder / f"{tag}_samples.png"
        plots.toy_panels(data, samples, path, title=f"{tag}: samples with the default settings per NFE")
        images.append(str(path))
    return numbers, images


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance 2 E|A-B| - E|A-A'| - E|B-B'| between point sets a [N, D] and b [M, D] (>= 0)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())
