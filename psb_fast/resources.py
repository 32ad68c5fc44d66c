"""Will a training run fit? Memory estimates checked before the model is built and before step 1.

    check_model_fits(build, device)                        # parameters, built on the meta device
    check_batch_fits(net, x_shape, num_classes, device, amp, local_batch, world_size)

Both raise ValueError in one line saying what does not fit, how much it needs and how much there
is, so an oversized config stops with exit status 2 instead of dying in the allocator. Available
memory: on CUDA the device's free memory; on the CPU the physical memory, or the cgroup v2 limit
when lower, shared by this machine's ranks (torchrun's LOCAL_WORLD_SIZE). Both are lower bounds of
the need: a run that passes may still not fit.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# Copies of each parameter a training step keeps: the weights, their gradient, AdamW's two moments
# and the EMA's copy.
COPIES_PER_PARAMETER = 5
# Bytes per sample of the batch tensors besides the activations: x1, m_t (2x), label, F and the
# weighted error, float32 each (6 tensors of the data's size), plus t, its weight and a label.
BATCH_TENSORS = 6


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes, description) of the memory a run may use on `device`: CUDA free memory; on the CPU
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


def local_ranks() -> int:
    """Ranks of this run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without it)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) >= 1 else 1


def check_model_fits(build: Callable[[], nn.Module], device: torch.device,
                     what: str = "model_kwargs") -> None:
    """ValueError before allocating anything when the network `build()` makes would not fit:
    COPIES_PER_PARAMETER x its parameter bytes against the available memory. `build` is called once
    under the meta device (shapes only, no memory, no RNG drawn); its errors propagate."""
    available, where = available_memory(device)
    if available is None:
        return
    with torch.device("meta"):
        net = build()
    count = sum(p.numel() for p in net.parameters())
    need = COPIES_PER_PARAMETER * sum(p.numel() * p.element_size() for p in net.parameters())
    need += sum(b.numel() * b.element_size() for b in net.buffers())
    sharing = local_ranks() if device.type == "cpu" else 1
    if need * sharing > available:
        raise ValueError(
            f"{what} make a network of {count:,} parameters that needs ~{need * sharing / 2**30:.1f} GiB "
            f"(weights, gradients, AdamW state and EMA{f', x {sharing} ranks' if sharing > 1 else ''}), "
            f"more than the {available / 2**30:.1f} GiB of {where}; choose a smaller network")


def check_batch_fits(net: nn.Module, x_shape: tuple[int, ...], num_classes: int | None, device: torch.device,
                     amp: bool, local_batch: int, world_size: int) -> None:
    """ValueError before any step when the batch cannot fit: local_batch x the bytes per sample of
    the batch tensors and the activations the model keeps for backward (activation_bytes) exceeds
    the available memory. The message gives the largest global batch_size that fits."""
    available, where = available_memory(device)
    if available is None:
        return
    per_sample = 4 * BATCH_TENSORS * math.prod(x_shape) + 12 + activation_bytes(net, x_shape, num_classes,
                                                                                device, amp)
    sharing = local_ranks() if device.type == "cpu" else 1
    need = per_sample * local_batch * sharing
    if need > available:
        limit = available // (per_sample * sharing) * world_size
        raise ValueError(
            f"batch_size must be <= {limit} to fit in the {available / 2**30:.1f} GiB of {where} "
            f"(~{per_sample} bytes per sample for the batch tensors and the activations kept for "
            f"backward, ~{need / 2**30:.1f} GiB in all), got {local_batch * world_size}")


def activation_bytes(net: nn.Module, x_shape: tuple[int, ...], num_classes: int | None, device: torch.device,
                     amp: bool) -> int:
    """Bytes per sample of the tensors a forward pass of `net` saves for backward: the difference
    between batches of 4 and 2 (eval mode, no RNG drawn, nothing kept; parameters cancel out)."""

    def saved(n: int) -> int:
        m = torch.zeros((n, 2 * x_shape[0], *x_shape[1:]), device=device)
        t = torch.full((n,), 0.5, device=device)
        cond = None if num_classes is None else torch.zeros(n, dtype=torch.long, device=device)
        inputs = {x.untyped_storage().data_ptr() for x in (m, t, cond) if x is not None}
        storages: dict[int, int] = {}  # the inputs are counted with the batch tensors

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in inputs:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), ctx:
            net(m, t) if cond is None else net(m, t, cond)
        return sum(storages.values())

    was_training = net.training
    net.eval()
    try:
        return max(0, (saved(4) - saved(2)) // 2)
    finally:
        net.train(was_training)
