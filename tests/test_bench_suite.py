"""The benchmark suite's pieces at tiny sizes: results.json schema and units, telemetry without a GPU,
a failing part recorded rather than raised. (The real `psb-fast bench --quick` is not run here.)"""

from __future__ import annotations

import json
import sys
import time
import types

import pytest
import torch

from psb_fast.benchmarks import bench_sampler, bench_throughput, suite, telemetry
from psb_fast.benchmarks._timing import sweep_shape

torch.set_num_threads(1)


def numbers_without_unit(obj: object, path: str = "") -> list[str]:
    """Paths of int / float leaves that do not sit in a dict carrying a "unit" key."""
    found: list[str] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if "unit" not in obj:
                    found.append(f"{path}.{key}")
            else:
                found += numbers_without_unit(value, f"{path}.{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found.append(f"{path}[{i}]")
            else:
                found += numbers_without_unit(value, f"{path}[{i}]")
    return found


def test_unit_checker_flags_bare_numbers() -> None:
    found = numbers_without_unit({"a": {"value": 1.0, "unit": "s"}, "b": [{"x": 2}], "c": 3})
    assert found == [".b[0].x", ".c"]


@pytest.fixture
def tiny_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(suite.KERNEL_SIZES, ("cpu", "quick"), (1000, 2000))
    monkeypatch.setitem(suite.KERNEL_DTYPES, "quick", (torch.float32,))
    monkeypatch.setitem(suite.KERNEL_REPS, "quick", 2)
    monkeypatch.setitem(suite.COMPILE_BUDGET_S, ("cpu", "quick"), 0.0)
    monkeypatch.setitem(suite.COPY_BYTES, "cpu", 1 << 20)


@pytest.mark.slow
def test_kernel_part_results_json(tmp_path, tiny_kernels, capsys) -> None:
    results = suite.run_suite(tmp_path, quick=True, parts=("kernels",), progress=False, device="cpu")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["parts"]["kernels"]["status"] == "ok"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    assert saved["machine"]["gpu"] == gpu
    for key in ("cpu", "cores", "python", "torch", "triton"):
        assert saved["machine"][key]
    assert numbers_without_unit(saved) == []
    rows = saved["parts"]["kernels"]["results"]["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {
        (op, impl) for op in suite.KERNEL_OPS for impl in ("float64 (eager)", "ours (cpu)")}
    assert sorted({r["elements"]["value"] for r in rows}) == [1000, 2000]
    bridge = [r for r in rows if r["op"] == "bridge_sample" and r["elements"]["value"] == 1000]
    for r in bridge:  # read x1, write x_t, v_t, label: 16 B per float32 element
        assert r["bytes_moved"] == {"value": 16 * 1000, "unit": "B"}
        assert r["bandwidth"]["unit"] == "GB/s"
        assert r["bandwidth"]["value"] == pytest.approx(16e3 / r["median"]["value"] / 1e9)
    compiled = saved["parts"]["kernels"]["results"]["torch_compile"]
    assert all(s["status"] == "unavailable" and "budget" in s["reason"] for s in compiled.values())
    assert "kernel_bandwidth.png" in saved["plots"] and (tmp_path / "kernel_bandwidth.png").stat().st_size > 0
    assert results["parts"]["kernels"]["results"]["rows"] == rows
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "no GPU" in out
        assert saved["telemetry"]["available"] is False and saved["telemetry"]["reason"]
    assert "| bridge_sample | ours (cpu) | float32 | 1,000 |" in out


def test_failing_part_is_recorded_not_raised(tmp_path, monkeypatch) -> None:
    def broken(ctx: suite.SuiteContext) -> dict:
        raise RuntimeError("deliberate failure")

    def fine(ctx: suite.SuiteContext) -> dict:
        return {"rows": [], "answer": bench_throughput.figure(42, "units")}

    monkeypatch.setattr(suite, "PARTS", {"broken": broken, "fine": fine})
    results = suite.run_suite(tmp_path, quick=True, progress=False, device="cpu")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert results["parts"]["broken"]["status"] == "error"
    assert saved["parts"]["broken"]["error"] == "RuntimeError: deliberate failure"
    assert "deliberate failure" in saved["parts"]["broken"]["traceback"]
    assert saved["parts"]["fine"]["status"] == "ok"
    assert saved["parts"]["fine"]["results"] == {"rows": [], "answer": {"value": 42, "unit": "units"}}
    assert saved["parts"]["fine"]["seconds"]["unit"] == "s"
    assert list(saved["parts"]) == ["broken", "fine"]


def test_run_suite_rejects_unknown_part(tmp_path) -> None:
    with pytest.raises(ValueError, match="parts must be among"):
        suite.run_suite(tmp_path, parts=("kernels", "nope"))


@pytest.mark.slow
def test_sampler_and_training_rows(monkeypatch) -> None:
    monkeypatch.setitem(bench_throughput.SAMPLER_SETTINGS, "quick", {"mlp-2d": ((8,), (2,))})
    monkeypatch.setitem(bench_throughput.TRAIN_SETTINGS, "quick", {"toy": ("gmm-grid", "mlp", 16, 2)})
    rows = bench_throughput.sampler_throughput("cpu", quick=True, reps=1)
    assert {r["impl"] for r in rows} == {"PhaseSampler", "published loop"}
    for r in rows:
        assert r["throughput"]["unit"] == "samples/s"
        assert r["throughput"]["value"] == pytest.approx(8 / r["median"]["value"])
    train_rows = bench_throughput.training_throughput("cpu", quick=True)
    assert [r["backend"] for r in train_rows] == ["cpu", "float64"]
    for r in train_rows:
        assert r["steps_per_s"]["unit"] == "steps/s" and r["steps_per_s"]["value"] > 0
        assert r["samples_per_s"]["value"] == pytest.approx(16 * r["steps_per_s"]["value"])
    assert numbers_without_unit({"rows": rows + train_rows}) == []


def test_failed_graph_capture_is_recorded() -> None:
    bridge = bench_throughput.PhaseBridge()
    m0 = bridge.sample_prior((4, 2), generator=torch.Generator().manual_seed(0))  # CPU: capture must fail
    errors: list[dict] = []
    where = {"model": "mlp-2d", "batch": bench_throughput.figure(4, "samples")}
    model = bench_throughput.SAMPLER_MODELS["mlp-2d"].build()
    assert bench_throughput._graph_fn(bridge, model, m0, 3, 0.4, where, errors) is None
    assert len(errors) == 1 and errors[0]["impl"] == "PhaseSampler + CUDA graph"
    assert errors[0]["model"] == "mlp-2d" and "CUDA" in errors[0]["error"]


def test_telemetry_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with telemetry.GpuTelemetry() as tel:
        pass
    reason = "no CUDA device (torch.cuda.is_available() is False)"
    assert tel.report() == {"available": False, "reason": reason}


def test_telemetry_without_nvml_package(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    report = telemetry.GpuTelemetry().report()
    assert report["available"] is False and "nvidia-ml-py" in report["reason"]


def fake_pynvml() -> types.ModuleType:
    nv = types.ModuleType("pynvml")
    nv.NVML_CLOCK_SM, nv.NVML_CLOCK_MEM, nv.NVML_TEMPERATURE_GPU = 0, 1, 0
    nv.nvmlInit = nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetHandleByIndex = lambda i: f"handle{i}"
    nv.nvmlDeviceGetClockInfo = lambda h, kind: 1980.0 if kind == 0 else 2619.0
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 * 2**30)
    nv.nvmlDeviceGetPowerUsage = lambda h: 250_000  # mW
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=97)

    def no_sensor(h, kind):
        raise RuntimeError("not supported")

    nv.nvmlDeviceGetTemperature = no_sensor
    return nv


def test_telemetry_polls_in_a_thread(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    with telemetry.GpuTelemetry(interval_s=0.01) as tel:
        deadline = time.monotonic() + 10
        while len(tel.samples["power"]) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    report = tel.report()
    assert report["available"] is True and report["device"] == "Fake GPU"
    assert report["power"] == {"unit": "W", "min": 250.0, "mean": 250.0, "max": 250.0}
    assert report["memory_used"]["unit"] == "MiB" and report["memory_used"]["max"] == 3072.0
    assert report["sm_clock"]["mean"] == 1980.0 and report["memory_clock"]["mean"] == 2619.0
    assert "temperature" not in report and "not supported" in report["unsupported"]["temperature"]
    assert report["samples"]["value"] >= 3
    assert numbers_without_unit({k: v for k, v in report.items() if k != "unsupported"}) == []


def test_telemetry_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        telemetry.GpuTelemetry(interval_s=0)


def test_sweep_shape() -> None:
    assert sweep_shape(10**6) == (1000, 1000)
    with pytest.raises(ValueError, match="numel"):
        sweep_shape(1500)


def test_bench_sampler_overhead_table_at_tiny_sizes(monkeypatch) -> None:
    """bench_sampler's overhead table: the lean loop and PhaseSampler agree (the table asserts it)
    and each row has its columns (no peer library here)."""
    monkeypatch.setattr(bench_sampler, "LEAN_SHAPES", ((8, 2), (4, 6, 2, 2)))
    monkeypatch.setattr(bench_sampler, "peer_loop", lambda nfe: None)
    rows = bench_sampler.overhead_table(nfe=4, reps=1)
    assert [row["shape"] for row in rows] == [[8, 2], [4, 6, 2, 2]]
    for row in rows:
        assert row["lean_ms"] > 0 and row["phase_sampler_ms"] > 0 and row["peer_ms"] is None
        assert row["ratio"] == pytest.approx(row["phase_sampler_ms"] / row["lean_ms"])
        assert row["corrector_ratio"] == pytest.approx(row["corrector_ms"] / row["lean_ms"])
