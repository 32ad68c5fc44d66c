"""Every Triton kernel configuration the wrappers launch, compiled for sm_80 and sm_90 without a GPU.

`psb_fast.kernels.compile_check` calls the wrappers as `psb_fast.kernels.launches` lists them
(every branch x storage dtype x layout), lets Triton's own binder specialize each launch as a
real one would, and compiles every distinct specialization down to a cubin with the ptxas that
ships in the Triton wheel, behind a stub driver (no CUDA driver, no GPU, no skip). It runs as
one subprocess (this process imported Triton under the interpreter, tests/conftest.py) with a
worker per core; the assertions below share its record through a session fixture:

- every wrapper call on every layout and dtype compiled, for both architectures;
- no register spills, no stack frame, no local memory;
- registers within the kernel's budget (REGISTER_BUDGET: the in-kernel noise kernels fit 128,
  which allows 16 of 64 warps per SM);
- rows of a multiple of 16 elements (aligned pointers): only 16-byte global loads and stores
  of tensor elements (the bridge's float64 coefficients aside);
- 64-bit index arithmetic: no 32-bit add / sub / mul / shift of a size or program id in the
  TTIR (`compile_check.int32_overflows`), no 64-bit division in the PTX;
- no layout conversion and no barrier (no shared-memory round trip), except on rows of one
  element (`Layout.layout_conversions`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from psb_fast.kernels import launches

pytestmark = pytest.mark.slow  # compiles every kernel for sm_80 and sm_90 (minutes)
ARCHS = (80, 90)
REGISTER_BUDGET = {
    "_bridge_sample_kernel": 128,
    "_sde_step_kernel": 128,
    "_phase_step_kernel": 80,
    "_phase_hop_kernel": 48,
}
CASES = [(kernel, arch) for kernel in REGISTER_BUDGET for arch in ARCHS]
CASE_IDS = [f"{kernel.strip('_')}-sm{arch}" for kernel, arch in CASES]
LAYOUTS = {layout.name: layout for layout in launches.LAYOUTS}


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """The compile_check record: {"configurations": [...], "seconds": ..., "triton": ...}."""
    out = tmp_path_factory.mktemp("compile") / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = max(1, min(4, os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "psb_fast.kernels.compile_check", "--arch", *map(str, ARCHS),
           "--jobs", str(jobs), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"compile_check failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    with open(out) as f:
        return json.load(f)


def configs(compiled, kernel, arch):
    found = [r for r in compiled["configurations"] if r["kernel"] == kernel and r["arch"] == arch]
    assert found, f"no configuration of {kernel} compiled for sm_{arch}"
    return found


def describe(rec):
    uses = sorted({(u["layout"], u["dtype"]) for u in rec["uses"]})
    return f"{rec['kernel']} sm_{rec['arch']} {rec['constexprs']} on {uses}"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_wrapper_call_compiled(compiled, arch):
    want = {(layout.name, str(dtype).removeprefix("torch."), label)
            for layout, dtype, label, _ in launches.all_calls()}
    got = {(u["layout"], u["dtype"], u["label"])
           for r in compiled["configurations"] if r["arch"] == arch for u in r["uses"]}
    assert got == want
    assert {r["kernel"] for r in compiled["configurations"]} == set(REGISTER_BUDGET)


@pytest.mark.parametrize("kernel,arch", CASES, ids=CASE_IDS)
def test_no_spills_no_stack_no_local_memory(compiled, kernel, arch):
    bad = [describe(r) for r in configs(compiled, kernel, arch)
           if r["spill_stores"] or r["spill_loads"] or r["stack_bytes"] or r["local_accesses"]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("kernel,arch", CASES, ids=CASE_IDS)
def test_registers_within_budget(compiled, kernel, arch):
    budget = REGISTER_BUDGET[kernel]
    bad = [f"{r['registers']} registers: {describe(r)}" for r in configs(compiled, kernel, arch)
           if r["registers"] > budget]
    assert not bad, f"budget {budget}:\n" + "\n".join(bad)


@pytest.mark.parametrize("kernel,arch", CASES, ids=CASE_IDS)
def test_16_byte_accesses_on_aligned_rows(compiled, kernel, arch):
    checked, bad = 0, []
    for r in configs(compiled, kernel, arch):
        if not all(LAYOUTS[u["layout"]].vector_loads for u in r["uses"]):
            continue
        checked += 1
        if set(r["global_loads"]) != {"16"} or set(r["global_stores"]) != {"16"}:
            bad.append(f"loads {r['global_loads']} stores {r['global_stores']}: {describe(r)}")
    assert checked, "no configuration on rows of a multiple of 16 elements"
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("kernel,arch", CASES, ids=CASE_IDS)
def test_index_arithmetic_is_64_bit(compiled, kernel, arch):
    bad = [f"{describe(r)}:\n  " + "\n  ".join(r["int32_overflows"]) for r in configs(compiled, kernel, arch)
           if r["int32_overflows"]]
    bad += [f"{r['div_rem_s64']} 64-bit divisions: {describe(r)}" for r in configs(compiled, kernel, arch)
            if r["div_rem_s64"]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("kernel,arch", CASES, ids=CASE_IDS)
def test_no_shared_memory_round_trip(compiled, kernel, arch):
    bad = [f"{r['convert_layouts']} conversions, {r['bar_sync']} barriers: {describe(r)}"
           for r in configs(compiled, kernel, arch)
           if (r["convert_layouts"] or r["bar_sync"])
           and not all(LAYOUTS[u["layout"]].layout_conversions for u in r["uses"])]
    assert not bad, "\n".join(bad)
