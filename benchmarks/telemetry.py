"""GPU telemetry during benchmark runs: a thread polling NVML (nvidia-ml-py, imported as pynvml).

    with GpuTelemetry(interval_s=0.1) as tel:
        run_gpu_work()
    report = tel.report()     # device, clocks, memory, power: min / mean / max with units

Without a CUDA device, without nvidia-ml-py (`pip install "psb_fast[bench]"`), or when NVML does
not start, report() is {"available": False, "reason": ...} and nothing is polled.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from types import ModuleType

import torch

# quantity -> (unit, reader(pynvml, handle) -> float)
QUANTITIES = {
    "sm_clock": ("MHz", lambda nv, h: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
    "memory_clock": ("MHz", lambda nv, h: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
    "memory_used": ("MiB", lambda nv, h: nv.nvmlDeviceGetMemoryInfo(h).used / 2**20),
    "power": ("W", lambda nv, h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
    "gpu_utilization": ("%", lambda nv, h: nv.nvmlDeviceGetUtilizationRates(h).gpu),
    "temperature": ("C", lambda nv, h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
}


def _nvml_index() -> int:
    """NVML's index of torch's current CUDA device (CUDA_VISIBLE_DEVICES renumbers torch's)."""
    index = torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible) and visible[index].isdigit():
        return int(visible[index])
    return index


def open_nvml() -> tuple[ModuleType | None, object, str]:
    """(pynvml, device handle, "") when NVML can be polled, else (None, None, the reason)."""
    if not torch.cuda.is_available():
        return None, None, "no CUDA device (torch.cuda.is_available() is False)"
    try:
        import pynvml
    except ImportError:
        return None, None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(_nvml_index()), ""
    except Exception as err:  # NVMLError subclasses: no driver, no permission, ...
        return None, None, f"NVML did not start: {type(err).__name__}: {err}"


class GpuTelemetry:
    """Context manager sampling the current CUDA device every `interval_s` seconds in a thread."""

    def __init__(self, interval_s: float = 0.1) -> None:
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or interval_s <= 0:
            raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self.samples: dict[str, list[float]] = {name: [] for name in QUANTITIES}
        self.errors: dict[str, str] = {}
        self._nv, self._handle, self.reason = open_nvml()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seconds = 0.0

    @property
    def available(self) -> bool:
        return self._nv is not None

    def __enter__(self) -> GpuTelemetry:
        if self.available:
            self._start = time.perf_counter()
            self._thread = threading.Thread(target=self._poll, name="gpu-telemetry", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._seconds = time.perf_counter() - self._start
            self._nv.nvmlShutdown()

    def _poll(self) -> None:
        while True:
            self._read_once()
            if self._stop.wait(self.interval_s):
                return

    def _read_once(self) -> None:
        for name, (_, read) in QUANTITIES.items():
            if name in self.errors:
                continue
            try:
                self.samples[name].append(float(read(self._nv, self._handle)))
            except Exception as err:  # a quantity this device or driver does not report
                self.errors[name] = f"{type(err).__name__}: {err}"

    def report(self) -> dict:
        """{"available": False, "reason"} or the device, the sampling and per quantity
        {"unit", "min", "mean", "max"} (quantities the device does not report are under "unsupported")."""
        if not self.available:
            return {"available": False, "reason": self.reason}
        out: dict = {
            "available": True,
            "device": torch.cuda.get_device_name(),
            "interval": {"value": self.interval_s, "unit": "s"},
            "duration": {"value": self._seconds, "unit": "s"},
            "samples": {"value": max(len(v) for v in self.samples.values()), "unit": "samples"},
        }
        for name, (unit, _) in QUANTITIES.items():
            values = self.samples[name]
            if values:
                out[name] = {"unit": unit, "min": min(values), "mean": statistics.fmean(values),
                             "max": max(values)}
        if self.errors:
            out["unsupported"] = dict(self.errors)
        return out
