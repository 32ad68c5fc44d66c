"""The Triton kernel wrappers on every tile shape and storage dtype, and the Philox noise stream.

Runs natively on CUDA under benchmarks/gpu_check.sh (PSB_FAST_NATIVE_GPU=1), under the Triton
interpreter on CPU tensors otherwise (tests/conftest.py), with the same expectations:

- every wrapper branch (history length, model output or none, no / drawn / supplied noise,
  drawn / supplied bridge noise) against its float64 formula on the inputs, for rows that pick
  each tile shape of `psb_fast.kernels.tiling` (aligned and not);
- the noise stream: Philox4x32-10 words against an independent implementation and the
  Random123 known-answer vector, the normals against golden values and against float64
  Box-Muller of those words, and the SDE kernel and the bridge kernel drawing the same normals
  for the same (seed, element index).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import triton
import triton.language as tl

from psb_fast.backends import triton_interpreted
from psb_fast.kernels import bridge_sample, phase_step, sde_step, tiling

NATIVE_GPU = os.environ.get("PSB_FAST_NATIVE_GPU") == "1" and torch.cuda.is_available()
DEVICE = torch.device("cuda") if NATIVE_GPU else torch.device("cpu")
pytestmark = pytest.mark.skipif(
    not (NATIVE_GPU or triton_interpreted()), reason="needs CUDA or TRITON_INTERPRET=1"
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# x shapes and the tile each one gets (tiling.tile_shape of n = C * prod(rest))
SHAPES = {
    (2, 1, 32, 32): (1, 1024),  # n = 1024, 16-byte accesses
    (3, 3, 4, 4): (64, 16),  # n = 48, 16-byte accesses, a partial row block
    (3, 3, 5): (64, 2),  # n = 15 (F, xi read through row-strided slices)
    (2, 7, 11, 13): (1, 1024),  # n = 1001, not a multiple of 16
    (70, 2): (64, 2),  # 2-D toy data, two row blocks
    (5, 1): (64, 2),  # n = 1
}
SHAPE_IDS = [f"n{math.prod(s[1:])}" for s in SHAPES]


@pytest.fixture(autouse=True)
def gpu_tiles(monkeypatch):
    """The GPU's tile shapes under the interpreter too (it otherwise takes larger tiles)."""
    monkeypatch.setattr(tiling, "INTERPRETER_TILE_ELEMENTS", None)


def make(shape, dtype, count, seed=0, strided=False):
    """`count` random tensors of `shape` on DEVICE; strided: row-strided slices of wider ones."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        if strided:
            wide = torch.randn((shape[0], shape[1] + 1, *shape[2:]), generator=g).to(dtype)
            out.append(wide.to(DEVICE)[:, 1:])
        else:
            out.append(torch.randn(shape, generator=g).to(dtype).to(DEVICE))
    return out


def state(shape, dtype, seed=1):
    (m,) = make((shape[0], 2 * shape[1], *shape[2:]), dtype, 1, seed)
    return m


def split(m):
    C = m.shape[1] // 2
    return m[:, :C].double().cpu(), m[:, C:].double().cpu()


def assert_close(got, want, dtype):
    """Float32 element math, one rounding to the storage dtype (1 ulp; the interpreter truncates)."""
    eps = torch.finfo(dtype).eps
    atol = 2e-6 * (1 + want.abs().max().item())
    torch.testing.assert_close(got.double().cpu(), want, rtol=max(eps, 2e-6), atol=atol)


def test_shapes_pick_every_tile():
    assert {tiling.tile_shape(math.prod(s[1:])) for s in SHAPES} == set(tiling.TILES)
    for shape, tile in SHAPES.items():
        assert tiling.tile_shape(math.prod(shape[1:])) == tile, shape


# --------------------------------------------------------------------------- wrappers vs float64


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_phase_step_every_history_length(shape, dtype):
    h, cx, cv = 0.037, (0.011, -0.007, 0.004, -0.002), (0.52, -0.31, 0.17, -0.05)
    Fs = make(shape, dtype, 4, seed=2, strided=shape == (3, 3, 5))
    for q in range(1, phase_step.MAX_HISTORY + 1):
        m = state(shape, dtype)
        x, v = split(m)
        want_x = x + h * v + sum(c * F.double().cpu() for c, F in zip(cx[:q], Fs[:q], strict=True))
        want_v = v + sum(c * F.double().cpu() for c, F in zip(cv[:q], Fs[:q], strict=True))
        assert phase_step.phase_step(m, Fs[:q], h, cx[:q], cv[:q]) is m
        got_x, got_v = split(m)
        assert_close(got_x, want_x, dtype)
        assert_close(got_v, want_v, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_phase_hop(shape, dtype):
    m = state(shape, dtype)
    (F,) = make(shape, dtype, 1, seed=3)
    x, v = split(m)
    N, P, aa, bb, den, tau = 0.8, 2.0, 0.3, -0.2, 1.1, 0.3
    for got, (a_f, a_x, a_v) in (
        (phase_step.phase_hop(m, F, N, P, aa, bb, den), (N / den, P * aa / den, P * bb / den)),
        (phase_step.phase_hop_sde(m, F, N, P, tau), (N * tau / P, 1.0, tau)),
    ):
        assert got.shape == F.shape and got.dtype == dtype
        assert_close(got, a_f * F.double().cpu() + a_x * x + a_v * v, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sde_step_kernel_with_supplied_noise(shape, dtype):
    h, cxf, cvf = 0.05, 0.013, 0.41
    (F,) = make(shape, dtype, 1, seed=4, strided=shape == (3, 3, 5))
    xi = make(shape, torch.float32, 2, seed=5)
    xi_x, xi_v = (t.double().cpu() for t in xi)
    for has_f in (False, True):
        for chol in (None, (0.0, 0.0, 0.3), (0.2, -0.1, 0.3)):
            m = state(shape, dtype)
            x, v = split(m)
            f = F.double().cpu() if has_f else torch.zeros_like(x)
            lxx, lxv, lvv = chol or (0.0, 0.0, 0.0)
            want_x = x + h * v + cxf * f + lxx * xi_x
            want_v = v + cvf * f + lxv * xi_x + lvv * xi_v
            given = None if chol is None else xi
            sde_step.sde_step(m, F if has_f else None, h, cxf, cvf, chol, xi=given)
            got_x, got_v = split(m)
            assert_close(got_x, want_x, dtype)
            assert_close(got_v, want_v, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bridge_sample_with_supplied_noise(shape, dtype):
    (x1,) = make(shape, dtype, 1, seed=6)
    eps = make(shape, torch.float32, 2, seed=7)
    B = shape[0]
    coef = torch.randn(8, B, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    m, label = bridge_sample.bridge_sample_triton(x1, coef.to(DEVICE), eps=tuple(eps))
    c = coef.reshape(8, B, *([1] * (len(shape) - 1)))
    x, ex, ev = x1.double().cpu(), eps[0].double().cpu(), eps[1].double().cpu()
    got_x, got_v = split(m)
    assert_close(got_x, c[0] * x + c[2] * ex, dtype)
    assert_close(got_v, c[1] * x + c[3] * ex + c[4] * ev, dtype)
    assert_close(label, c[5] * x + c[6] * ex + c[7] * ev, dtype)


# --------------------------------------------------------------------------- the Philox stream

MASK32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11), written independently of Triton: four 32-bit words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (
            ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0 & MASK32
        )
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def normal_pair_float64(seed, g):
    """(eps_x, eps_v) of element index g in float64 from the words (tiling.normal_pair's math)."""
    w0, w1, _, _ = philox4x32_10((g & MASK32, g >> 32, 0, 0), (seed & MASK32, seed >> 32))

    def bits31(w):
        s = w - 2**32 if w >= 2**31 else w
        return ~s if s < 0 else s

    u = max(1e-7, bits31(w0) * 4.6566127342e-10)
    r = math.sqrt(-2.0 * math.log(u))
    t = 2 * math.pi * bits31(w1) / 2**31
    return r * math.cos(t), r * math.sin(t)


@triton.jit
def _philox_words_kernel(out_ptr, seed, g0, N: tl.constexpr):
    j = tl.arange(0, N)
    w0, w1, w2, w3 = tiling.philox_block(seed, g0 + j.to(tl.int64))
    tl.store(out_ptr + 4 * j, w0.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 4 * j + 1, w1.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 4 * j + 2, w2.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 4 * j + 3, w3.to(tl.int32, bitcast=True))


def kernel_words(seed, g0, count=4):
    out = torch.zeros(4 * count, dtype=torch.int32, device=DEVICE)
    _philox_words_kernel[(1,)](out, seed, g0, N=count)
    words = [w & MASK32 for w in out.tolist()]
    return [tuple(words[4 * i: 4 * i + 4]) for i in range(count)]


SEED = 2**40 + 12345
G0 = 2**32 - 2  # the counter's high word changes within the block


def test_philox_known_answer():
    """Random123's known-answer vector (counter 0, key 0) and the kernels' words."""
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert kernel_words(0, 0, 1)[0] == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)


def test_philox_words_match_independent_implementation():
    got = kernel_words(SEED, G0)
    key = (SEED & MASK32, SEED >> 32)
    want = [philox4x32_10(((G0 + i) & MASK32, (G0 + i) >> 32, 0, 0), key) for i in range(4)]
    assert got == want
    assert got[0] == (0xB3439260, 0xA1F05A4E, 0x3E950DCA, 0xD99760D0)  # golden


# (eps_x, eps_v) of elements G0 .. G0 + 5 under seed 20240501, as first computed by the interpreter
GOLDEN_SEED = 20240501
GOLDEN = [
    (-0.4067159593105316, -0.1869674026966095),
    (-0.3506830930709839, -1.5085077285766602),
    (0.14771415293216705, -0.03155084699392319),
    (-0.476179301738739, -0.572721540927887),
    (-0.004803231917321682, -0.7928076386451721),
    (-0.5252722501754761, 1.4427646398544312),
]


def drawn_by_noise_kernel(seed, offset, B, n):
    """(xi_x, xi_v), each [B, n], as drawn by the SDE kernel for x elements offset .. offset + B n."""
    m = torch.zeros(B, 2, n, device=DEVICE)
    sde_step.sde_step(m, None, 0.0, 0.0, 0.0, (1.0, 0.0, 1.0), seed=seed, offset=offset)
    return m[:, 0].cpu(), m[:, 1].cpu()


def drawn_by_bridge_kernel(seed, row_offset, B, n):
    """(eps_x, eps_v), each [B, n], as drawn by the bridge kernel for rows row_offset .. + B."""
    coef = torch.zeros(8, B, dtype=torch.float64, device=DEVICE)
    coef[2] = coef[4] = 1.0  # x_t = eps_x, v_t = eps_v
    x1 = torch.zeros(B, n, device=DEVICE)
    m, _ = bridge_sample.bridge_sample_triton(x1, coef, seed=seed, row_offset=row_offset)
    return m[:, :n].cpu(), m[:, n:].cpu()


def test_normals_golden_and_float64():
    xi_x, xi_v = drawn_by_noise_kernel(GOLDEN_SEED, G0, 2, 3)
    got = list(zip(xi_x.flatten().tolist(), xi_v.flatten().tolist(), strict=True))
    want64 = [normal_pair_float64(GOLDEN_SEED, G0 + i) for i in range(6)]
    # interpreter: numpy float32; GPU: approximate sqrt / log (relative error ~1e-6)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(GOLDEN), rtol=1e-5, atol=1e-6)
    want64 = torch.tensor(want64, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want64, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("n", [15, 48, 1001, 1024])
def test_sde_and_bridge_kernels_draw_the_same_normals(n):
    """Same (seed, global element index) -> same pair, whatever the tile; chunks keep it."""
    B, row_offset = 3, 2**32 // n  # counters past 2**32
    a = drawn_by_noise_kernel(SEED, row_offset * n, B, n)
    b = drawn_by_bridge_kernel(SEED, row_offset, B, n)
    c = drawn_by_noise_kernel(SEED, (row_offset + 1) * n, B - 1, n)
    for u, w, tail in zip(a, b, c, strict=True):
        assert torch.equal(u, w)
        assert torch.equal(u[1:], tail)
    want = normal_pair_float64(SEED, row_offset * n + n + 1)
    torch.testing.assert_close((a[0][1, 1].item(), a[1][1, 1].item()), want, rtol=1e-5, atol=2e-6)
