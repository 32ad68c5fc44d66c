"""Property-based tests (hypothesis) of the public sampling API.

Covered: PhaseBridge and its coefficients, bridge.sample_prior, bridge_sample, phase_step,
phase_hop, sde_step, PhaseSampler construction and sample. Each example draws shapes (odd
sizes, extra dims), storage dtypes, strides (transposed, sliced, offset, expanded/stride 0),
inputs that share memory with the updated state, and bad values. The property is always one
of: the result equals that of the same call on contiguous copies of the inputs (within the
per-dtype tolerance below), or a ValueError / TypeError whose message names the argument.

Reproducible and bounded: derandomized, no example database, a fixed number of examples per
test (the module runs in well under a minute on two cores). Mostly the "cpu" and "reference"
backends; "triton" (under the interpreter, tests/conftest.py) only for tiny shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psb_fast import PhaseBridge, PhaseSampler, bridge_sample
from psb_fast.bridge import MODES, P_RANGE, VAR_RANGE
from psb_fast.guidance import StrokeGuide
from psb_fast.ops.phase_step import phase_hop, phase_step
from psb_fast.ops.sde_step import sde_step
from psb_fast.sampler import MAX_NFE

torch.set_num_threads(1)

# Same call on strided/aliased inputs vs contiguous copies: |got - want| <= atol * scale + rtol
# * |want| (scale = max |want|, at least 1). 16-bit: one ulp of the rounded float32 result.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2.0**-7, atol=1e-6),
    torch.float16: dict(rtol=2.0**-10, atol=1e-6),
}
STORAGE = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "transposed", "sliced", "offset", "expanded")
STATE_LAYOUTS = ("contiguous", "transposed", "sliced", "offset", "expanded")
BACKENDS = ("cpu", "reference", "triton")
TRITON_MAX_ELEMENTS = 64  # triton draws only for states this small (the interpreter is slow)


def bounded(n: int) -> settings:
    """max_examples=n, reproducible (derandomized, no database), no deadline."""
    return settings(
        max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ----------------------------------------------------------------------------- helpers


def make(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, seed: int, scale: float = 1.0
) -> torch.Tensor:
    """Random values of `shape` in `dtype`, laid out as `layout`:
    contiguous; transposed (last two dims swapped in memory); sliced (every other element of a
    wider last dim); offset (a view starting 3 elements into a flat buffer); expanded (one dim
    of size 1 broadcast, stride 0)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return (scale * torch.randn(*size, generator=g, dtype=torch.float64)).to(dtype)

    if layout == "transposed" and len(shape) >= 2:
        return randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    if layout == "sliced":
        return randn(*shape[:-1], 2 * shape[-1] + 1)[..., 1::2]
    if layout == "offset":
        return randn(math.prod(shape) + 3)[3:].view(shape)
    if layout == "expanded":
        d = seed % len(shape)
        return randn(*shape[:d], 1, *shape[d + 1:]).expand(shape)
    return randn(*shape)


def copies(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Contiguous copies (the reference inputs)."""
    return [t.clone(memory_format=torch.contiguous_format) for t in tensors]


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    tol = TOL[dtype or want.dtype]
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(1.0, float(want.double().abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), rtol=tol["rtol"], atol=tol["atol"] * scale,
                               equal_nan=False)


def expect_error(call: Callable[[], object], name: str) -> None:
    """call() raises ValueError or TypeError whose message names `name`."""
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert name in str(info.value), (name, str(info.value))


def self_overlapping(t: torch.Tensor) -> bool:
    """A dim of size > 1 with stride 0 (what `make(..., "expanded")` can give)."""
    return any(size > 1 and stride == 0 for size, stride in zip(t.shape, t.stride(), strict=True))


def view_of_state(m: torch.Tensor, x_shape: tuple[int, ...], kind: str) -> torch.Tensor:
    """An x-shaped tensor sharing m's memory: its x or v half, or a window shifted by one element
    (the x half when m's storage is too small for that window)."""
    C = x_shape[1]
    storage = m.untyped_storage().nbytes() // m.element_size()
    if kind == "x" or (kind == "shifted" and m.storage_offset() + 1 + math.prod(x_shape) > storage):
        return m[:, :C]
    if kind == "v":
        return m[:, C:]
    strides, acc = [], 1
    for size in reversed(x_shape):
        strides.insert(0, acc)
        acc *= size
    return torch.as_strided(m, x_shape, strides, m.storage_offset() + 1)


@st.composite
def x_shapes(draw, max_b: int = 3, max_c: int = 3, max_rest: int = 2) -> tuple[int, ...]:
    """[B, C, ...]: odd sizes allowed, 0..max_rest extra dims."""
    B = draw(st.integers(1, max_b))
    C = draw(st.integers(1, max_c))
    rest = draw(st.lists(st.integers(1, 5), max_size=max_rest))
    return (B, C, *rest)


def state_shape(x_shape: tuple[int, ...]) -> tuple[int, ...]:
    return (x_shape[0], 2 * x_shape[1], *x_shape[2:])


def backend_for(draw, n_state: int) -> str:
    backend = draw(st.sampled_from(BACKENDS))
    return "cpu" if backend == "triton" and n_state > TRITON_MAX_ELEMENTS else backend


def log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0**e)


# ----------------------------------------------------------------------------- PhaseBridge

BAD_PARAMETERS = {
    "p": [0.0, -1.0, math.nan, math.inf, 1e77, P_RANGE[1] * 2, P_RANGE[0] / 2, "3", True, None, 1j,
          torch.tensor([1.0, 2.0])],
    "k": [1.0, -1.0, 1.5, math.nan, "0.2", torch.tensor(1.0)],
    "varx": [0.0, -2.0, math.inf, VAR_RANGE[1] * 10, 5e-324, False],
    "varv": [math.nan, VAR_RANGE[0] / 10, 1e300, [1.0]],
    "mode": ["ode", None, 3],
}


@bounded(60)
@given(
    p=log_uniform(*P_RANGE), k=st.floats(-0.999999, 0.999999), varx=log_uniform(*VAR_RANGE),
    varv=log_uniform(*VAR_RANGE), mode=st.sampled_from(MODES), as_tensor=st.booleans(),
    t=st.lists(st.one_of(st.floats(0.0, 1.0, exclude_max=True), st.sampled_from([0.0, 0.5, 1 - 2.0**-53])),
               min_size=1, max_size=4),
    t_form=st.sampled_from(["float", "0-d", "1-d", "2-d"]),
)
@pytest.mark.slow
def test_bridge_coefficients_are_finite_inside_the_box(p, k, varx, varv, mode, as_tensor, t, t_form):
    params = dict(p=p, k=k, varx=varx, varv=varv)
    if as_tensor:
        params = {name: torch.tensor(value, dtype=torch.float64) for name, value in params.items()}
    bridge = PhaseBridge(**params, mode=mode)
    times = {
        "float": t[0],
        "0-d": torch.tensor(t[0], dtype=torch.float64),
        "1-d": torch.tensor(t, dtype=torch.float64),
        "2-d": torch.tensor(t, dtype=torch.float64).view(1, -1).expand(2, -1),
    }[t_form]
    co = bridge.coefficients(times)
    shape = () if t_form in ("float", "0-d") else tuple(times.shape)
    for name in ("lxx", "lvv", "ell", "AA", "normalizer", "label_x1", "label_eps_v", "hop_aa", "hop_den"):
        value = getattr(co, name)
        assert value.shape == shape and value.dtype == torch.float64, name
        assert bool(torch.isfinite(value).all()), (name, params, t)
    assert bool((co.lvv > 0).all()) and bool((co.lxx > 0).all())


@bounded(40)
@given(name=st.sampled_from(sorted(BAD_PARAMETERS)), data=st.data())
def test_bridge_rejects_bad_parameters_naming_them(name, data):
    value = data.draw(st.sampled_from(BAD_PARAMETERS[name]))
    expect_error(lambda: PhaseBridge(**{name: value}), name)


@bounded(30)
@given(t=st.one_of(st.sampled_from([1.0, -1e-9, math.nan, math.inf, 2.0, "0.5", None]),
                   st.floats(1.0, 10.0)))
def test_coefficients_reject_bad_t(t):
    expect_error(lambda: PhaseBridge().coefficients(t), "t")


@bounded(30)
@given(shape=x_shapes(), dtype=st.sampled_from((*STORAGE, torch.float64)), seed=st.integers(0, 2**31),
       bad=st.sampled_from([None, None, "shape", "dtype", "generator"]))
def test_sample_prior(shape, dtype, seed, bad):
    bridge = PhaseBridge()
    if bad == "shape":
        bad_shape = pick([(3,), (0, 2), (2, -1), (2, 2.0), (True, 2), 5, "ab"], seed)
        expect_error(lambda: bridge.sample_prior(bad_shape), "shape_of_x")
        return
    if bad == "dtype":
        expect_error(lambda: bridge.sample_prior(shape, dtype=pick([torch.int64, "float32"], seed)), "dtype")
        return
    if bad == "generator":
        expect_error(lambda: bridge.sample_prior(shape, generator=seed), "generator")
        return
    a = bridge.sample_prior(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    b = bridge.sample_prior(torch.Size(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    assert a.shape == state_shape(shape) and a.dtype == dtype and torch.equal(a, b)
    assert bool(torch.isfinite(a).all())


def pick(options: list, seed: int):
    """One of `options`, chosen by a drawn seed."""
    return options[seed % len(options)]


# ----------------------------------------------------------------------------- bridge_sample


@bounded(40)
@given(data=st.data(), shape=x_shapes(max_b=4), dtype=st.sampled_from(STORAGE),
       x_layout=st.sampled_from(LAYOUTS), eps_kind=st.sampled_from(["none", "strided", "views of x1"]),
       mode=st.sampled_from(MODES), seed=st.integers(0, 2**31))
@pytest.mark.slow
def test_bridge_sample_equals_contiguous_copies(data, shape, dtype, x_layout, eps_kind, mode, seed):
    backend = data.draw(st.sampled_from(BACKENDS))
    if backend == "triton" and math.prod(shape) > 24:
        backend = "cpu"
    bridge = PhaseBridge(mode=mode)
    x1 = make(shape, dtype, x_layout, seed)
    t = torch.rand(shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.999
    eps = None
    if eps_kind == "strided":
        eps = (make(shape, torch.float32, "transposed", seed + 1),
               make(shape, torch.float32, "expanded", seed + 2))
    elif eps_kind == "views of x1":
        eps = (x1, x1.flip(0))
    got = bridge_sample(bridge, x1, t, seed=seed, backend=backend, eps=eps)
    x1_c, = copies(x1)
    eps_c = None if eps is None else tuple(copies(*eps))
    want = bridge_sample(bridge, x1_c, t, seed=seed, backend=backend, eps=eps_c)
    for g, w in zip(got, want, strict=True):
        assert g.is_contiguous()
        assert_close(g, w, dtype)


BAD_BRIDGE_SAMPLE = [
    ("x1", dict(x1="nan")), ("x1", dict(x1="inf")), ("x1", dict(x1=torch.zeros(3, dtype=torch.float32))),
    ("x1", dict(x1=torch.zeros(2, 3, dtype=torch.float64))), ("x1", dict(x1=[[0.0]])),
    ("t", dict(t=torch.tensor([0.5]))), ("t", dict(t=torch.tensor([0.5, 1.0]))), ("t", dict(t=0.5)),
    ("t", dict(t=torch.tensor([math.nan, 0.1]))), ("seed", dict(seed=-3)), ("seed", dict(seed=2.5)),
    ("eps_x", dict(eps="nan")), ("eps_v", dict(eps="shape")), ("eps", dict(eps=(torch.zeros(2, 3),))),
    ("row_offset", dict(row_offset=-1)), ("backend", dict(backend="gpu")), ("bridge", dict(bridge=None)),
]


@bounded(30)
@given(case=st.sampled_from(BAD_BRIDGE_SAMPLE), backend=st.sampled_from(["cpu", "reference", "auto"]))
def test_bridge_sample_rejects_bad_arguments_naming_them(case, backend):
    name, change = case[0], dict(case[1])
    args = dict(bridge=PhaseBridge(), x1=torch.randn(2, 3), t=torch.tensor([0.1, 0.5]), seed=1,
                backend=backend)
    if change.get("x1") in ("nan", "inf"):
        args["x1"][1, 2] = math.nan if change.pop("x1") == "nan" else math.inf
    if change.get("eps") == "nan":
        change["eps"] = (torch.full((2, 3), math.nan), torch.zeros(2, 3))
    elif change.get("eps") == "shape":
        change["eps"] = (torch.zeros(2, 3), torch.zeros(3, 2))
    args.update(change)
    expect_error(lambda: bridge_sample(**args), name)


# ----------------------------------------------------------------------------- phase_step / hop / sde


@st.composite
def step_inputs(draw):
    """(backend, m, F_hist, x_shape, dtype): m in a drawn layout, each F drawn as a fresh tensor
    in a drawn layout or as a view of m (x, v or a shifted window)."""
    x_shape = draw(x_shapes())
    dtype = draw(st.sampled_from(STORAGE))
    seed = draw(st.integers(0, 2**31))
    m = make(state_shape(x_shape), dtype, draw(st.sampled_from(STATE_LAYOUTS)), seed)
    backend = backend_for(draw, m.numel())
    q = draw(st.integers(1, 4))
    F_hist = []
    for j in range(q):
        kind = draw(st.sampled_from((*LAYOUTS, "x", "v", "shifted")))
        if kind in LAYOUTS:
            F_hist.append(make(x_shape, dtype, kind, seed + 1 + j))
        else:
            F_hist.append(view_of_state(m, x_shape, kind))
    return backend, m, F_hist, x_shape, dtype


@bounded(120)
@given(inputs=step_inputs(), h=st.floats(0.0, 0.2),
       coeffs=st.lists(st.floats(-1.0, 1.0), min_size=8, max_size=8))
@pytest.mark.slow
def test_phase_step_equals_contiguous_copies(inputs, h, coeffs):
    backend, m, F_hist, _, dtype = inputs
    q = len(F_hist)
    Cx, Cv = coeffs[:q], coeffs[4:4 + q]
    if self_overlapping(m):
        before = m.clone()
        expect_error(lambda: phase_step(m, F_hist, h, Cx, Cv, backend=backend), "m must not have overlapping")
        assert torch.equal(m, before)
        return
    m_ref, *F_ref = copies(m, *F_hist)  # taken before the update: the views' values as given
    phase_step(m_ref, F_ref, h, Cx, Cv, backend=backend)
    assert phase_step(m, F_hist, h, Cx, Cv, backend=backend) is m
    assert_close(m, m_ref, dtype)


BAD_STEP = [
    ("h", dict(h=-0.1)), ("h", dict(h=math.nan)), ("h", dict(h=math.inf)), ("h", dict(h="0.1")),
    ("h", dict(h=torch.tensor([0.1, 0.2]))), ("Cx", dict(Cx=[0.1, 0.2])), ("Cv", dict(Cv=[math.nan])),
    ("Cv", dict(Cv=0.3)), ("F_hist[0]", dict(F_hist="shape")), ("F_hist[0]", dict(F_hist="float64")),
    ("F_hist", dict(F_hist=[])), ("F_hist", dict(F_hist="five")), ("m", dict(m="odd")),
    ("m", dict(m="float64")), ("m", dict(m="expanded")), ("backend", dict(backend="gpu")),
]


@bounded(40)
@given(case=st.sampled_from(BAD_STEP), backend=st.sampled_from(["cpu", "reference"]))
def test_phase_step_rejects_bad_arguments_naming_them(case, backend):
    name, change = case
    m, F = torch.randn(2, 4, 3), torch.randn(2, 2, 3)
    args = dict(m=m, F_hist=[F], h=0.1, Cx=[0.1], Cv=[0.2], backend=backend)
    special = {
        "shape": [torch.zeros(2, 3, 3)], "float64": [F.double()], "five": [F] * 5,
        "odd": torch.zeros(2, 3, 3), "expanded": torch.zeros(1, 4, 3).expand(2, 4, 3),
    }
    args.update({k: special.get(v, v) if isinstance(v, str) and k in ("F_hist", "m") else v
                 for k, v in change.items()})
    if change.get("m") == "float64":
        args["m"] = m.double()
    before = args["m"].clone() if isinstance(args["m"], torch.Tensor) else None
    expect_error(lambda: phase_step(**args), name)
    if before is not None:
        assert torch.equal(args["m"], before)


@bounded(60)
@given(inputs=step_inputs(), T=st.floats(0.0, 0.999), mode=st.sampled_from(MODES),
       T_form=st.sampled_from(["float", "0-d", "1-elem"]))
@pytest.mark.slow
def test_phase_hop_equals_contiguous_copies(inputs, T, mode, T_form):
    backend, m, F_hist, x_shape, dtype = inputs
    bridge = PhaseBridge(mode=mode)
    F = F_hist[0]
    T_arg = {"float": T, "0-d": torch.tensor(T, dtype=torch.float64),
             "1-elem": torch.tensor([T], dtype=torch.float64)}[T_form]
    before = m.clone()
    got = phase_hop(bridge, m, F, T_arg, backend=backend)
    assert torch.equal(m, before)
    m_c, F_c = copies(m, F)
    want = phase_hop(bridge, m_c, F_c, T, backend=backend)
    assert got.shape == x_shape
    assert_close(got, want, dtype)


@bounded(80)
@given(inputs=step_inputs(), kind=st.sampled_from(["exact", "em", "sscs_half"]), t=st.floats(0.0, 0.9),
       h=st.floats(0.0, 0.09), xi_kind=st.sampled_from(["fresh", "views of m"]), seed=st.integers(0, 2**31))
@pytest.mark.slow
def test_sde_step_equals_contiguous_copies(inputs, kind, t, h, xi_kind, seed):
    backend, m, F_hist, x_shape, dtype = inputs
    bridge = PhaseBridge(mode="SDE")
    F = None if kind == "sscs_half" else F_hist[0]
    if xi_kind == "fresh":
        xi = (make(x_shape, torch.float32, "transposed", seed),
              make(x_shape, torch.float32, "sliced", seed + 1))
    else:
        xi = (view_of_state(m, x_shape, "v"), view_of_state(m, x_shape, "shifted"))
    if self_overlapping(m):
        expect_error(lambda: sde_step(kind, m, F, bridge, t, h, xi=xi, backend=backend), "m must not")
        return
    m_ref, *rest = copies(m, *xi, *([] if F is None else [F]))
    xi_ref, F_ref = tuple(rest[:2]), (rest[2] if F is not None else None)
    sde_step(kind, m_ref, F_ref, bridge, t, h, xi=xi_ref, backend=backend)
    assert sde_step(kind, m, F, bridge, t, h, xi=xi, backend=backend) is m
    assert_close(m, m_ref, dtype)


BAD_SDE = [
    ("kind", dict(kind="heun")), ("kind", dict(kind=None)), ("t + h", dict(t=0.95, h=0.05)),
    ("t", dict(t=1.0)), ("t", dict(t="0.3")), ("h", dict(h=-0.01)), ("F", dict(F=None)),
    ("cx", dict(cx=0.1)), ("offset", dict(offset=-1)), ("offset", dict(offset=3)), ("seed", dict(seed=-1)),
    ("seed", dict(seed="1")), ("xi", dict(xi=3)), ("xi[1]", dict(xi="shape")), ("bridge", dict(bridge="b")),
]


@bounded(30)
@given(case=st.sampled_from(BAD_SDE), backend=st.sampled_from(["cpu", "reference"]))
def test_sde_step_rejects_bad_arguments_naming_them(case, backend):
    name, change = case
    m, F = torch.randn(2, 4, 3), torch.randn(2, 2, 3)
    args = dict(kind="exact", m=m, F=F, bridge=PhaseBridge(mode="SDE"), t=0.3, h=0.05, seed=0,
                backend=backend)
    if change.get("xi") == "shape":
        change = dict(xi=(torch.zeros(2, 2, 3), torch.zeros(2, 3, 3)))
    args.update(change)
    before = m.clone()
    expect_error(lambda: sde_step(args.pop("kind"), args.pop("m"), args.pop("F"), args.pop("bridge"),
                                  args.pop("t"), args.pop("h"), **args), name)
    assert torch.equal(m, before)


# ----------------------------------------------------------------------------- PhaseSampler

GOOD_SAMPLER = dict(nfe=[1, 2, 5, 7], T=[0.4, 0.7, 0.95], t0=[0.0, 1e-5, 1e-3], order=[0, 1, 2, 3, None],
                    grid=["uniform", "rev-quad", "power-1.5", "tuned", None], hop=[True, False],
                    backend=["cpu", "reference", "auto"])
BAD_SAMPLER = {
    "nfe": [0, -1, 2.5, "5", True, None, 10**9, MAX_NFE + 1],
    "T": [1.0, 0.0, math.nan, -0.5, "0.5", torch.tensor([0.5, 0.6]), 1j],
    "t0": [-0.1, 1.0, math.inf, "0", torch.tensor([0.0, 0.1])],
    "order": [4, -1, 1.5, True, "2"],
    "grid": ["cosine", "power-0", "power-x", 3.0, [0.1, 0.2]],
    "hop": ["no", 1, None, torch.tensor(True)],
    "solver": ["heun", None],
    "backend": ["cuda", None, "TRITON"],
    "cuda_graph": ["yes", 0],
    "bridge": [None, "PhaseBridge"],
}


@bounded(100)
@given(data=st.data(), bad=st.sampled_from([None, None, *sorted(BAD_SAMPLER)]),
       tensor_scalars=st.booleans())
@pytest.mark.slow
def test_sampler_construction(data, bad, tensor_scalars):
    kwargs = {name: data.draw(st.sampled_from(values), label=name) for name, values in GOOD_SAMPLER.items()}
    bridge = PhaseBridge()
    if tensor_scalars:
        kwargs["T"], kwargs["t0"] = torch.tensor(kwargs["T"]), torch.tensor(kwargs["t0"], dtype=torch.float64)
    if bad is None:
        s = PhaseSampler(bridge, **kwargs)
        assert len(s.grid) == kwargs["nfe"] and s.hop is kwargs["hop"]
        assert s.grid[0].item() == pytest.approx(float(kwargs["t0"]), abs=1e-12)
        assert 0 <= s.order <= 3 and len(s.tables.h) == kwargs["nfe"] - (1 if kwargs["hop"] else 0)
        return
    value = data.draw(st.sampled_from(BAD_SAMPLER[bad]), label=f"bad {bad}")
    if bad == "bridge":
        expect_error(lambda: PhaseSampler(value, **kwargs), "bridge")
    else:
        expect_error(lambda: PhaseSampler(bridge, **{**kwargs, bad: value}), bad)


def model_of(kind: str, C: int) -> Callable:
    """A model F(m, t) of x's shape: fresh tensors, views of m (its x or v half), or a fresh
    tensor in a transposed layout."""
    if kind == "x view":
        return lambda m, t: m[:, :C]
    if kind == "v view":
        return lambda m, t: m[:, C:]
    if kind == "transposed":
        return lambda m, t: (0.5 * m[:, C:] - m[:, :C]).transpose(0, -1).contiguous().transpose(0, -1)
    return lambda m, t: 0.5 * m[:, C:] - m[:, :C] * t.view((-1,) + (1,) * (m.dim() - 1))


@bounded(40)
@given(data=st.data(), shape=x_shapes(max_b=3, max_c=2), dtype=st.sampled_from((*STORAGE, torch.float64)),
       layout=st.sampled_from(LAYOUTS), nfe=st.integers(1, 6), order=st.integers(0, 3), hop=st.booleans(),
       model_kind=st.sampled_from(["fresh", "x view", "v view", "transposed"]), seed=st.integers(0, 2**31))
@pytest.mark.slow
def test_sample_equals_contiguous_copies(data, shape, dtype, layout, nfe, order, hop, model_kind, seed):
    """Sampling with a strided m0 and a model returning views of m equals sampling with a
    contiguous m0 and a model returning copies; the sample is finite, of x's shape and m0's dtype."""
    m0 = make(state_shape(shape), dtype, layout, seed)
    backend = backend_for(data.draw, m0.numel() * nfe)
    sampler = PhaseSampler(PhaseBridge(), nfe, T=0.8 if hop else 0.95, order=order, grid="uniform", hop=hop,
                           backend=backend)
    model = model_of(model_kind, shape[1])
    got = sampler.sample(model, m0)
    m0_c, = copies(m0)
    want = sampler.sample(lambda m, t: model(m, t).clone(), m0_c)
    assert got.shape == shape and got.dtype == dtype and bool(torch.isfinite(got).all())
    assert_close(got, want, dtype)


BAD_SAMPLE = ["m0 nan", "m0 int", "m0 odd", "output shape", "output nan", "output huge", "callback", "seed",
              "guide", "model", "return_trajectory"]


@bounded(30)
@given(case=st.sampled_from(BAD_SAMPLE), backend=st.sampled_from(["cpu", "reference"]), nfe=st.integers(2, 5))
def test_sample_rejects_bad_arguments_naming_them(case, backend, nfe):
    bridge = PhaseBridge()
    m0 = bridge.sample_prior((3, 2), generator=torch.Generator().manual_seed(nfe))
    sampler = PhaseSampler(bridge, nfe, backend=backend)
    model = model_of("fresh", 2)
    kwargs, name = {}, case.split()[0]
    if case == "m0 nan":
        m0[2, 1] = math.nan
    elif case == "m0 int":
        m0 = m0.to(torch.int32)
    elif case == "m0 odd":
        m0 = m0[:, :3]
    elif case == "output shape":
        model, name = (lambda m, t: m[:, :1]), "model output at step 0"
    elif case == "output nan":
        model, name = (lambda m, t: torch.full((3, 2), math.nan)), "model output at step 0"
    elif case == "output huge":
        model, name = (lambda m, t: torch.full((3, 2), 3e38)), "at step"
    elif case == "model":
        model = 3
    else:
        kwargs = {"callback": "print", "seed": -2, "guide": "stroke", "return_trajectory": 1}
        kwargs = {case: kwargs[case]}
    expect_error(lambda: sampler.sample(model, m0, **kwargs), name)


@bounded(10)
@given(mode=st.sampled_from(["dyn-v", "init-v", "inpaint"]), weight=st.floats(0.0, 1.0),
       seed=st.integers(0, 99))
def test_guided_sample_with_view_models(mode, weight, seed):
    bridge = PhaseBridge()
    m0 = bridge.sample_prior((4, 2), generator=torch.Generator().manual_seed(seed))
    stroke = torch.tensor([0.5, -1.0]) if mode == "inpaint" else torch.tensor([0.5, 0.25])
    guide = StrokeGuide(stroke, mode=mode, init_weight=weight)
    sampler = PhaseSampler(bridge, 5, backend="cpu")
    got = sampler.sample(lambda m, t: m[:, 2:], m0, guide=guide, seed=seed)
    want = sampler.sample(lambda m, t: m[:, 2:].clone(), m0, guide=guide, seed=seed)
    assert torch.equal(got, want)
