"""Backend selection shared by every op: "triton" (CUDA), "cpu" (fused CPU path), "reference", "auto"."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "cpu", "reference")
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_interpreted() -> bool:
    """True when Triton kernels run under the interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """The concrete backend for `tensor`: "auto" is triton for CUDA tensors, cpu otherwise.

    Raises ValueError for an unknown name, or "triton" on a CPU tensor outside the interpreter.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if tensor.is_cuda else "cpu"
    if backend == "triton" and not (tensor.is_cuda or triton_interpreted()):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got a tensor on {tensor.device}"
        )
    return backend


def check_storage(name: str, tensor: torch.Tensor) -> None:
    """Raise TypeError unless `tensor` is stored as float32, bfloat16 or float16."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in STORAGE_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
