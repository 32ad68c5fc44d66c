"""psb_fast.backends: backend resolution, the Triton requirement, scalar arguments, row views,
memory overlap and finiteness checks (the helpers every op shares)."""

import importlib.util
import warnings

import numpy as np
import pytest
import torch

from psb_fast import backends
from psb_fast.backends import (
    all_finite,
    as_rows,
    check_no_internal_overlap,
    check_storage,
    finite_flag,
    first_nonfinite,
    overlaps,
    real_scalar,
    require_triton,
    resolve_backend,
    row_view,
    triton_interpreted,
    unaliased,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None


# ----------------------------------------------------------------------------- resolve_backend


def test_auto_resolves_to_cpu_for_cpu_tensors():
    assert resolve_backend("auto", torch.zeros(2, 4)) == "cpu"
    assert resolve_backend("cpu", torch.zeros(2, 4)) == "cpu"


@pytest.mark.parametrize("name", ["gpu", "CPU", "", "triton "])
def test_unknown_backend_is_refused_naming_the_choices(name):
    with pytest.raises(ValueError, match=r"backend must be one of .*'cpu'.*got") as info:
        resolve_backend(name, torch.zeros(2, 4))
    assert repr(name) in str(info.value)


def test_every_concrete_backend_name_resolves_to_itself_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name in backends.BACKENDS:
        if name == "auto" or (name == "triton" and not HAS_TRITON):
            continue
        assert resolve_backend(name, torch.zeros(2, 4)) == name


def test_the_old_backend_name_selects_float64_and_warns_once(monkeypatch):
    monkeypatch.setattr(backends, "_WARNED", set())
    with pytest.warns(FutureWarning, match=r"backend='reference' is now called backend='float64'"):
        assert resolve_backend("reference", torch.zeros(2, 4)) == "float64"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("reference", torch.zeros(2, 4)) == "float64"  # once per process


def test_triton_on_a_cpu_tensor_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_interpreted()
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors .*got a tensor on cpu"):
        resolve_backend("triton", torch.zeros(2, 4))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_interpreted()
    if HAS_TRITON:
        assert resolve_backend("triton", torch.zeros(2, 4)) == "triton"


def test_missing_triton_is_an_import_error_naming_the_backend(monkeypatch):
    missing = ModuleNotFoundError("No module named 'triton'")
    monkeypatch.setattr(backends, "_triton_import_error", lambda: missing)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ImportError, match=r"backend='triton' needs the 'triton' package") as info:
        resolve_backend("triton", torch.zeros(2, 4))
    assert info.value.__cause__ is missing
    with pytest.raises(ImportError, match=r"backend='auto' \(for CUDA tensors 'auto' selects 'triton'\)"):
        require_triton("auto")
    with pytest.raises(ImportError, match="backend='triton'"):
        backends.kernel_module("phase_step")
    assert resolve_backend("auto", torch.zeros(2, 4)) == "cpu"  # CPU tensors never need Triton


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package")
def test_kernel_module_imports_the_op_kernels():
    module = backends.kernel_module("phase_step")
    assert module.__name__ == "psb_fast.kernels.phase_step" and callable(module.phase_step)


# ----------------------------------------------------------------------------- real_scalar, check_storage


@pytest.mark.parametrize(
    "value",
    [3, 2.5, np.float32(0.25), np.int64(-4), torch.tensor(1.5), torch.tensor([7.0], dtype=torch.float64),
     torch.tensor([[2]], dtype=torch.int32)],
)
def test_real_scalar_accepts_real_numbers_and_one_element_tensors(value):
    result = real_scalar("h", value)
    assert type(result) is float
    assert result == float(value.item() if isinstance(value, torch.Tensor) else value)


@pytest.mark.parametrize(
    ("value", "message"),
    [(True, "h must be a real number, got bool"), ("0.1", "got str"), (1 + 2j, "got complex"),
     (None, "got NoneType"), (torch.zeros(2), r"tensor of shape \(2,\)"),
     (torch.tensor(True), "dtype torch.bool"), (torch.tensor(1 + 1j), "dtype torch.complex")],
)
def test_real_scalar_refuses_everything_else_naming_the_argument(value, message):
    with pytest.raises(TypeError, match=message) as info:
        real_scalar("h", value)
    assert str(info.value).startswith("h must be")


def test_check_storage_admits_the_storage_dtypes_only():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_storage("m", torch.zeros(2, dtype=dtype))
    with pytest.raises(TypeError, match="m must be float32, bfloat16 or float16, got torch.float64"):
        check_storage("m", torch.zeros(2, dtype=torch.float64))
    with pytest.raises(TypeError, match="m must be a torch.Tensor, got ndarray"):
        check_storage("m", np.zeros(2, dtype=np.float32))


# ----------------------------------------------------------------------------- row views


def test_row_view_is_a_view_with_unit_column_stride():
    t = torch.arange(24.0).view(2, 3, 4)
    rows = row_view(t, 2, 12)
    assert rows is not None and rows.data_ptr() == t.data_ptr() and rows.stride() == (12, 1)
    wide = torch.arange(40.0).view(2, 20)
    narrow = wide[:, 4:16]  # rows 20 apart: still a view
    rows = row_view(narrow, 2, 12)
    assert rows is not None and rows.stride() == (20, 1) and torch.equal(rows, narrow)


def test_as_rows_copies_only_when_no_view_exists():
    t = torch.arange(24.0).view(4, 6).t()  # [6, 4], column-major: no [6, 4] view with unit column stride
    assert row_view(t, 6, 4) is None
    rows = as_rows(t, 6, 4)
    assert rows.is_contiguous() and rows.data_ptr() != t.data_ptr() and torch.equal(rows, t)
    c = torch.arange(24.0).view(6, 4)
    assert as_rows(c, 6, 4).data_ptr() == c.data_ptr()


# ----------------------------------------------------------------------------- memory overlap


def test_unaliased_copies_exactly_the_inputs_that_share_memory_with_out():
    m = torch.arange(12.0).view(2, 6)
    other = torch.ones(2, 3)
    assert unaliased(other, m) is other
    x = m[:, :3]
    copy = unaliased(x, m)
    assert copy is not x and not overlaps(copy, m) and torch.equal(copy, x) and copy.is_contiguous()
    assert overlaps(m[0], m[0, 1:3]) and not overlaps(m[0], m[1])  # rows of one buffer


def test_internal_overlap_is_refused_for_expanded_and_strided_aliases():
    check_no_internal_overlap("m", torch.zeros(3, 4))
    check_no_internal_overlap("m", torch.zeros(3, 4).t())  # permuted: distinct elements
    check_no_internal_overlap("m", torch.zeros(4, 8)[:, ::2])  # gaps are fine
    with pytest.raises(ValueError, match=r"m must not have overlapping elements .*strides \(0, 1\)"):
        check_no_internal_overlap("m", torch.zeros(1, 4).expand(3, 4))
    with pytest.raises(ValueError, match="overlapping elements"):
        check_no_internal_overlap("m", torch.zeros(10).as_strided((3, 4), (2, 1)))


# ----------------------------------------------------------------------------- finiteness


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finiteness_is_decided_per_element_not_by_the_sum(dtype):
    big = torch.full((64,), torch.finfo(dtype).max / 2, dtype=dtype)  # finite, its sum overflows
    assert all_finite(big) and bool(finite_flag(big))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = big.clone()
        t[37] = bad
        assert not all_finite(t) and not bool(finite_flag(t))
    assert all_finite(torch.zeros(0, dtype=dtype))


def test_first_nonfinite_names_the_value_and_its_index():
    t = torch.zeros(2, 3)
    t[1, 2], t[1, 0] = float("inf"), float("nan")
    assert first_nonfinite(t) == "nan at index (1, 0)"
    t[1, 0] = 0.0
    assert first_nonfinite(t) == "inf at index (1, 2)"
