"""The benchmark suite behind `psb-fast bench [--quick] --out DIR` (benchmarks/README.md explains it).

    run_suite(Path("bench"), quick=True)      # or: python -m psb_fast.benchmarks.suite --quick --out bench

Parts (each runs even if another fails; a failure is recorded in results.json, not raised):
- kernels: bridge_sample, phase_step (order 2, q = 3) and the exact-noise sde_step over sizes and
  storage dtypes; eager reference, torch.compile of the reference formulation, ours ("cpu" backend
  on CPU, "triton" on CUDA); median time, GB/s from the bytes that must move, fraction of the
  measured copy bandwidth;
- sampler: samples/s vs NFE and batch, PhaseSampler vs the published-way loop (bench_throughput);
- training: steps/s, fused vs reference data path, toy and digits (bench_throughput);
- quality: NFE vs quality against peer samplers (bench_quality.run_quality);
- real_peers: diffusers and k-diffusion samplers on exact denoisers of generated test problems
  (real_peers.suite_part; real_peers.json).
On CUDA each part is wrapped in GPU telemetry (telemetry.GpuTelemetry); without a GPU the suite
says so and runs on the CPU.

Writes into DIR: results.json (machine, versions, every figure as {"value", "unit"}),
kernel_bandwidth.png (GB/s vs size per backend), sampler_throughput.png (samples/s vs NFE),
quality_vs_nfe.png, quality.json and quality_table.md (from the quality part); prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from . import bench_bridge_sample, bench_phase_step, bench_sde_step, bench_throughput
from ._timing import TABLE_HEADER, copy_bandwidth, format_row, interleaved_medians, synchronizer
from .bench_throughput import figure
from .telemetry import GpuTelemetry, open_nvml

KERNEL_OPS: dict[str, ModuleType] = {
    "bridge_sample": bench_bridge_sample,
    "phase_step q=3": bench_phase_step,
    "sde_step exact": bench_sde_step,
}
KERNEL_SIZES = {  # (device type, mode) -> elements of x per case
    ("cpu", "quick"): (10**4, 10**5, 10**6),
    ("cpu", "full"): (10**4, 10**5, 10**6, 10**7),
    ("cuda", "quick"): (10**4, 10**5, 10**6, 10**7, 10**8),
    ("cuda", "full"): (10**4, 10**5, 10**6, 10**7, 10**8),
}
KERNEL_DTYPES = {
    "quick": (torch.float32, torch.bfloat16), "full": (torch.float32, torch.bfloat16, torch.float16),
}
KERNEL_REPS = {"quick": 5, "full": 11}
COMPILE_BUDGET_S = {  # seconds of torch.compile (first calls) the kernel part may spend
    ("cpu", "quick"): 60.0, ("cpu", "full"): 600.0, ("cuda", "quick"): 90.0, ("cuda", "full"): 600.0,
}
COPY_BYTES = {"cpu": 1 << 28, "cuda": 1 << 30}
CPU_LEFT_OUT = "sizes above 1e7 elements run on CUDA only (the float64 reference needs > 10 GB and minutes)"


@dataclass(frozen=True)
class SuiteContext:
    """What every part gets: quick mode, the output folder, the device ("cpu" / "cuda"), progress bars."""

    quick: bool
    out_dir: Path
    device: str
    progress: bool

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


# ---------------------------------------------------------------- kernels


def _row(op: str, impl: str, dtype: str, device: str, numel: int, nbytes: int, seconds: float,
         copy_bw: float) -> dict:
    bw = nbytes / seconds
    return {
        "op": op, "impl": impl, "dtype": dtype, "device": device,
        "elements": figure(numel, "elements"), "bytes_moved": figure(nbytes, "B"),
        "median": figure(seconds, "s"), "bandwidth": figure(bw / 1e9, "GB/s"),
        "of_copy_bandwidth": figure(bw / copy_bw, "fraction"),
    }


@dataclass
class _Compile:
    """torch.compile bookkeeping of one (op, dtype): the compiled function (None once given up),
    seconds of first calls, sizes compiled, and why it stopped."""

    fn: Callable | None
    seconds: float = 0.0
    sizes: tuple[int, ...] = ()
    reason: str = ""

    def status(self) -> dict:
        if not self.sizes:
            return {"status": "unavailable", "reason": self.reason}
        out = {"status": "ok" if not self.reason else "partial", "first_calls": figure(self.seconds, "s"),
               "elements": [figure(n, "elements") for n in self.sizes]}
        if self.reason:
            out["reason"] = self.reason
        return out


def _first_call(comp: _Compile, case, numel: int, budget_left: float, sync: Callable[[], None]) -> bool:
    """Run case.compiled once (this compiles) unless the budget is spent; False if unusable."""
    if budget_left <= 0:
        comp.reason = (f"torch.compile budget spent before {numel:.0e} elements "
                       f"(each compile takes seconds to tens of seconds on a CPU)")
        comp.fn = None
        return False
    tic = time.perf_counter()
    try:
        case.compiled()
        sync()
    except Exception as err:  # a failed compile is not the kernels' failure: record it
        comp.reason, comp.fn = f"{type(err).__name__}: {err}", None
        return False
    finally:
        comp.seconds += time.perf_counter() - tic
    comp.sizes += (numel,)
    return True


def kernel_part(ctx: SuiteContext) -> dict:
    """Time every (op, size, dtype, impl) side by side; torch.compile first calls count against
    COMPILE_BUDGET_S, and --quick compiles the float32 cases only."""
    device, mode = ctx.device, ctx.mode
    ours = "triton" if device == "cuda" else "cpu"
    sync = synchronizer(device)
    copy_bw = copy_bandwidth(device, nbytes=COPY_BYTES[device])
    budget = COMPILE_BUDGET_S[(device, mode)]
    names = {"float64": "float64 (eager)", ours: f"ours ({ours})"}
    rows: list[dict] = []
    compiles: dict[str, _Compile] = {}
    skipped: list[dict] = []
    for op, module in KERNEL_OPS.items():
        for dtype in KERNEL_DTYPES[mode]:
            dname = str(dtype).removeprefix("torch.")
            comp = compiles[f"{op} {dname}"] = _Compile(None)
            if ctx.quick and dtype != torch.float32:
                comp.reason = "--quick compiles the float32 cases only"
            else:
                try:
                    comp.fn = torch.compile(module.reference_formulation, dynamic=True)
                except Exception as err:  # torch.compile unsupported here: record, time the rest
                    comp.reason = f"{type(err).__name__}: {err}"
            for numel in KERNEL_SIZES[(device, mode)]:
                try:
                    case = module.suite_case(numel, dtype, device, ours, comp.fn)
                    fns = {names[key]: fn for key, fn in case.fns.items()}
                    spent = sum(c.seconds for c in compiles.values())
                    if case.compiled is not None and _first_call(comp, case, numel, budget - spent, sync):
                        fns["reference (torch.compile)"] = case.compiled
                    inner = 5 if device == "cuda" else min(20, max(1, 10**6 // numel))
                    medians = interleaved_medians(fns, warmup=1, reps=KERNEL_REPS[mode], sync=sync,
                                                  inner=inner)
                except torch.cuda.OutOfMemoryError:
                    skipped.append({"op": op, "dtype": dname, "elements": figure(numel, "elements"),
                                    "reason": "out of device memory"})
                    torch.cuda.empty_cache()
                    continue
                rows += [_row(op, impl, dname, device, numel, case.bytes_moved, seconds, copy_bw)
                         for impl, seconds in medians.items()]
    result = {
        "copy_bandwidth": figure(copy_bw / 1e9, "GB/s"),
        "torch_threads": figure(torch.get_num_threads(), "threads"),
        "rows": rows, "torch_compile": {key: comp.status() for key, comp in compiles.items()},
        "compile_budget": figure(budget, "s"), "skipped": skipped,
        "x_layout": "x of shape [elements / 1000, 1000]; m = [x | v] of [elements / 1000, 2000]",
    }
    if device == "cpu":
        result["left_out"] = CPU_LEFT_OUT
    return result


# ---------------------------------------------------------------- other parts


def sampler_part(ctx: SuiteContext) -> dict:
    errors: list[dict] = []
    rows = bench_throughput.sampler_throughput(ctx.device, ctx.quick, errors=errors)
    return {"rows": rows, "unavailable": errors, "torch_threads": figure(bench_throughput.THREADS, "threads")}


def training_part(ctx: SuiteContext) -> dict:
    return {"rows": bench_throughput.training_throughput(ctx.device, ctx.quick),
            "torch_threads": figure(bench_throughput.THREADS, "threads")}


def quality_part(ctx: SuiteContext) -> dict:
    from .bench_quality import run_quality

    return run_quality(ctx.quick, ctx.out_dir, progress=ctx.progress)


def real_peers_part(ctx: SuiteContext) -> dict:
    from .real_peers import suite_part

    return suite_part(ctx.quick, ctx.out_dir, progress=ctx.progress)


PARTS: dict[str, Callable[[SuiteContext], dict]] = {
    "kernels": kernel_part, "sampler": sampler_part, "training": training_part, "quality": quality_part,
    "real_peers": real_peers_part,
}


# ---------------------------------------------------------------- machine, plots, tables


def machine_info() -> dict:
    """CPU model and cores, torch / triton / python versions, GPU name or "none"."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu, "cores": figure(os.cpu_count(), "cores"), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
        "gpu": torch.cuda.get_device_name() if cuda else "none",
        "cuda": torch.version.cuda if cuda else "none",
    }


def _log_log_panels(path: Path, panels: list[str], draw: Callable, xlabel: str, ylabel: str) -> None:
    """One log-log panel per entry of `panels`: draw(ax, panel) plots its lines and returns the
    panel's title; axes, grid, legend and the PNG at `path` are shared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(draw(ax, panel))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kernels(rows: list[dict], path: Path) -> None:
    """GB/s vs elements (log-log), one panel per op, one line per impl and dtype."""

    def draw(ax, op: str) -> str:
        lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for r in rows:
            if r["op"] == op:
                point = (r["elements"]["value"], r["bandwidth"]["value"])
                lines.setdefault((r["impl"], r["dtype"]), []).append(point)
        for (impl, dtype), points in lines.items():
            points.sort()
            style = {"float32": "-", "bfloat16": "--", "float16": ":"}.get(dtype, "-")
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3,
                    label=f"{impl}, {dtype}")
        return op

    _log_log_panels(path, list(dict.fromkeys(r["op"] for r in rows)), draw, "elements of x",
                    "achieved GB/s (bytes that must move)")


def plot_sampler(rows: list[dict], path: Path) -> None:
    """samples/s vs NFE (log-log), one panel per model, one line per impl and batch."""

    def draw(ax, model: str) -> str:
        lines: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for r in rows:
            if r["model"] == model:
                lines.setdefault((r["impl"], r["batch"]["value"]), []).append(
                    (r["nfe"]["value"], r["throughput"]["value"]))
        for (impl, batch), points in lines.items():
            points.sort()
            style = "--" if impl == "published loop" else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3,
                    label=f"{impl}, B = {batch}")
        nfes = sorted({r["nfe"]["value"] for r in rows if r["model"] == model})
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.minorticks_off()
        return f"sampler throughput, {model}"

    _log_log_panels(path, list(dict.fromkeys(r["model"] for r in rows)), draw, "NFE", "samples/s")


def kernel_table(result: dict) -> str:
    copy_bw = result["copy_bandwidth"]["value"] * 1e9
    lines = [f"copy bandwidth {result['copy_bandwidth']['value']:.1f} GB/s (read + write), "
             f"{result['torch_threads']['value']} torch threads", TABLE_HEADER]
    for r in result["rows"]:
        lines.append(format_row(r["op"], r["impl"], getattr(torch, r["dtype"]), r["elements"]["value"],
                                r["median"]["value"], r["bytes_moved"]["value"], copy_bw))
    for key, status in result["torch_compile"].items():
        if status["status"] != "ok":
            lines.append(f"torch.compile {key}: {status['status']} ({status['reason']})")
    return "\n".join(lines)


def sampler_table(result: dict) -> str:
    lines = ["| model | batch | NFE | impl | median (ms) | samples/s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['batch']['value']} | {r['nfe']['value']} | {r['impl']} | "
                     f"{r['median']['value'] * 1e3:,.2f} | {r['throughput']['value']:,.0f} |")
    for e in result.get("unavailable", []):
        lines.append(f"{e['impl']} ({e['model']}, B = {e['batch']['value']}, NFE {e['nfe']['value']}): "
                     f"unavailable ({e['error']})")
    return "\n".join(lines)


def training_table(result: dict) -> str:
    lines = ["| workload | backend | batch | steps/s | samples/s |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['workload']} ({r['data']}, {r['model']}) | {r['backend']} | "
                     f"{r['batch']['value']} | {r['steps_per_s']['value']:,.2f} | "
                     f"{r['samples_per_s']['value']:,.0f} |")
    return "\n".join(lines)


def quality_table(result: dict) -> str:
    from .bench_quality import render_table

    return render_table(result)


def real_peers_table(result: dict) -> str:
    from .real_peers import render_table

    return render_table(result)


TABLES: dict[str, Callable[[dict], str]] = {
    "kernels": kernel_table, "sampler": sampler_table, "training": training_table, "quality": quality_table,
    "real_peers": real_peers_table,
}
PLOTS: dict[str, tuple[str, Callable[[list[dict], Path], None]]] = {
    "kernels": ("kernel_bandwidth.png", plot_kernels), "sampler": ("sampler_throughput.png", plot_sampler),
}


# ---------------------------------------------------------------- the suite


def _run_part(name: str, ctx: SuiteContext) -> dict:
    """{"status": "ok", "seconds", "results"[, "telemetry"]} or {"status": "error", "error", "traceback"}."""
    print(f"== {name}", flush=True)
    tic = time.perf_counter()
    telemetry = GpuTelemetry() if ctx.device == "cuda" else None
    try:
        if telemetry is None:
            results = PARTS[name](ctx)
        else:
            with telemetry:
                results = PARTS[name](ctx)
        entry: dict = {"status": "ok", "results": results}
    except ModuleNotFoundError as err:  # an optional package of the bench extra: say which, go on
        entry = {"status": "error", "error": f"needs {err.name}, not installed: "
                                              f"pip install \"psb_fast[bench]\" (see benchmarks/README.md)"}
        print(f"{name}: skipped ({entry['error']})", flush=True)
    except Exception as err:  # one broken part must not stop the others
        entry = {"status": "error", "error": f"{type(err).__name__}: {err}",
                 "traceback": traceback.format_exc(limit=8)}
        print(f"{name}: FAILED ({entry['error']})", flush=True)
    entry["seconds"] = figure(time.perf_counter() - tic, "s")
    if telemetry is not None:
        entry["telemetry"] = telemetry.report()
    return entry


def run_suite(out_dir: Path, quick: bool = False, parts: Sequence[str] | None = None, progress: bool = True,
              device: str | None = None) -> dict:
    """Run the suite's parts into out_dir (results.json, PNG plots), print the tables, return the results.

    quick: the short settings (under 5 minutes on a 2-core CPU). parts: names in PARTS (default all,
    in order). device: "cpu" or "cuda" (default: cuda when available).
    """
    out_dir = Path(out_dir)
    parts = tuple(PARTS) if parts is None else tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"parts must be among {tuple(PARTS)}, got {unknown}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False")
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = SuiteContext(quick=quick, out_dir=out_dir, device=device, progress=progress)
    machine = machine_info()
    if device == "cpu":
        print("no GPU: running the CPU parts (GPU telemetry and CUDA-graph timings need a CUDA device)")
        reason = "no CUDA device (torch.cuda.is_available() is False)" if not torch.cuda.is_available() \
            else "the suite ran on the CPU (device='cpu')"
        telemetry: dict = {"available": False, "reason": reason}
    else:
        nvml, _, reason = open_nvml()
        if nvml is not None:
            nvml.nvmlShutdown()
        telemetry = {"available": nvml is not None,
                     "reason": reason or "sampled per part (parts.*.telemetry)"}
    print(f"machine: {machine['cpu']}, {machine['cores']['value']} cores, GPU {machine['gpu']}, "
          f"torch {machine['torch']}, triton {machine['triton']}", flush=True)
    tic = time.perf_counter()
    results: dict = {
        "command": "psb-fast bench" + (" --quick" if quick else "") + f" --out {out_dir}",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick, "device": device, "machine": machine, "telemetry": telemetry,
        "parts": {}, "plots": [],
    }
    for name in parts:
        results["parts"][name] = _run_part(name, ctx)
    for name, (filename, plot) in PLOTS.items():
        entry = results["parts"].get(name)
        if entry is not None and entry["status"] == "ok" and entry["results"]["rows"]:
            try:
                plot(entry["results"]["rows"], out_dir / filename)
                results["plots"].append(filename)
            except Exception as err:  # a plot failure must not lose the numbers
                entry["plot_error"] = f"{type(err).__name__}: {err}"
    quality = results["parts"].get("quality", {})
    if quality.get("status") == "ok" and (out_dir / "quality_vs_nfe.png").exists():
        results["plots"].append("quality_vs_nfe.png")
    results["seconds"] = figure(time.perf_counter() - tic, "s")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print_tables(results)
    print(f"suite: {results['seconds']['value']:.0f} s; wrote {out_dir / 'results.json'} and "
          f"{', '.join(results['plots']) or 'no plots'}")
    return results


def print_tables(results: dict) -> None:
    """Each part's table (or its error), in run order."""
    for name, entry in results["parts"].items():
        print(f"\n## {name} ({entry['seconds']['value']:.1f} s)")
        if entry["status"] != "ok":
            print(f"error: {entry['error']}")
            continue
        try:
            print(TABLES[name](entry["results"]))
        except Exception as err:  # an unexpected result layout (e.g. a replaced part) prints raw
            print(f"(no table: {type(err).__name__}: {err})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short suite")
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--parts", nargs="+", choices=tuple(PARTS), help="run only these parts")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    results = run_suite(args.out, quick=args.quick, parts=args.parts, device=args.device)
    return int(any(e["status"] != "ok" for e in results["parts"].values()))


if __name__ == "__main__":
    sys.exit(main())
