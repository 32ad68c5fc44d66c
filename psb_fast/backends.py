"""Backend selection and argument checks shared by every op.

Backends: "triton" (CUDA), "cpu" (fused CPU path), "float64" (plain float64 PyTorch,
`psb_fast.ops.float64`; its old name "reference" still selects it, with a warning), "auto". The
checks here are host-side and O(dims) unless said
otherwise: memory overlap of two tensors (so in-place ops can copy an input that aliases their
output), scalar arguments, and finiteness of tensors.

Triton is optional at import: `psb_fast.kernels.*` (and with it `triton`) is imported by
`kernel_module` the first time an op runs on the "triton" backend, so `import psb_fast` and
the "cpu" and "float64" backends work without Triton installed.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from functools import cache
from numbers import Real
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cpu", "float64")
#: Old backend names: still accepted, with a warning naming the new one (`backend_name`).
OLD_BACKENDS = {"reference": "float64"}
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_interpreted() -> bool:
    """True when Triton kernels run under the interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_name(backend: object) -> str:
    """A backend name of BACKENDS; an old name (OLD_BACKENDS) is mapped to its new one with a
    FutureWarning (once per process and name). ValueError for anything else."""
    if isinstance(backend, str) and backend in OLD_BACKENDS:
        new = OLD_BACKENDS[backend]
        warn_once(f"backend={backend!r} is now called backend={new!r}; the old name will be removed")
        return new
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """A FutureWarning with this message, the first time it is given in the process (old
    spellings of arguments: each names its new spelling)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, FutureWarning, stacklevel=3)


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """The concrete backend for `tensor`: "auto" is triton for CUDA tensors, cpu otherwise.

    Raises ValueError for an unknown name, or "triton" on a CPU tensor outside the interpreter;
    ImportError naming the backend when it resolves to "triton" and Triton is not installed.
    """
    backend = backend_name(backend)
    if backend == "auto":
        if not tensor.is_cuda:
            return "cpu"
        require_triton(backend)
        return "triton"
    if backend == "triton":
        if not (tensor.is_cuda or triton_interpreted()):
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got a tensor on "
                f"{tensor.device}"
            )
        require_triton(backend)
    return backend


@cache
def _triton_import_error() -> ImportError | None:
    """None if `import triton` works, else its ImportError (tried once per process)."""
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return exc
    return None


def require_triton(backend: str) -> None:
    """Raise ImportError naming `backend` (the name the caller passed) if Triton cannot be imported."""
    error = _triton_import_error()
    if error is not None:
        via = " (for CUDA tensors 'auto' selects 'triton')" if backend == "auto" else ""
        raise ImportError(
            f"backend={backend!r}{via} needs the 'triton' package, which could not be imported ({error}); "
            "install it (pip install triton) or pass backend='cpu' or backend='float64'"
        ) from error


def kernel_module(name: str) -> ModuleType:
    """`psb_fast.kernels.<name>` ("bridge_sample", "phase_step", "sde_step"), imported on first use.

    Only the "triton" backend calls this (after `resolve_backend`), so Triton is imported when
    that backend is first used and never by `import psb_fast`.
    """
    require_triton("triton")
    return importlib.import_module(f"psb_fast.kernels.{name}")


def check_storage(name: str, tensor: torch.Tensor) -> None:
    """Raise TypeError unless `tensor` is stored as float32, bfloat16 or float16, and ValueError if
    it takes part in autograd (`check_no_grad`)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in STORAGE_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    check_no_grad(name, tensor)


def check_no_grad(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError if `tensor` requires grad while autograd records: the fused ops are not
    differentiable (no backend records their graph) and the in-place ones cannot update such a
    tensor, so every backend refuses it the same way, before anything is written."""
    if tensor.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires grad, but the fused ops are not differentiable: pass {name}.detach() "
            "or call them under torch.no_grad()"
        )


# ----------------------------------------------------------------------------- row views


def row_view(t: torch.Tensor, B: int, n: int) -> torch.Tensor | None:
    """t viewed as [B, n] with unit column stride (any row stride), or None if no such view."""
    try:
        rows = t.view(B, n)
    except RuntimeError:
        return None
    return rows if n <= 1 or rows.stride(1) == 1 else None


def as_rows(t: torch.Tensor, B: int, n: int) -> torch.Tensor:
    """t as a [B, n] tensor with unit column stride: a view when one exists, else a copy."""
    rows = row_view(t, B, n)
    return t.contiguous().view(B, n) if rows is None else rows


# ----------------------------------------------------------------------------- scalars


def real_scalar(name: str, value: object) -> float:
    """value as a float: a Python/NumPy real number or a one-element real tensor (0-d or not).

    Raises TypeError naming `name` for anything else (bool, str, complex, a tensor of several
    elements). Finiteness and range are the caller's checks.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"{name} must be a real number or a one-element real tensor, got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


# ----------------------------------------------------------------------------- memory overlap


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses spanned by t's elements (strides are >= 0 in torch)."""
    start = t.data_ptr()
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return start, start + span * t.element_size()


def _storage_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses of t's whole storage (a superset of its elements)."""
    storage = t.untyped_storage()
    start = storage.data_ptr()
    return start, start + storage.nbytes()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if a and b may share memory: same device and intersecting address ranges.

    Conservative (interleaved views of one buffer, e.g. m[:, :C] and m[:, C:] with B > 1,
    count as overlapping) and cheap: no device sync, no kernel; about 1 us of host work when
    the storages are disjoint (the usual case), a few us for views of one buffer. Tensors
    whose memory cannot be inspected count as overlapping.
    """
    if a.numel() == 0 or b.numel() == 0:
        return False
    try:
        a0, a1 = _storage_range(a)
        b0, b1 = _storage_range(b)
        if a1 <= b0 or b1 <= a0 or a.device != b.device:
            return False
        a0, a1 = _extent(a)
        b0, b1 = _extent(b)
    except (RuntimeError, NotImplementedError):
        return True
    return a0 < b1 and b0 < a1


def unaliased(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy of t if it may share memory with `out` (which an op is about to
    write in place): the op then computes what it would on a copied input."""
    return t.clone(memory_format=torch.contiguous_format) if overlaps(t, out) else t


def check_no_internal_overlap(name: str, t: torch.Tensor) -> None:
    """Raise ValueError if distinct indices of t may address one element (an expanded or
    stride-0 tensor, or an as_strided view): such a tensor cannot be updated in place.

    Sufficient test: with dims of size > 1 sorted by stride, each stride must reach past the
    span of the smaller ones.
    """
    if t.is_contiguous():
        return
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride(), strict=True) if size > 1)
    span = 1
    for stride, size in dims:
        if stride < span:
            raise ValueError(
                f"{name} must not have overlapping elements (it is updated in place), got shape "
                f"{tuple(t.shape)} with strides {t.stride()}; pass a contiguous copy"
            )
        span = stride * (size - 1) + span


# ----------------------------------------------------------------------------- finiteness


def finite_flag(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on t's device: whether every element of t is finite. No host sync.

    One reduction: the float64 sum of finite float32 / 16-bit values cannot overflow, and a NaN
    or Inf anywhere makes it NaN or Inf.
    """
    return torch.isfinite(t.sum(dtype=torch.float64))


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of t is finite (a host bool: syncs on accelerators).

    On the CPU sums are tried first, fastest first (a NaN or Inf anywhere makes a sum
    non-finite, so a finite sum proves t finite): t.sum() in t's dtype, then, for 16-bit t whose
    sum overflows that dtype, a float32 sum; only then the elementwise test (slow, about ten
    times a sum, and reached only for a t with NaN/Inf or float32 values summing past 3e38).
    """
    if t.device.type != "cpu":
        return bool(finite_flag(t))
    if t.numel() == 0 or math.isfinite(t.sum().item()):
        return True
    if t.dtype in (torch.float16, torch.bfloat16) and math.isfinite(t.sum(dtype=torch.float32).item()):
        return True
    return bool(torch.isfinite(t).all())


def first_nonfinite(t: torch.Tensor) -> str:
    """'VALUE at index (i, j, ...)' for t's first NaN or Inf (for error messages; t must have one)."""
    index = tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0])
    return f"{t[index].item()} at index {index}"
