"""torchrun's environment and the process group, shared by training and sharded sampling.

Under torchrun every process has RANK, WORLD_SIZE and LOCAL_RANK; without it a process is rank
0 of 1 and no group is started. The group is gloo on the CPU and NCCL on CUDA.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def distributed_env() -> tuple[int, int, int]:
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


def resolve_device(
    device: str | torch.device, what: str = "device", local_rank: int | None = None
) -> torch.device:
    """The torch.device named by `device`: "auto" (CUDA when available, else the CPU), "cpu",
    "cuda" or "cuda:N", checked usable on this machine and made the current CUDA device. "cuda"
    (and "auto" on a CUDA machine) means cuda:local_rank under torchrun, cuda:0 otherwise.

    Raises ValueError naming `what` (e.g. "--device") for another name, for CUDA on a machine
    without it and for a CUDA index beyond the devices present; TypeError for a non-string.
    """
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{what} must be a str or torch.device, got {type(device).__name__}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank or 0}"
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{what} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {str(device)!r}") from err
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {str(device)!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} must be 'cpu' or 'auto' on a machine without CUDA, got {str(device)!r}")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"{what} {str(device)!r} does not exist: this machine has {count} CUDA "
                             f"device(s), cuda:0..cuda:{count - 1}")
        torch.cuda.set_device(resolved)
    return resolved


def init_group(device: torch.device, world_size: int) -> None:
    """Start the process group (NCCL on CUDA, gloo on CPU) unless one is running.

    The group stays up for later calls in the process (torchrun's store does not allow a second
    init after a destroy) and is destroyed at exit.
    """
    if world_size == 1 or dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(destroy_group)


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
