"""bridge_sample: the training data path (docs/math.md §5.1) — (m_t, label) for data x1 at times t.

Backends (docs/math.md §12):
    "triton"     fused Triton kernel (psb_fast.kernels.bridge_sample, imported on first use): CUDA
                 tensors, or CPU tensors under the Triton interpreter (TRITON_INTERPRET=1). Noise
                 is Philox, keyed by (seed, global element index): chunks of a batch reproduce the
                 whole batch.
    "cpu"        fused PyTorch path: noise drawn straight into the output buffer, then transformed
                 in place (float32 element math). Works on any device; meant for CPU.
    "float64"    psb_fast.ops.float64.bridge_sample (plain float64 torch math).
    "auto"       "triton" for CUDA tensors, "cpu" otherwise.
With eps given, all backends compute the same numbers up to float32 rounding; the noise streams
drawn from a seed differ between backends (same distribution).
"""

from __future__ import annotations

import math

import torch

from .. import checks
from ..backends import (
    all_finite,
    check_no_grad,
    check_storage,
    first_nonfinite,
    kernel_module,
    resolve_backend,
)
from ..bridge import PhaseBridge, check_t
from ..seeds import check_seed, row_seed
from . import float64 as f64

# The [8, B] float64 coefficient rows of the fused data path (cpu and triton): row k holds
# PhaseBridge.coefficients(t).<COEF_FIELDS[k]> (the kernel reads them in this order).
COEF_FIELDS = ("cx", "cv", "lxx", "lxv", "lvv", "label_x1", "label_eps_x", "label_eps_v")

MAX_SEED = 2**63
_BLOCK_ELEMENTS = 16384  # elements per block of rows on the cpu path (ATen's grain is 32768)


def bridge_sample(
    bridge: PhaseBridge,
    x1: torch.Tensor,
    t: torch.Tensor,
    seed: int | None = None,
    backend: str = "auto",
    eps: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample m_t ~ p(m_t | x1) and the training label (docs/math.md §5.1, §5.2), fused.

    Args:
        bridge: the PhaseBridge (its mode selects the label).
        x1: data [B, C, ...] (B rows, >= 2 dims), float32 / bfloat16 / float16, any strides.
        t: times [B] on x1's device, finite, in [0, 1).
        seed: noise seed, 0 <= seed < 2**63; None draws one from torch's default generator.
        backend: "auto", "triton", "cpu" or "float64" ("reference", its old name, warns).
        eps: optional noise (eps_x, eps_v), each of x1's shape and device, floating: used
            instead of drawing (deterministic debug path; seed is then ignored).
        row_offset: index of x1's first row in a larger batch (e.g. rank * B under torchrun).
            triton: the noise of row b is that of row row_offset + b of the whole batch; cpu and
            float64: row_offset is mixed into the seed, so chunks get independent noise.

    Returns:
        m_t = [x_t | v_t] of shape [B, 2C, ...] and label of shape [B, C, ...], contiguous, in
        x1's dtype (element math float32, float64 for "float64"). Not differentiable.

    Raises:
        TypeError / ValueError on bad arguments, before any kernel runs. For CPU tensors (any
        backend) this includes NaN or Inf in x1 or eps (ValueError naming it; one extra read of
        x1). On CUDA that check is skipped: it would force a host sync per batch, and NaN/Inf
        inputs there give NaN/Inf in m_t and label (the training loss reports them).

    x1 and eps are only read (the outputs are new tensors), so they may overlap each other or be
    expanded (stride 0); the result is that of the call on contiguous copies.
    """
    if not isinstance(bridge, PhaseBridge):
        raise TypeError(f"bridge must be a PhaseBridge, got {type(bridge).__name__}")
    check_storage("x1", x1)
    if x1.dim() < 2:
        raise ValueError(f"x1 must be [B, C, ...] with at least 2 dims, got shape {tuple(x1.shape)}")
    t64 = _check_times(t, x1)
    seed = _check_seed(seed, draw=eps is None)
    row_offset = checks.count("row_offset", row_offset, 0)
    if eps is not None:
        eps = _check_eps(eps, x1)
    name = resolve_backend(backend, x1)
    if x1.device.type == "cpu":
        _check_finite("x1", x1)
        for label, e in zip(("eps_x", "eps_v"), eps or (), strict=False):
            _check_finite(label, e)

    if name == "float64":
        generator = None
        if eps is None:
            generator = torch.Generator(device=x1.device).manual_seed(row_seed(seed, row_offset))
        eps_x, eps_v = eps if eps is not None else (None, None)
        return f64.bridge_sample(bridge, x1, t64, eps_x, eps_v, generator)

    co = bridge.coefficients(t64)
    coef = torch.stack([getattr(co, field) for field in COEF_FIELDS])  # [8, B] float64
    if name == "triton":
        kernel = kernel_module("bridge_sample").bridge_sample_triton
        return kernel(x1, coef, seed=seed, row_offset=row_offset, eps=eps)
    return _bridge_sample_torch(x1, coef, row_seed(seed, row_offset), eps)


def _bridge_sample_torch(
    x1: torch.Tensor,
    coef: torch.Tensor,
    seed: int,
    eps: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The "cpu" backend: x1 [B, C, ...], coef [8, B] float64 (COEF_FIELDS order).

    m is allocated as [B, 2, n] (float32 scratch for 16-bit storage) and filled with eps_x, eps_v
    in one normal_ call. Then, a block of rows at a time (in cache, each op below ATen's
    intra-op grain so no thread pool is woken: oversubscribed cores stall every parallel op),
    label is built from the noise and the noise is turned into v_t and x_t in place.
    Element math is float32; 16-bit storage is written block by block.
    """
    B, C = x1.shape[:2]
    n = math.prod(x1.shape[1:])
    x = x1.reshape(B, n)
    m = torch.empty((B, 2, n), dtype=x1.dtype, device=x1.device)
    label = torch.empty((B, n), dtype=x1.dtype, device=x1.device)
    wide = x1.dtype == torch.float32
    work = m if wide else torch.empty((B, 2, n), dtype=torch.float32, device=x1.device)
    label32 = label if wide else torch.empty((B, n), dtype=torch.float32, device=x1.device)
    if eps is None:
        work.normal_(generator=torch.Generator(device=x1.device).manual_seed(seed))
    else:
        work[:, 0].copy_(eps[0].reshape(B, n))
        work[:, 1].copy_(eps[1].reshape(B, n))
    c = coef.to(torch.float32).unsqueeze(-1)  # [8, B, 1]
    rows = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for r0 in range(0, B, rows):
        blk = slice(r0, r0 + rows)
        xb = x[blk].to(torch.float32)
        eps_x, eps_v = work[blk, 0], work[blk, 1]
        cx, cv, lxx, lxv, lvv, lab_x1, lab_ex, lab_ev = c[:, blk].unbind(0)
        torch.mul(xb, lab_x1, out=label32[blk]).addcmul_(eps_x, lab_ex).addcmul_(eps_v, lab_ev)
        eps_v.mul_(lvv).addcmul_(eps_x, lxv).addcmul_(xb, cv)  # -> v_t
        eps_x.mul_(lxx).addcmul_(xb, cx)  # -> x_t
        if not wide:
            m[blk].copy_(work[blk])
            label[blk].copy_(label32[blk])
    return m.view(B, 2 * C, *x1.shape[2:]), label.view(x1.shape)


def _check_times(t: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """t as float64 [B] after checking type, shape, device and range."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a tensor of shape [{x1.shape[0]}], got {type(t).__name__}")
    if t.shape != (x1.shape[0],):
        raise ValueError(f"t must have shape [{x1.shape[0]}] (one time per row of x1), got {tuple(t.shape)}")
    if t.device != x1.device:
        raise ValueError(f"t must be on x1's device {x1.device}, got {t.device}")
    check_no_grad("t", t)
    return check_t(t)


def _check_seed(seed: int | None, draw: bool) -> int:
    """A seed in [0, 2**63); None draws one from torch's default generator if `draw`, else is 0."""
    return check_seed(0 if seed is None and not draw else seed, MAX_SEED, draw_below=MAX_SEED - 1)


def _check_eps(
    eps: tuple[torch.Tensor, torch.Tensor], x1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_x, eps_v) after checking they are two floating tensors like x1."""
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise TypeError(f"eps must be a pair (eps_x, eps_v) or None, got {type(eps).__name__}")
    for name, e in zip(("eps_x", "eps_v"), eps, strict=True):
        if not isinstance(e, torch.Tensor) or not e.is_floating_point():
            got = e.dtype if isinstance(e, torch.Tensor) else type(e).__name__
            raise TypeError(f"{name} must be a floating tensor, got {got}")
        if e.shape != x1.shape:
            raise ValueError(f"{name} must have x1's shape {tuple(x1.shape)}, got {tuple(e.shape)}")
        if e.device != x1.device:
            raise ValueError(f"{name} must be on x1's device {x1.device}, got {e.device}")
        check_no_grad(name, e)
    return eps[0], eps[1]


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError naming `tensor` and its first NaN/Inf (CPU tensors: no device sync)."""
    if not all_finite(tensor):
        raise ValueError(f"{name} must be finite, got {first_nonfinite(tensor)}")
