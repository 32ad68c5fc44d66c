"""bridge_sample (docs/math.md §5.1, §12): backends against the float64 reference, in-kernel noise, errors.

Triton runs under the interpreter on CPU tensors (tests/conftest.py), or natively on CUDA with
PSB_FAST_NATIVE_GPU=1 (benchmarks/gpu_check.sh). The "cpu" backend always runs on CPU tensors.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import psb_fast.ops.bridge_sample as bridge_sample_module
from psb_fast.backends import triton_interpreted
from psb_fast.bridge import PhaseBridge
from psb_fast.kernels.bridge_sample import MAX_ROW
from psb_fast.ops.bridge_sample import bridge_sample
from psb_fast.reference.bridge_sample import bridge_sample_reference

# (atol, rtol) of a backend's output against the float64 reference rounded to the same dtype.
# float32 element math gives a few float32 ulps; 16-bit storage may land one ulp away (and the
# Triton 3.8 interpreter truncates float32 -> bfloat16 instead of rounding to nearest).
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}
DTYPES = tuple(TOLERANCES)

NATIVE_GPU = os.environ.get("PSB_FAST_NATIVE_GPU") == "1" and torch.cuda.is_available()
TRITON_DEVICE = torch.device("cuda") if NATIVE_GPU else torch.device("cpu")
needs_triton = pytest.mark.skipif(
    not (NATIVE_GPU or triton_interpreted()), reason="needs CUDA or TRITON_INTERPRET=1"
)
BACKENDS = (pytest.param("triton", marks=needs_triton), "cpu")


def device_of(backend: str) -> torch.device:
    """Where a backend's test tensors live."""
    return TRITON_DEVICE if backend == "triton" else torch.device("cpu")


def make_inputs(shape, dtype=torch.float32, device="cpu", t=None, seed=0):
    """x1 of `shape`, t [B] in [0, 0.99) (unless given), eps = (eps_x, eps_v) float32."""
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(shape, generator=gen).to(dtype)
    if t is None:
        t = 0.99 * torch.rand(shape[0], generator=gen, dtype=torch.float64)
    eps = tuple(torch.randn(shape, generator=gen).to(device) for _ in range(2))
    return x1.to(device), t.to(device), eps


def assert_matches_reference(bridge, x1, t, eps, out):
    """`out` = (m_t, label) equals the reference (same eps) to the dtype's tolerance."""
    atol, rtol = TOLERANCES[x1.dtype]
    ref = bridge_sample_reference(bridge, x1, t, *eps)
    for name, got, want in zip(("m_t", "label"), out, ref, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert got.is_contiguous(), name
        torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, msg=name)


def recover_eps(bridge, x1, t, m_t):
    """(eps_x, eps_v) in float64, solved from x_t = cx x1 + Lxx eps_x, v_t = cv x1 + Lxv eps_x + Lvv eps_v."""
    co = bridge.coefficients(t.cpu())
    x1 = x1.cpu().double()
    C = x1.shape[1]
    x_t, v_t = m_t.cpu().double()[:, :C], m_t.cpu().double()[:, C:]

    def r(a):
        return a.reshape((-1,) + (1,) * (x1.dim() - 1))

    eps_x = (x_t - r(co.cx) * x1) / r(co.lxx)
    eps_v = (v_t - r(co.cv) * x1 - r(co.lxv) * eps_x) / r(co.lvv)
    return eps_x.flatten(), eps_v.flatten()


def assert_standard_normal_pair(eps_x, eps_v):
    """Moments, lag-1 and cross correlation, and a Kolmogorov-Smirnov bound at ~5 sigma."""
    N = eps_x.numel()
    tol = 5.0 / math.sqrt(N)
    for name, e in (("eps_x", eps_x), ("eps_v", eps_v)):
        assert abs(e.mean().item()) < tol, name
        assert abs(e.var().item() - 1.0) < tol * math.sqrt(2.0), name
        assert abs(torch.corrcoef(torch.stack([e[:-1], e[1:]]))[0, 1].item()) < tol, f"{name} lag-1"
        cdf = torch.special.ndtr(e.sort().values)
        ranks = torch.arange(1, N + 1, dtype=torch.float64) / N
        ks = torch.maximum(ranks - cdf, cdf - (ranks - 1.0 / N)).max().item()
        assert ks < 1.95 / math.sqrt(N), f"{name} Kolmogorov-Smirnov D = {ks}"
    assert abs(torch.corrcoef(torch.stack([eps_x, eps_v]))[0, 1].item()) < tol


@pytest.fixture(scope="module")
def bridge():
    return PhaseBridge()


# ---------------------------------------------------------------- agreement with the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(4, 3, 8, 8), (1, 3, 17, 23), (3000, 2), (5, 1, 7, 11), (2, 5)],
    ids=["image", "B1-ragged", "toy-2d", "rows-straddle-blocks", "tiny"],
)
def test_matches_reference_with_given_eps(bridge, backend, dtype, shape):
    x1, t, eps = make_inputs(shape, dtype, device_of(backend))
    out = bridge_sample(bridge, x1, t, backend=backend, eps=eps)
    assert_matches_reference(bridge, x1, t, eps, out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["probODE", "SDE"])
def test_tau_near_zero(backend, mode):
    bridge = PhaseBridge(mode=mode)
    t = 1.0 - torch.tensor([1e-6, 1e-5, 1e-4, 1e-2, 0.5, 1.0], dtype=torch.float64)
    x1, t, eps = make_inputs((6, 2, 5, 5), device=device_of(backend), t=t)
    out = bridge_sample(bridge, x1, t, backend=backend, eps=eps)
    assert all(torch.isfinite(o).all() for o in out)
    assert_matches_reference(bridge, x1, t, eps, out)
    m_t, label = bridge_sample(bridge, x1, t, seed=3, backend=backend)
    assert torch.isfinite(m_t).all() and torch.isfinite(label).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_non_contiguous_inputs(bridge, backend, layout):
    device = device_of(backend)
    x1, t, eps = make_inputs((3, 4, 6, 5), device=device)
    if layout == "channels_last":
        x1_nc = x1.to(memory_format=torch.channels_last)
    else:
        x1_nc = torch.randn(3, 8, 6, 10, device=device)[:, ::2, :, ::2]
        x1_nc.copy_(x1)
    assert not x1_nc.is_contiguous()
    out = bridge_sample(bridge, x1_nc, t, backend=backend, eps=eps)
    assert_matches_reference(bridge, x1, t, eps, out)
    drawn_nc = bridge_sample(bridge, x1_nc, t, seed=11, backend=backend)
    drawn = bridge_sample(bridge, x1, t, seed=11, backend=backend)
    for a, b in zip(drawn_nc, drawn, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0)])
def test_empty_inputs(bridge, backend, shape):
    x1, t, _ = make_inputs(shape, device=device_of(backend))
    m_t, label = bridge_sample(bridge, x1, t, seed=0, backend=backend)
    assert m_t.shape == (shape[0], 2 * shape[1], *shape[2:]) and label.shape == shape


def test_reference_backend_and_auto(bridge):
    x1, t, eps = make_inputs((3, 2, 4))
    out = bridge_sample(bridge, x1, t, backend="reference", eps=eps)
    assert_matches_reference(bridge, x1, t, eps, out)
    a = bridge_sample(bridge, x1, t, seed=5, backend="reference")
    b = bridge_sample(bridge, x1, t, seed=5, backend="reference")
    assert all(torch.equal(u, w) for u, w in zip(a, b, strict=True))
    auto = bridge_sample(bridge, x1, t, seed=5, backend="auto")
    cpu = bridge_sample(bridge, x1, t, seed=5, backend="cpu")
    assert all(torch.equal(u, w) for u, w in zip(auto, cpu, strict=True))


# ---------------------------------------------------------------- noise drawn by the backends


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_statistics(bridge, backend):
    shape = (16, 2, 32, 32) if backend == "triton" else (64, 4, 32, 32)
    x1, t, _ = make_inputs(shape, device=device_of(backend), t=torch.linspace(0.0, 0.9, shape[0]))
    m_t, _ = bridge_sample(bridge, x1, t, seed=1234, backend=backend)
    assert_standard_normal_pair(*recover_eps(bridge, x1, t, m_t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_is_consistent_with_noise(bridge, backend):
    x1, t, _ = make_inputs((8, 3, 6, 6), device=device_of(backend), t=torch.linspace(0.0, 0.9, 8))
    m_t, label = bridge_sample(bridge, x1, t, seed=7, backend=backend)
    eps = tuple(e.reshape(x1.shape).float().to(x1.device) for e in recover_eps(bridge, x1, t, m_t))
    _, ref_label = bridge_sample_reference(bridge, x1, t, *eps)
    torch.testing.assert_close(label, ref_label, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_seed_determinism(bridge, backend, dtype):
    x1, t, _ = make_inputs((3, 2, 5, 7), dtype, device_of(backend))
    a = bridge_sample(bridge, x1, t, seed=42, backend=backend)
    b = bridge_sample(bridge, x1, t, seed=42, backend=backend)
    c = bridge_sample(bridge, x1, t, seed=43, backend=backend)
    assert all(torch.equal(u, w) for u, w in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    torch.manual_seed(0)
    d = bridge_sample(bridge, x1, t, backend=backend)
    e = bridge_sample(bridge, x1, t, backend=backend)
    assert not torch.equal(d[0], e[0])


@needs_triton
@pytest.mark.parametrize("shape", [(7, 3, 9, 13), (1000, 3)], ids=["image", "toy-2d"])
def test_triton_chunks_reproduce_whole_batch(bridge, shape):
    x1, t, _ = make_inputs(shape, device=TRITON_DEVICE)
    whole = bridge_sample(bridge, x1, t, seed=99, backend="triton")
    k = shape[0] // 3
    head = bridge_sample(bridge, x1[:k], t[:k], seed=99, backend="triton")
    tail = bridge_sample(bridge, x1[k:], t[k:], seed=99, backend="triton", row_offset=k)
    for w, h, tl_ in zip(whole, head, tail, strict=True):
        assert torch.equal(w, torch.cat([h, tl_]))


@needs_triton
def test_triton_counters_beyond_32_bits(bridge):
    """Global element indices >= 2**32 (row_offset * n): exact chunking, a distinct stream, N(0, 1)."""
    x1, t, _ = make_inputs((8, 4, 8, 8), device=TRITON_DEVICE)
    n = x1[0].numel()  # 256 divides 2**32: rows 4.. of `whole` start at global index exactly 2**32
    row = 2**32 // n - 4
    whole = bridge_sample(bridge, x1, t, seed=5, backend="triton", row_offset=row)
    tail = bridge_sample(bridge, x1[4:], t[4:], seed=5, backend="triton", row_offset=row + 4)
    assert torch.equal(whole[0][4:], tail[0])
    low = bridge_sample(bridge, x1[4:], t[4:], seed=5, backend="triton")  # global index 0 (mod 2**32)
    assert not torch.equal(tail[0], low[0]), "the high 32 bits of the index are ignored"
    assert_standard_normal_pair(*recover_eps(bridge, x1, t, whole[0]))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_row_offset_changes_noise(bridge, backend):
    x1, t, _ = make_inputs((4, 3, 5))
    a = bridge_sample(bridge, x1, t, seed=8, backend=backend)
    b = bridge_sample(bridge, x1, t, seed=8, backend=backend, row_offset=4)
    assert not torch.equal(a[0], b[0])


# ---------------------------------------------------------------- errors, raised before any kernel


@pytest.fixture
def no_kernels(monkeypatch):
    """Make every compute path fail, so an error that is raised comes from validation."""

    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran before validation failed")

    monkeypatch.setattr(bridge_sample_module, "kernel_module", boom)  # triton
    monkeypatch.setattr(bridge_sample_module, "_bridge_sample_torch", boom)  # cpu
    monkeypatch.setattr(bridge_sample_module.f64, "bridge_sample", boom)  # reference


GOOD_X1 = torch.zeros(2, 3, 4)
GOOD_T = torch.tensor([0.1, 0.5])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x1=torch.zeros(4)), ValueError, r"x1 must be \[B, C, \.\.\.\].*\(4,\)"),
        (dict(x1=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "x1 must be float32.*int64"),
        (dict(x1=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "x1 must be float32.*float64"),
        (dict(x1=[[0.0, 1.0]]), TypeError, "x1 must be a torch.Tensor, got list"),
        (dict(t=torch.tensor([0.1, 0.2, 0.3])), ValueError, r"t must have shape \[2\].*\(3,\)"),
        (dict(t=torch.tensor(0.5)), ValueError, r"t must have shape \[2\].*\(\)"),
        (dict(t=0.5), TypeError, "t must be a tensor.*float"),
        (dict(t=torch.tensor([0.1, 1.0])), ValueError, r"t must be finite and in \[0, 1\), got 1.0"),
        (dict(t=torch.tensor([-0.1, 0.5])), ValueError, r"t must be .* got -0.1"),
        (dict(t=torch.tensor([0.1, float("nan")])), ValueError, "t must be finite.*nan"),
        (dict(t=torch.tensor([float("inf"), 0.1])), ValueError, "t must be finite.*inf"),
        (dict(t=torch.tensor([0.1, 0.5], device="meta")), ValueError, "t must be on x1's device.*got meta"),
        (dict(backend="cuda"), ValueError, "backend must be one of .* got 'cuda'"),
        (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\), got -1"),
        (dict(seed=2**63), ValueError, "seed must be in"),
        (dict(seed=1.5), TypeError, "seed must be an int or None, got float"),
        (dict(seed=True), TypeError, "seed must be an int or None, got bool"),
        (dict(row_offset=-2), ValueError, "row_offset must be an int >= 0, got -2"),
        (dict(eps=(torch.zeros(2, 3, 4),)), TypeError, "eps must be a pair"),
        (dict(eps=(torch.zeros(2, 3, 4), torch.zeros(2, 3))), ValueError, r"eps_v must have x1's shape"),
        (dict(eps=(torch.zeros(2, 3, 4, dtype=torch.int32),) * 2), TypeError, "eps_x must be a floating"),
        (dict(bridge="bridge"), TypeError, "bridge must be a PhaseBridge, got str"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "cpu", "reference", pytest.param("triton", marks=needs_triton)])
def test_bad_arguments(bridge, no_kernels, backend, kwargs, error, match):
    args = dict(bridge=bridge, x1=GOOD_X1.to(device_of(backend)), t=GOOD_T.to(device_of(backend)))
    if "t" in kwargs and isinstance(kwargs["t"], torch.Tensor) and kwargs["t"].device.type != "meta":
        kwargs = dict(kwargs, t=kwargs["t"].to(device_of(backend)))
    if "x1" in kwargs and isinstance(kwargs["x1"], torch.Tensor):
        kwargs = dict(kwargs, x1=kwargs["x1"].to(device_of(backend)))
    args.update(backend=backend)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        bridge_sample(**args)


@needs_triton
def test_triton_rejects_rows_too_long_for_int32_offsets(bridge):
    x1 = torch.zeros((), device=TRITON_DEVICE).expand(1, MAX_ROW)  # no memory behind it
    with pytest.raises(ValueError, match=f"rows must have fewer than {MAX_ROW} elements"):
        bridge_sample(bridge, x1, torch.zeros(1, device=TRITON_DEVICE), seed=0, backend="triton")


def test_triton_on_cpu_without_interpreter(bridge, monkeypatch, no_kernels):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        bridge_sample(bridge, GOOD_X1, GOOD_T, seed=0, backend="triton")


@pytest.mark.parametrize("backend", [*BACKENDS, "float64"])
def test_autograd_x1_is_refused(backend):
    """x1 requiring grad: bridge_sample is not differentiable; one ValueError naming x1 on every
    backend (and the call works under torch.no_grad)."""
    bridge = PhaseBridge()
    x1 = torch.randn(4, 3, requires_grad=True)
    t = torch.full((4,), 0.3)
    with pytest.raises(ValueError, match="x1 requires grad"):
        bridge_sample(bridge, x1, t, seed=0, backend=backend)
    with torch.no_grad():
        m_t, label = bridge_sample(bridge, x1, t, seed=0, backend=backend)
    assert m_t.shape == (4, 6) and not m_t.requires_grad
