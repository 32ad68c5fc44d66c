"""phase_step and phase_hop (psb_fast.ops.phase_step) vs the float64 oracle (reference/), every backend.

Triton kernels run under the interpreter on CPU tensors (tests/conftest.py).
"""

import math
import re

import pytest
import torch

from psb_fast.bridge import PhaseBridge
from psb_fast.ops import _common
from psb_fast.ops.phase_step import phase_hop, phase_step
from psb_fast.reference import phase_step as ref
from psb_fast.reference.phase_step import hop_reference

# Result vs the float64 reference, per storage dtype: |got - ref| <= atol * scale + rtol * |ref|,
# scale = max |ref| (1 for the step, whose values are O(1)). 16-bit rtol = 1 ulp: the float32
# result is rounded once (to nearest on GPUs and in the cpu path; the Triton interpreter
# truncates float32 -> bfloat16, which costs up to 1 ulp).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2.0**-7, atol=1e-6),
    torch.float16: dict(rtol=2.0**-10, atol=1e-6),
}
DTYPES = list(TOL)
FAST_BACKENDS = ("triton", "cpu")
ALL_BACKENDS = (*FAST_BACKENDS, "float64")
# x shapes: B = 1 4-D image with n = 105 (not a multiple of the block), 2-D vectors spanning
# blocks and rows, and n = 1024 (rows aligned with the kernel block).
X_SHAPES = [(1, 3, 5, 7), (3, 1030), (2, 1, 32, 32)]
H = 0.037
CX = (0.011, -0.007, 0.004, -0.002)
CV = (0.52, -0.31, 0.17, -0.05)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    tol = TOL[dtype]
    torch.testing.assert_close(
        got.double(), want.double(), rtol=tol["rtol"], atol=tol["atol"] * scale, check_dtype=False
    )


def make_state(x_shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn((x_shape[0], 2 * x_shape[1], *x_shape[2:]), generator=g).to(dtype)
    Fs = [torch.randn(x_shape, generator=g).to(dtype) for _ in range(4)]
    return m, Fs


def reference_step(m, Fs, h, Cx, Cv):
    C = m.shape[1] // 2
    x_new, v_new = ref.phase_step(m[:, :C], m[:, C:], h, Cx, Cv, Fs)
    return torch.cat([x_new, v_new], dim=1)


def reference_hop(bridge, m, F, T):
    """The oracle's hop (reference/phase_step.py), float64."""
    C = m.shape[1] // 2
    return hop_reference(bridge, m[:, :C], m[:, C:], F, T)


@pytest.mark.parametrize("x_shape", X_SHAPES, ids=str)
@pytest.mark.parametrize("q", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_phase_step_matches_reference(backend, dtype, q, x_shape):
    m, Fs = make_state(x_shape, dtype)
    want = reference_step(m, Fs[:q], H, CX[:q], CV[:q])
    got = phase_step(m, Fs[:q], H, CX[:q], CV[:q], backend=backend)
    assert got is m and m.dtype == dtype
    assert_close(m, want, dtype)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_phase_step_reference_backend_writes_back(backend):
    m, Fs = make_state((2, 3, 4, 4), torch.float32)
    want = reference_step(m, Fs[:2], H, CX[:2], CV[:2])
    m_ref = m.clone()
    phase_step(m_ref, Fs[:2], H, CX[:2], CV[:2], backend="reference")
    assert_close(m_ref, want, torch.float32)
    phase_step(m, Fs[:2], H, CX[:2], CV[:2], backend=backend)
    assert_close(m, m_ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_phase_step_noncontiguous_inputs(backend, dtype):
    """F as a channel slice (row-strided view), a transposed tensor (copy), the same tensor
    twice in the history (ring buffer), and m itself not viewable as rows (channels-last)."""
    g = torch.Generator().manual_seed(1)
    B, C, Hh, W = 3, 2, 5, 6
    big = torch.randn(B, 3 * C, Hh, W, generator=g).to(dtype)
    f_slice = big[:, C:2 * C]
    f_transposed = torch.randn(B, C, W, Hh, generator=g).to(dtype).transpose(2, 3)
    assert not f_slice.is_contiguous() and not f_transposed.is_contiguous()
    Fs = [f_slice, f_transposed, f_slice]
    m = torch.randn(B, 2 * C, Hh, W, generator=g).to(dtype).to(memory_format=torch.channels_last)
    want = reference_step(m, Fs, H, CX[:3], CV[:3])
    phase_step(m, Fs, H, CX[:3], CV[:3], backend=backend)
    assert_close(m, want, dtype)
    assert m.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("chunk", [16, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cpu_path_chunking(monkeypatch, dtype, chunk):
    """Column blocks of a row (n >= chunk) and groups of rows (n < chunk) give the same result."""
    monkeypatch.setattr(_common, "CPU_CHUNK", chunk)
    m, Fs = make_state((5, 2, 5, 7), dtype)
    want = reference_step(m, Fs[:2], H, CX[:2], CV[:2])
    phase_step(m, Fs[:2], H, CX[:2], CV[:2], backend="cpu")
    assert_close(m, want, dtype)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_phase_step_coefficients_as_tensor_row(backend):
    m, Fs = make_state((2, 8), torch.float32)
    Cx, Cv = torch.tensor(CX[:2], dtype=torch.float64), torch.tensor(CV[:2], dtype=torch.float64)
    want = reference_step(m, Fs[:2], H, CX[:2], CV[:2])
    phase_step(m, Fs[:2], H, Cx, Cv, backend=backend)
    assert_close(m, want, torch.float32)


@pytest.mark.parametrize("backend", FAST_BACKENDS + ("float64",))
def test_phase_step_empty_batch(backend):
    m = torch.zeros(0, 4, 3)
    assert phase_step(m, [torch.zeros(0, 2, 3)], H, [1.0], [1.0], backend=backend) is m


HOP_TS = [0.4, 0.7, 0.9, 0.99, 0.999]


@pytest.mark.parametrize("T", HOP_TS)
@pytest.mark.parametrize("mode", ["probODE", "SDE"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_phase_hop_matches_reference(backend, dtype, mode, T):
    bridge = PhaseBridge(mode=mode)
    m, Fs = make_state((2, 3, 5, 7), dtype)
    m_before = m.clone()
    want = reference_hop(bridge, m, Fs[0], T)
    got = phase_hop(bridge, m, Fs[0], T, backend=backend)
    assert got.dtype == dtype and got.shape == Fs[0].shape
    assert torch.equal(m, m_before)
    assert_close(got, want, dtype, scale=want.abs().max().item())


@pytest.mark.parametrize("backend", FAST_BACKENDS + ("float64",))
@pytest.mark.parametrize("mode", ["probODE", "SDE"])
def test_phase_hop_near_one_is_finite(backend, mode):
    bridge = PhaseBridge(mode=mode)
    m, Fs = make_state((2, 6), torch.float32)
    T = 1.0 - 1e-6
    got = phase_hop(bridge, m, Fs[0], T, backend=backend)
    want = reference_hop(bridge, m, Fs[0], T)
    assert torch.isfinite(got).all()
    assert_close(got, want, torch.float32, scale=want.abs().max().item())


def test_phase_hop_noncontiguous_F():
    bridge = PhaseBridge()
    m, _ = make_state((2, 3, 4, 4), torch.float32)
    F = torch.randn(2, 6, 4, 4)[:, 3:]
    want = reference_hop(bridge, m, F, 0.9)
    for backend in ALL_BACKENDS:
        assert_close(phase_hop(bridge, m, F, 0.9, backend=backend), want, torch.float32,
                     scale=want.abs().max().item())


def _bad_step_cases():
    m = torch.zeros(2, 4, 3)
    F = torch.zeros(2, 2, 3)
    ok = dict(m=m, F_hist=[F], h=0.1, Cx=[0.1], Cv=[0.2])
    return [
        (dict(ok, m=torch.zeros(2, 3, 3)), ValueError, "even dim 1"),
        (dict(ok, m=torch.zeros(2, 4, 3, dtype=torch.float64)), TypeError, "float64"),
        (dict(ok, m=[0.0]), TypeError, "m must be a torch.Tensor"),
        (dict(ok, F_hist=F), TypeError, "F_hist must be a sequence"),
        (dict(ok, F_hist=[]), ValueError, "1..4"),
        (dict(ok, F_hist=[F] * 5, Cx=[0.1] * 5, Cv=[0.1] * 5), ValueError, "got 5"),
        (dict(ok, F_hist=[torch.zeros(2, 3, 3)]), ValueError, r"F_hist\[0\] must have m's x-shape"),
        (dict(ok, F_hist=[F, F.half()], Cx=[0, 0], Cv=[0, 0]), TypeError, r"F_hist\[1\].*float16"),
        (dict(ok, F_hist=[F.to(torch.int32)]), TypeError, "int32"),
        (dict(ok, F_hist=[torch.zeros(2, 2, 3, device="meta")]), ValueError, "device"),
        (dict(ok, h=-0.1), ValueError, "h must be finite and >= 0, got -0.1"),
        (dict(ok, h=math.nan), ValueError, "h must be finite"),
        (dict(ok, h=math.inf), ValueError, "h must be finite"),
        (dict(ok, h="0.1"), TypeError, "h must be a real number"),
        (dict(ok, Cx=[0.1, 0.2]), ValueError, "Cx must have len"),
        (dict(ok, Cv=[]), ValueError, "Cv must have len"),
        (dict(ok, Cx=[math.nan]), ValueError, r"Cx\[0\] must be finite"),
        (dict(ok, Cv=0.3), TypeError, "Cv must be a sequence"),
    ]


@pytest.mark.parametrize("backend", FAST_BACKENDS + ("float64",))
@pytest.mark.parametrize("kwargs,exc,match", _bad_step_cases())
def test_phase_step_rejects_bad_input(backend, kwargs, exc, match):
    m_before = kwargs["m"].clone() if isinstance(kwargs["m"], torch.Tensor) else None
    with pytest.raises(exc, match=match):
        phase_step(**kwargs, backend=backend)
    if m_before is not None:
        assert torch.equal(kwargs["m"], m_before)


def test_phase_step_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        phase_step(torch.zeros(1, 2), [torch.zeros(1, 1)], 0.1, [0.0], [0.0], backend="gpu")


def test_phase_hop_rejects_bad_input():
    bridge = PhaseBridge()
    m, F = torch.zeros(2, 4, 3), torch.zeros(2, 2, 3)
    with pytest.raises(ValueError, match="T must be finite and in"):
        phase_hop(bridge, m, F, 1.0)
    with pytest.raises(ValueError, match="F must have m's x-shape"):
        phase_hop(bridge, m, torch.zeros(2, 4, 3), 0.9)
    with pytest.raises(TypeError, match="bridge must be a PhaseBridge"):
        phase_hop("bridge", m, F, 0.9)


# --- the 2x2 transition (every variant's update, docs/math.md §7.4) -----------------------------

TRANSITIONS = [(0.93, 0.041, -0.35, 0.81), (1.0, 0.0, 0.0, 1.0), (0.2, 0.6, -1.3, 0.0)]


@pytest.mark.parametrize("x_shape", [(1, 3, 5, 7), (3, 1030)], ids=str)
@pytest.mark.parametrize("phi", TRANSITIONS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_transition_matches_reference(backend, dtype, phi, x_shape):
    """x <- p_xx x + p_xv v + sum Cx F, v <- p_vx x + p_vv v + sum Cv F on every backend, against the
    oracle's own transcription; the last transition has p_vv = 0 (the cpu path's fallback)."""
    m, Fs = make_state(x_shape, dtype, seed=3)
    want = reference_step(m, Fs[:3], phi, CX[:3], CV[:3])
    got = phase_step(m.clone(), Fs[:3], phi, CX[:3], CV[:3], backend=backend)
    assert_close(got, want, dtype, scale=4.0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_f_form_transition_equals_the_step_size(backend):
    """The transition (1, h, 0, 1) is the F form's step h exactly."""
    m, Fs = make_state((3, 1030), torch.float32, seed=4)
    a = phase_step(m.clone(), Fs[:2], H, CX[:2], CV[:2], backend=backend)
    b = phase_step(m.clone(), Fs[:2], (1.0, H, 0.0, 1.0), CX[:2], CV[:2], backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("h", [(1.0, 2.0, 3.0), (1.0, math.nan, 0.0, 1.0), "h", -0.1])
def test_bad_transitions_are_refused(h):
    m, Fs = make_state((2, 4), torch.float32)
    before = m.clone()
    with pytest.raises((ValueError, TypeError), match="h"):
        phase_step(m, Fs[:1], h, [0.1], [0.2], backend="cpu")
    assert torch.equal(m, before)


# --- autograd inputs are refused before anything is written (every backend) ----------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("which", ["m", "F"])
def test_autograd_inputs_are_refused_untouched(backend, which):
    m, Fs = make_state((2, 3, 4), torch.float32)
    F = Fs[0]
    (m if which == "m" else F).requires_grad_(True)
    before = m.detach().clone()
    name = "m" if which == "m" else "F_hist[0]"
    with pytest.raises(ValueError, match=re.escape(f"{name} requires grad")):
        phase_step(m, [F], H, [0.1], [0.2], backend=backend)
    with pytest.raises(ValueError, match="requires grad"):
        phase_hop(PhaseBridge(), m, F, 0.5, backend=backend)
    assert torch.equal(m.detach(), before)
    with torch.no_grad():  # outside autograd the same call runs
        phase_step(m, [F], H, [0.1], [0.2], backend=backend)
