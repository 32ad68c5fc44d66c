"""The training loop: one readable loop over fused bridge samples, with checkpoints that lose nothing.

    summary = train(load_config("run.toml"))                 # one process
    torchrun --nproc_per_node 4 <entry> ...                  # several: train() reads RANK / WORLD_SIZE

Each step: a batch x1 (and labels) and times t ~ U[t0, T] are drawn from this rank's torch.Generator;
psb_fast.bridge_sample turns them into (m_t, label) in one fused pass, with noise keyed by a seed
derived from (cfg.seed, step) and the rank's row offset; the loss is mean((w(t) (F - label))^2)
(SPEC §2). AdamW, linear warmup then cosine decay, gradient clipping, an EMA of the weights
(torch.optim.swa_utils.AveragedModel; decay min(ema_decay, (1 + n) / (10 + n)) after n updates),
bf16 autocast on CUDA, optional torch.compile.

Files in cfg.out_dir: checkpoint.pt (and checkpoint.pt.prev, see psb_fast.checkpoint), config.json,
metrics.jsonl (one JSON object per line: logs, evaluations, events), eval/*.png, tb/ (TensorBoard,
when installed).

Fault handling:
- resume=True continues from checkpoint.pt (model, EMA, optimizer, scheduler, step, RNG states):
  on CPU the following losses equal those of an uninterrupted run bit for bit.
- SIGINT / SIGTERM: the current step finishes, a checkpoint is written, train() returns with
  summary["stopped"] set to the signal's name (a second signal acts as usual).
- A non-finite loss raises FloatingPointError naming the step; no checkpoint is written after
  it, so the last good one is kept.
- Bad config values, dataset or model names, data shapes, or an out_dir that already holds a
  checkpoint without resume=True raise TypeError / ValueError before the first step.

Distributed (torchrun): gloo on CPU, NCCL on CUDA; cfg.batch_size is the global batch, split
evenly over ranks; each rank draws from its own shard with its own generator; rank 0 logs,
evaluates and writes checkpoints (out_dir must be visible to every rank to resume).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
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
from .checkpoint import load_checkpoint, previous_path, save_checkpoint
from .config import TrainConfig, config_to_dict
from .data import DataSource, load_data
from .models import make_model
from .reference.bridge import training_loss_reference
from .sample_bridge import bridge_sample
from .sampler import PhaseSampler

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# Fields a resumed run must share with its checkpoint (the rest may change between runs).
RESUME_FIXED = ("data", "model", "model_kwargs", "conditional", "p", "k", "varx", "varv", "mode")
IMAGE_GRID_MAX = 64


def derive_seed(*parts: object) -> int:
    """A seed in [0, 2**63) from any tuple of ints / strings (stable across runs and machines)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


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
    """The SPEC §2 loss mean((w(t) (F - label))^2) on a batch, a 0-dim float tensor with grad.

    x1: data [B, C, ...]; t: times [B] on x1's device; cond: labels [B] or None (model(m, t) then).
    seed / row_offset: the bridge noise (psb_fast.bridge_sample). weighting: "reciprocal"
    (w = 1/sqrt(1 - t)) or "none" (w = 1). backend "reference" takes the plain PyTorch data path
    and loss (psb_fast.reference.bridge); the others the fused bridge_sample and a float32 loss.
    """
    if weighting not in ("reciprocal", "none"):
        raise ValueError(f"weighting must be 'reciprocal' or 'none', got {weighting!r}")
    m_t, label = bridge_sample(bridge, x1, t, seed=seed, backend=backend, row_offset=row_offset)
    F = model(m_t, t) if cond is None else model(m_t, t, cond)
    if F.shape != label.shape:
        raise ValueError(f"model output must have x1's shape {tuple(label.shape)}, got {tuple(F.shape)}")
    if backend == "reference":
        return training_loss_reference(bridge, F, label, t, "uniform" if weighting == "none" else weighting)
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
        TypeError / ValueError before any step on bad input; FloatingPointError on a non-finite loss.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                   or stop_after < 1):
        raise ValueError(f"stop_after must be an int >= 1 or None, got {stop_after!r}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    rank, world_size, local_rank = _distributed_env()
    device = _resolve_device(cfg.device, local_rank if world_size > 1 else None)
    _init_group(device, world_size)
    return _Run(cfg, rank, world_size, device, model, resume).loop(progress, stop_after, callback)


def train_or_resume(
    cfg: TrainConfig, progress: bool = True, *, callback: Callable[[dict], None] | None = None
) -> dict | None:
    """train(cfg), continuing cfg.out_dir's checkpoint when there is one; None (nothing run) when
    that checkpoint already holds cfg.steps steps, so a finished run is reused as it is."""
    ckpt = Path(cfg.out_dir) / CHECKPOINT
    if ckpt.exists() and int(load_checkpoint(ckpt)["step"]) >= cfg.steps:
        return None
    return train(cfg, resume=ckpt.exists(), progress=progress, callback=callback)


def _distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 without it)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {exc}") from exc
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE), got RANK={rank}, WORLD_SIZE={world_size}")
    return rank, world_size, local_rank


def _resolve_device(name: str, local_rank: int | None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device must be 'cpu' or 'auto' on a machine without CUDA, got {name!r}")
        if name == "cuda":
            name = f"cuda:{local_rank or 0}"
        torch.cuda.set_device(name)
    return torch.device(name)


def _init_group(device: torch.device, world_size: int) -> None:
    """Start the process group (NCCL on CUDA, gloo on CPU) unless one is running.

    The group stays up for later train() calls in the process (torchrun's store does not allow a
    second init after a destroy) and is destroyed at exit.
    """
    if world_size == 1 or dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(_destroy_group)


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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
        self._check_model(num_classes)
        self._ema_updates = 0
        self.ema = AveragedModel(self.net, multi_avg_fn=self._ema_lerp, use_buffers=True)
        self.ema.eval()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, partial(lr_factor, warmup=cfg.warmup_steps, total=cfg.steps))
        self.gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "data", rank, 0))
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_path = self.out_dir / CHECKPOINT
        self.metrics_path = self.out_dir / METRICS
        self.step = 0
        if resume:
            self._restore()
        elif self.ckpt_path.exists():
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
        self.amp = cfg.bf16 and device.type == "cuda"
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

    def _restore(self) -> None:
        if not (self.ckpt_path.exists() or previous_path(self.ckpt_path).exists()):
            raise ValueError(f"resume=True but out_dir {str(self.out_dir)!r} holds no checkpoint "
                             f"({CHECKPOINT}); start without resume")
        state = load_checkpoint(self.ckpt_path, map_location="cpu")
        saved = state["config"]
        changed = [k for k in RESUME_FIXED if saved.get(k) != config_to_dict(self.cfg)[k]]
        if changed:
            raise ValueError(f"cannot resume {self.ckpt_path}: config key(s) {changed} differ from the "
                             f"checkpoint's ({', '.join(f'{k}={saved.get(k)!r}' for k in changed)})")
        self.net.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
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
                self._fail(first + i, value)
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

    def _fail(self, step: int, value: float) -> None:
        kept = f"the last good checkpoint {self.ckpt_path} is kept" if self.ckpt_path.exists() else \
            "no checkpoint was written yet"
        message = f"loss is {value} at step {step}: training stopped; {kept}"
        if self.rank == 0:
            self._record({"event": "nonfinite", "step": step, "loss": str(value)})
        raise FloatingPointError(message)

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
        if self.world_size > 1:
            dist.barrier()

    def _open_records(self, start: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2) + "\n")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(self.out_dir / "tb"))
        self._record({"event": "resume" if start else "start", "step": start, "world_size": self.world_size,
                      "device": str(self.device)})

    def _record(self, entry: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), **entry}) + "\n")

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
            samples[f"NFE {nfe}"] = x1
            numbers[f"energy_nfe{nfe}"] = energy_distance(data, x1)
            if trajectory is not None:
                path = folder / f"{tag}_trajectories.png"
                plots.phase_trajectories(trajectory, path)
                images.append(str(path))
        else:
            path = folder / f"{tag}_nfe{nfe}.png"
            plots.image_grid(x1, path)
            images.append(str(path))
    if toy:
        path = folder / f"{tag}_samples.png"
        plots.toy_panels(data, samples, path)
        images.append(str(path))
    return numbers, images


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance 2 E|A-B| - E|A-A'| - E|B-B'| between point sets a [N, D] and b [M, D] (>= 0)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())
