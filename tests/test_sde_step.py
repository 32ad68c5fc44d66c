"""SDE steps (psb_fast.ops.sde_step) and the fused noise kernel (psb_fast.kernels.sde_step).

Deterministic parts against reference/sde_step.py with supplied xi; the in-kernel Philox noise
by its moments, its reproducibility and its chunking invariance. Triton runs under the
interpreter on CPU tensors (tests/conftest.py).
"""

import math

import pytest
import torch

from psb_fast.bridge import PhaseBridge
from psb_fast.kernels.sde_step import sde_step as sde_step_kernel
from psb_fast.ops.sde_step import noise_cholesky, sde_step, sscs_half_covariance, transition_covariance
from psb_fast.reference import sde_step as ref
from psb_fast.reference.multistep import multistep_coefficients

# Result vs the float64 reference with the same xi, per storage dtype:
# |got - ref| <= atol + rtol * |ref|. 16-bit rtol = 1 ulp (one rounding of the float32 result;
# the Triton interpreter truncates float32 -> bfloat16).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2.0**-7, atol=1e-6),
    torch.float16: dict(rtol=2.0**-10, atol=1e-6),
}
DTYPES = list(TOL)
FAST_BACKENDS = ("triton", "cpu")
KINDS = ("exact", "em", "sscs_half")
# Moment checks: allowed deviation in standard errors of the estimate (numbers are fixed by
# the seed, so this is a fixed margin, not a flake rate).
Z = 5.0
X_SHAPES = [(1, 3, 5, 7), (3, 1030)]
BRIDGE = PhaseBridge(mode="SDE")
T, H = 0.3, 0.05


def assert_close(got, want, dtype):
    torch.testing.assert_close(got.double(), want.double(), **TOL[dtype], check_dtype=False)


def make_state(x_shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn((x_shape[0], 2 * x_shape[1], *x_shape[2:]), generator=g).to(dtype)
    F = torch.randn(x_shape, generator=g).to(dtype)
    xi = (torch.randn(x_shape, generator=g), torch.randn(x_shape, generator=g))
    return m, F, xi


def order0(t, h):
    """The oracle's order-0 integrals over [t, t + h] (reference/multistep.py)."""
    co = multistep_coefficients(BRIDGE, torch.tensor([t, t + h], dtype=torch.float64), order=0)
    return co.Cx[0, 0].item(), co.Cv[0, 0].item()


def reference(kind, m, F, t, h, xi, cx=None, cv=None):
    """The reference step of `kind` as a new float64 state [x' | v']."""
    C = m.shape[1] // 2
    x, v = m[:, :C], m[:, C:]
    p = BRIDGE.p
    if kind == "exact":
        new = ref.exact_noise_step(x, v, p, t, h, cx, cv, F, *xi)
    elif kind == "em":
        N = BRIDGE.coefficients(t).normalizer.item()
        new = ref.em_step(x, v, p, t, h, N, F, xi[1])
    else:
        new = ref.sscs_half_step(x, v, p, t, h, *xi)
    return torch.cat(new, dim=1)


@pytest.mark.parametrize("x_shape", X_SHAPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS + ("reference",))
def test_supplied_xi_matches_reference(backend, dtype, kind, x_shape):
    m, F, xi = make_state(x_shape, dtype)
    F = None if kind == "sscs_half" else F
    cx, cv = order0(T, H)
    want = reference(kind, m, F, T, H, xi, cx, cv)
    extra = dict(cx=cx, cv=cv) if kind == "exact" else {}
    assert sde_step(kind, m, F, BRIDGE, T, H, xi=xi, backend=backend, **extra) is m
    assert_close(m, want, dtype)


def test_exact_default_coefficients_are_order0_integrals():
    m, F, xi = make_state((2, 3, 4, 4), torch.float32)
    want = reference("exact", m, F, T, H, xi, *order0(T, H))
    sde_step("exact", m, F, BRIDGE, T, H, xi=xi, backend="cpu")
    assert_close(m, want, torch.float32)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_noncontiguous_F(backend):
    m, _, xi = make_state((2, 3, 4, 4), torch.float32)
    F = torch.randn(2, 6, 4, 4)[:, 3:]
    want = reference("em", m, F, T, H, xi)
    sde_step("em", m, F, BRIDGE, T, H, xi=xi, backend=backend)
    assert_close(m, want, torch.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", FAST_BACKENDS + ("reference",))
def test_zero_step_is_identity(backend, kind):
    m, F, _ = make_state((2, 5), torch.float32)
    before = m.clone()
    sde_step(kind, m, None if kind == "sscs_half" else F, BRIDGE, T, 0.0, seed=1, backend=backend)
    assert torch.equal(m, before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", FAST_BACKENDS + ("reference",))
def test_near_one_is_finite(backend, kind):
    """The last step ends at tau = 1e-6 (N(t) ~ tau^-1/2 is steep there)."""
    m, F, _ = make_state((2, 5), torch.float32)
    t = 1.0 - 2e-6
    sde_step(kind, m, None if kind == "sscs_half" else F, BRIDGE, t, 1e-6, seed=2, backend=backend)
    assert torch.isfinite(m).all()


@pytest.mark.parametrize(("t", "h"), [(0.0, 0.1), (0.3, 0.05), (0.9, 0.099), (0.99, 0.009), (0.5, 1e-9)])
def test_step_scalars_match_reference(t, h):
    """The production noise covariances and their Cholesky factor (psb_fast.ops.sde_step) equal the
    oracle's transcription (reference/sde_step.py, itself checked against quadrature)."""
    p = BRIDGE.p
    for got, want in (
        (transition_covariance(p, t, h), ref.transition_covariance(p, t, h)),
        (sscs_half_covariance(p, t, h), ref.sscs_half_covariance(p, t, h)),
    ):
        assert got == pytest.approx(want, rel=1e-13, abs=0)
        assert noise_cholesky(got) == pytest.approx(ref.cholesky2(*want), rel=1e-12, abs=0)
    assert noise_cholesky((0.0, 0.0, 0.0)) is None


def _moments(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return a.pow(2).mean().item(), (a * b).mean().item(), b.pow(2).mean().item()


def test_kernel_noise_is_standard_normal():
    """With m = 0, h = 0, no F and chol = (1, 0, 1) the kernel writes (xi_x, xi_v)."""
    m = torch.zeros(4, 2, 64, 64)
    sde_step_kernel(m, None, 0.0, 0.0, 0.0, (1.0, 0.0, 1.0), seed=1234)
    xi_x, xi_v = m[:, :1], m[:, 1:]
    n = xi_x.numel()
    for xi in (xi_x, xi_v):
        assert abs(xi.double().mean().item()) < Z / math.sqrt(n)
        assert abs(xi.double().var().item() - 1) < Z * math.sqrt(2 / n)
        # Gaussian tail mass P(|xi| > 2) = 0.0455
        tail = (xi.abs() > 2).double().mean().item()
        assert abs(tail - 0.0455) < Z * math.sqrt(0.0455 * 0.9545 / n)
    assert abs(_moments(xi_x, xi_v)[1]) < Z / math.sqrt(n)
    # distinct streams: xi_x of element g+1 is not xi_v of element g
    assert not torch.equal(xi_x.flatten()[1:], xi_v.flatten()[:-1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_noise_covariance_matches_law(backend, kind):
    """Increment of m = 0 with F = 0: covariance (Q(t, h), diag(0, g^2 h), SSCS half cov)."""
    t, h = 0.3, 0.2
    m = torch.zeros(2, 2, 64, 64)
    F = None if kind == "sscs_half" else torch.zeros(2, 1, 64, 64)
    sde_step(kind, m, F, BRIDGE, t, h, seed=7, backend=backend)
    if kind == "exact":
        want = ref.transition_covariance(BRIDGE.p, t, h)
    elif kind == "em":
        want = (0.0, 0.0, (BRIDGE.p * (1 - t)) ** 2 * h)
    else:
        want = ref.sscs_half_covariance(BRIDGE.p, t, h)
    got = _moments(m[:, :1], m[:, 1:])
    n = m.numel() // 2
    sxx, sxv, svv = want
    # standard errors of the sample variances and covariance of a Gaussian pair
    se = (math.sqrt(2 / n) * sxx, math.sqrt((sxx * svv + sxv**2) / n), math.sqrt(2 / n) * svv)
    for g_, w_, s_ in zip(got, want, se, strict=True):
        assert abs(g_ - w_) <= Z * s_ + 1e-12, (got, want)


def _noise_only(m, seed, offset=0):
    return sde_step_kernel(m, None, 0.0, 0.0, 0.0, (1.0, 0.0, 1.0), seed=seed, offset=offset)


def test_same_seed_same_numbers_other_seed_differs():
    a, b, c = (torch.zeros(3, 4, 10) for _ in range(3))
    _noise_only(a, 5)
    _noise_only(b, 5)
    _noise_only(c, 6)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.99
    d = torch.zeros(3, 4, 10)
    _noise_only(d, 2**40 + 5)  # 64-bit seeds
    assert (a != d).float().mean() > 0.99


def test_chunks_with_offset_equal_whole_batch():
    B, n = 5, 2 * 7 * 9
    whole = torch.zeros(B, 4, 7, 9)
    _noise_only(whole, 11)
    chunked = torch.zeros(B, 4, 7, 9)
    for b0, b1 in ((0, 2), (2, 3), (3, 5)):
        _noise_only(chunked[b0:b1], 11, offset=b0 * n)
    assert torch.equal(chunked, whole)


def test_sde_step_chunks_equal_whole_batch():
    m, F, _ = make_state((4, 3, 5), torch.float32)
    whole = m.clone()
    sde_step("exact", whole, F, BRIDGE, T, H, seed=3, backend="triton")
    n = 3 * 5
    for b0, b1 in ((0, 1), (1, 4)):
        sde_step("exact", m[b0:b1], F[b0:b1], BRIDGE, T, H, seed=3, offset=b0 * n, backend="triton")
    assert torch.equal(m, whole)


@pytest.mark.parametrize("backend", FAST_BACKENDS + ("reference",))
def test_seeded_steps_are_reproducible(backend):
    m, F, _ = make_state((2, 6), torch.float32)
    a, b = m.clone(), m.clone()
    sde_step("em", a, F, BRIDGE, T, H, seed=9, backend=backend)
    sde_step("em", b, F, BRIDGE, T, H, seed=9, backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, m)


def test_cpu_and_reference_draw_the_same_numbers():
    m, F, _ = make_state((2, 6), torch.float32)
    a, b = m.clone(), m.clone()
    sde_step("exact", a, F, BRIDGE, T, H, seed=4, backend="cpu")
    sde_step("exact", b, F, BRIDGE, T, H, seed=4, backend="reference")
    assert_close(a, b, torch.float32)


def _bad_sde_cases():
    m = torch.zeros(2, 4, 3)
    F = torch.zeros(2, 2, 3)
    ok = dict(kind="em", m=m, F=F, bridge=BRIDGE, t=T, h=H)
    return [
        (dict(ok, kind="heun"), ValueError, "kind must be one of"),
        (dict(ok, F=None), ValueError, "F .* is required"),
        (dict(ok, kind="sscs_half"), ValueError, "F must be None"),
        (dict(ok, F=torch.zeros(2, 4, 3)), ValueError, "F must have m's x-shape"),
        (dict(ok, F=F.bfloat16()), TypeError, "F must have m's dtype"),
        (dict(ok, m=torch.zeros(2, 3, 3)), ValueError, "even dim 1"),
        (dict(ok, bridge=None), TypeError, "bridge must be a PhaseBridge"),
        (dict(ok, t=1.0), ValueError, "t must be finite and in"),
        (dict(ok, h=-1e-3), ValueError, "h must be finite and >= 0"),
        (dict(ok, h=math.nan), ValueError, "h must be finite"),
        (dict(ok, t=0.9, h=0.2), ValueError, "t \\+ h must be < 1"),
        (dict(ok, seed=-1), ValueError, "seed must be in"),
        (dict(ok, seed=2**63), ValueError, "seed must be in"),
        (dict(ok, seed=1.5), TypeError, "seed must be an int"),
        (dict(ok, offset=-3), ValueError, "offset must be an int >= 0"),
        (dict(ok, kind="exact", cx=0.1), ValueError, "cx and cv must be given together"),
        (dict(ok, cx=0.1, cv=0.1), ValueError, "only used by kind='exact'"),
        (dict(ok, xi=torch.zeros(2, 2, 3)), TypeError, "xi must be a pair"),
        (dict(ok, xi=(F, torch.zeros(2, 2, 4))), ValueError, r"xi\[1\] must have m's x-shape"),
        (dict(ok, xi=(F, torch.zeros(2, 2, 3, dtype=torch.int64))), TypeError, r"xi\[1\]"),
    ]


@pytest.mark.parametrize("backend", FAST_BACKENDS + ("reference",))
@pytest.mark.parametrize("kwargs,exc,match", _bad_sde_cases())
def test_sde_step_rejects_bad_input(backend, kwargs, exc, match):
    before = kwargs["m"].clone()
    with pytest.raises(exc, match=match):
        sde_step(**kwargs, backend=backend)
    assert torch.equal(kwargs["m"], before)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_offset_needs_triton(backend):
    m, F, _ = make_state((2, 6), torch.float32)
    with pytest.raises(ValueError, match="offset must be 0"):
        sde_step("em", m, F, BRIDGE, T, H, seed=1, offset=12, backend=backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS + ("float64",))
def test_autograd_inputs_are_refused_untouched(backend):
    """m or F requiring grad: one ValueError naming it, before m is written (every backend)."""
    m = torch.randn(2, 4, 3)
    F = torch.randn(2, 2, 3, requires_grad=True)
    before = m.clone()
    with pytest.raises(ValueError, match="F requires grad"):
        sde_step("exact", m, F, BRIDGE, 0.3, 0.05, seed=1, backend=backend)
    assert torch.equal(m, before)
    m.requires_grad_(True)
    with pytest.raises(ValueError, match="m requires grad"):
        sde_step("em", m, F.detach(), BRIDGE, 0.3, 0.05, seed=1, backend=backend)
