"""Compile every launch configuration of the Triton kernels for a CUDA target, without a GPU.

    python -m psb_fast.kernels.compile_check [--arch 80 90] [--jobs 2] [--out resources.json]

The wrappers are called as in `launches.all_calls()` with `JITFunction.run` intercepted, so each
launch's arguments are specialized by Triton's own binder exactly as a real launch would be
(dtypes, i32 / i64 integers, divisibility by 16, constant 1s, pointer alignment). A stub driver
reports the target (`GPUTarget("cuda", arch, 32)`) and no CUDA driver is queried: the real
compiler runs down to a cubin with the ptxas that ships in the Triton wheel. Per distinct
specialization and architecture it records registers, spills and stack (ptxas -v), shared
memory, PTX size, global loads and stores by width, barriers, 64-bit divisions, layout
conversions, and the int32 overflow check of the TTIR (`int32_overflows`).

Must run in a process where Triton was not imported with TRITON_INTERPRET=1 (the kernels would
be interpreter functions): it is meant to be started as a subprocess (tests/test_kernel_compile.py
does that), and it removes TRITON_INTERPRET from the environment of its workers.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

ARCHS = (80, 90)

# --------------------------------------------------------------------------- TTIR int32 check

# Integer arithmetic that can wrap. Division, remainder, min / max and comparisons cannot exceed
# their operands; shifts right and bit operations are not offsets.
_WRAPPING_OPS = ("arith.addi", "arith.subi", "arith.muli", "arith.shli")
_SOURCES = ("tt.get_program_id", "tt.get_num_programs")
_I32 = re.compile(r"(?:^|[\s(,])(?:i32|tensor<[^<>]*xi32(?:,[^<>]*)?>)\s*$")
_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_ARG = re.compile(r"(%[\w.$-]+)\s*:\s*(i32|i64)\b")


def int32_overflows(ttir: str) -> list[str]:
    """TTIR lines doing 32-bit add / sub / mul / shl on a value derived from a size.

    Sizes are the kernel's integer arguments (B, n, strides, offsets, seeds, when Triton passed
    them as i32) and the program id. A value stays "derived from a size" through every op but an
    explicit `arith.trunci` (a deliberate 32-bit value: Philox counters, in-block counts bounded
    by a constant) and comparisons; arithmetic on it must be done in 64 bits (after
    `arith.extsi`), where a product of two sizes below 2**31 cannot wrap.
    """
    tainted: set[str] = set()
    found = []
    for line in ttir.splitlines():
        if line.startswith("#loc"):
            continue
        if "tt.func" in line:
            tainted.update(name for name, ty in _ARG.findall(line) if ty == "i32")
            continue
        line = line.split(" loc(")[0]
        match = _DEF.match(line)
        if not match:
            continue
        result, op, rest = match.groups()
        operands = re.findall(r"%[\w.$-]+", rest)
        if op in _SOURCES:
            tainted.add(result)
            continue
        if op in ("arith.trunci", "arith.cmpi") or op.startswith("arith.constant"):
            continue
        hit = any(o in tainted for o in operands)
        if not hit:
            continue
        tainted.add(result)
        types = rest.rsplit(" : ", 1)[-1] if " : " in rest else ""
        if op in _WRAPPING_OPS and _I32.search(types):
            found.append(line.strip())
    return found


# --------------------------------------------------------------------------- PTX / ptxas metrics

_LD = re.compile(r"\bld\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")
_ST = re.compile(r"\bst\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def _widths(pattern: re.Pattern, ptx: str, element_bits: tuple[int, ...]) -> dict[str, int]:
    """Instruction count per access width in bytes ({"16": 6, "4": 2}), for elements of these bits."""
    counts: Counter = Counter()
    for vec, bits in pattern.findall(ptx):
        if int(bits) in element_bits:
            counts[str(int(vec or 1) * int(bits) // 8)] += 1
    return dict(sorted(counts.items(), key=lambda kv: -int(kv[0])))


def ptx_metrics(ptx: str) -> dict[str, Any]:
    """Global accesses by width: tensor elements (32- and 16-bit registers: float32 or packed
    16-bit storage) apart from 64-bit ones (the bridge's float64 coefficients)."""
    body = "\n".join(line for line in ptx.splitlines() if not line.lstrip().startswith("//"))
    return {
        "ptx_bytes": len(ptx.encode()),
        "global_loads": _widths(_LD, body, (8, 16, 32)),
        "global_loads_64bit": _widths(_LD, body, (64,)),
        "global_stores": _widths(_ST, body, (8, 16, 32, 64)),
        "bar_sync": len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", body)),
        "div_rem_s64": len(re.findall(r"\b(?:div|rem)\.[su]64\b", body)),
        "local_accesses": len(re.findall(r"\b(?:ld|st)\.local\b", body)),
    }


def ptxas_metrics(log: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes from a `ptxas -v` log."""

    def grab(pattern: str) -> int:
        match = re.search(pattern, log)
        if match is None:
            raise ValueError(f"ptxas log without {pattern!r}:\n{log}")
        return int(match.group(1))

    return {
        "registers": grab(r"Used (\d+) registers"),
        "stack_bytes": grab(r"(\d+) bytes stack frame"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
    }


def run_ptxas(ptx: str, arch: int) -> str:
    """`ptxas -v` on the PTX (used when Triton did not print its own ptxas log)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
               "-o", os.path.join(tmp, "k.o")]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


# --------------------------------------------------------------------------- capture and compile


@dataclass
class Launch:
    fn: Any  # the JITFunction
    args: tuple
    kwargs: dict
    grid: Any
    layout: str
    dtype: str
    label: str

    def key(self) -> str:
        """What Triton specializes on, approximately (used to share work between processes)."""

        def one(a: Any) -> str:
            if hasattr(a, "data_ptr"):
                return f"{a.dtype}/{a.data_ptr() % 16 == 0}"
            if isinstance(a, bool) or not isinstance(a, int):
                return f"{type(a).__name__}/{a if isinstance(a, bool) else ''}"
            return f"int/{a == 1}/{a % 16 == 0}/{-(2**31) <= a < 2**31}"

        options = (f"{k}={v}" for k, v in sorted(self.kwargs.items()))
        parts = [self.fn.__name__, *map(one, self.args), *options]
        return "|".join(parts)


def capture_launches() -> list[Launch]:
    """Run every wrapper call of `launches.all_calls()`, recording each kernel launch instead."""
    from triton.runtime.jit import JITFunction

    from . import launches as launch_configs

    found: list[Launch] = []
    current: dict[str, str] = {}
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        found.append(Launch(self, args, kwargs, grid, **current))
        return None

    JITFunction.run = record
    try:
        for layout, dtype, label, call in launch_configs.all_calls():
            current.update(layout=layout.name, dtype=str(dtype).removeprefix("torch."), label=label)
            before = len(found)
            call()
            if len(found) != before + 1:
                raise RuntimeError(f"{label} on {layout.name} launched {len(found) - before} kernels, not 1")
    finally:
        JITFunction.run = original
    return found


class _StubDriver:
    """The part of a Triton driver the JIT needs to compile (not launch) for a CUDA target."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.arch = arch

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.arch  # one JIT cache per architecture

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def compile_launch(launch: Launch, arch: int):
    """The CompiledKernel for `launch` on sm_`arch` and the ptxas log printed while compiling it."""
    from triton import knobs
    from triton.runtime.driver import driver

    driver.set_active(_StubDriver(arch))
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = launch.fn.run(*launch.args, grid=launch.grid, warmup=True, **launch.kwargs)
    return kernel, log.getvalue()


def _constexprs(kernel) -> dict[str, Any]:
    src = kernel.src
    names = src.fn.arg_names
    out = {}
    for key, value in src.constants.items():
        idx = key[0] if isinstance(key, tuple) else key
        name = names[idx] if isinstance(idx, int) else str(idx)
        out[name] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return out


def _signature(kernel) -> dict[str, str]:
    return {k: str(v) for k, v in kernel.src.signature.items() if v != "constexpr"}


def measure(kernel, log: str, arch: int) -> dict[str, Any]:
    ptx = kernel.asm["ptx"]
    if "Used" not in log:
        log = run_ptxas(ptx, arch)
    ttgir = kernel.asm["ttgir"]
    return {
        **ptxas_metrics(log),
        "shared_bytes": int(kernel.metadata.shared),
        "num_warps": int(kernel.metadata.num_warps),
        **ptx_metrics(ptx),
        "convert_layouts": len(re.findall(r"ttg\.convert_layout\b", ttgir)),
        "cubin_bytes": len(kernel.asm["cubin"]),
        "int32_overflows": int32_overflows(kernel.asm["ttir"]),
    }


def worker(index: int, jobs: int, archs: tuple[int, ...]) -> list[dict[str, Any]]:
    """Compile this worker's share of the distinct launches for every arch."""
    launches = capture_launches()
    mine: dict[str, list[Launch]] = {}
    for launch in launches:
        key = launch.key()
        if int(hashlib.sha1(key.encode()).hexdigest(), 16) % jobs == index:
            mine.setdefault(key, []).append(launch)
    records = []
    for arch in archs:
        by_hash: dict[str, dict[str, Any]] = {}
        for group in mine.values():
            for launch in group:
                start = time.perf_counter()
                kernel, log = compile_launch(launch, arch)
                seconds = time.perf_counter() - start
                rec = by_hash.get(kernel.hash)
                if rec is None:
                    rec = by_hash[kernel.hash] = {
                        "kernel": launch.fn.__name__,
                        "arch": arch,
                        "constexprs": _constexprs(kernel),
                        "signature": _signature(kernel),
                        "compile_seconds": round(seconds, 3),
                        "uses": [],
                        **measure(kernel, log, arch),
                    }
                rec["uses"].append({"layout": launch.layout, "dtype": launch.dtype, "label": launch.label})
        records.extend(by_hash.values())
    return records


def run_all(archs: tuple[int, ...] = ARCHS, jobs: int = 2) -> dict[str, Any]:
    """Compile everything in `jobs` fresh worker processes (own Triton cache, no interpreter)."""
    import triton

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(jobs):
            out = os.path.join(tmp, f"worker{i}.json")
            log = open(os.path.join(tmp, f"worker{i}.log"), "w+")  # closed below
            wenv = dict(env, TRITON_CACHE_DIR=os.path.join(tmp, f"cache{i}"))
            cmd = [sys.executable, "-m", "psb_fast.kernels.compile_check",
                   "--worker", str(i), str(jobs), "--arch", *map(str, archs), "--out", out]
            procs.append((subprocess.Popen(cmd, env=wenv, stdout=log, stderr=subprocess.STDOUT), out, log))
        records = []
        for proc, out, log in procs:
            proc.wait()
            log.seek(0)
            text = log.read()
            log.close()
            if proc.returncode != 0:
                raise RuntimeError(f"compile worker failed (exit {proc.returncode}):\n{text[-8000:]}")
            with open(out) as f:
                records.extend(json.load(f))
    records.sort(key=lambda r: (r["kernel"], r["arch"], json.dumps(r["constexprs"], sort_keys=True),
                                json.dumps(r["signature"], sort_keys=True)))
    return {
        "triton": triton.__version__,
        "archs": list(archs),
        "seconds": round(time.perf_counter() - start, 1),
        "configurations": records,
    }


def variant(rec: dict[str, Any]) -> str:
    """The kernel and its noise source, e.g. "_bridge_sample_kernel (drawn noise)"."""
    ce = rec["constexprs"]
    if "DRAW" in ce:
        return f"{rec['kernel']} ({'drawn' if ce['DRAW'] else 'given'} noise)"
    if "NOISE" in ce:
        return f"{rec['kernel']} ({('no', 'drawn', 'given')[ce['NOISE']]} noise)"
    return rec["kernel"]


def _layouts(rec: dict[str, Any]) -> set[str]:
    return set(rec["layouts"]) if "layouts" in rec else {u["layout"] for u in rec["uses"]}


def summary(result: dict[str, Any], layout: str | None = None) -> dict[str, dict[str, Any]]:
    """Per kernel variant and arch: configurations, register range, worst spills / stack / shared
    memory / barriers / 64-bit divisions, PTX size range, configurations with an int32 overflow
    or a layout conversion; only configurations launched on `layout` if given."""
    out: dict[str, dict[str, Any]] = {}
    for r in result["configurations"]:
        if layout is not None and layout not in _layouts(r):
            continue
        s = out.setdefault(f"{variant(r)} sm_{r['arch']}", {
            "configurations": 0, "registers": [10**9, 0], "spill_bytes": 0, "stack_bytes": 0,
            "shared_bytes": 0, "ptx_kb": [10**9, 0], "bar_sync": 0, "div_rem_s64": 0,
            "int32_overflow_configs": 0, "conversion_configs": 0, "load_widths": set(), "store_widths": set(),
        })
        s["configurations"] += 1
        s["registers"] = [min(s["registers"][0], r["registers"]), max(s["registers"][1], r["registers"])]
        kb = round(r["ptx_bytes"] / 1024)
        s["ptx_kb"] = [min(s["ptx_kb"][0], kb), max(s["ptx_kb"][1], kb)]
        s["spill_bytes"] = max(s["spill_bytes"], r["spill_stores"] + r["spill_loads"])
        for k in ("stack_bytes", "shared_bytes", "bar_sync", "div_rem_s64"):
            s[k] = max(s[k], r[k])
        s["int32_overflow_configs"] += bool(r["int32_overflows"])
        s["conversion_configs"] += bool(r["convert_layouts"])
        s["load_widths"].update(r["global_loads"])
        s["store_widths"].update(r["global_stores"])
    return dict(sorted(out.items()))


TABLE_HEADER = (
    "| record | kernel | arch | configs | registers | spill B | stack B | shared B | PTX KB | bar.sync "
    "| div/rem.s64 | int32-overflow configs | layout-conversion configs | load / store widths B |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def widths(found: set[str]) -> str:
    return ",".join(sorted(found, key=int)) or "-"


def table(records: dict[str, dict[str, Any]], layout: str | None = None) -> str:
    """Markdown table of `summary` for several records ({label: result})."""
    lines = [TABLE_HEADER]
    for label, result in records.items():
        for name, s in summary(result, layout).items():
            kernel, arch = name.rsplit(" sm_", 1)
            lines.append(
                f"| {label} | {kernel} | sm_{arch} | {s['configurations']} | "
                f"{s['registers'][0]}-{s['registers'][1]} | {s['spill_bytes']} | {s['stack_bytes']} | "
                f"{s['shared_bytes']} | {s['ptx_kb'][0]}-{s['ptx_kb'][1]} | {s['bar_sync']} | "
                f"{s['div_rem_s64']} | {s['int32_overflow_configs']} | {s['conversion_configs']} | "
                f"{widths(s['load_widths'])} / {widths(s['store_widths'])} |"
            )
    return "\n".join(lines)


def compact(result: dict[str, Any]) -> dict[str, Any]:
    """The record with each configuration's uses folded to layouts, dtypes and call labels, its
    signature to the argument types in order, and no compile time."""
    out = dict(result)
    out["configurations"] = []
    for r in result["configurations"]:
        r = dict(r)
        uses = r.pop("uses")
        r.pop("compile_seconds", None)
        r["signature"] = ",".join(r["signature"].values())
        r["layouts"] = sorted({u["layout"] for u in uses})
        r["dtypes"] = sorted({u["dtype"] for u in uses})
        r["calls"] = sorted({u["label"] for u in uses})
        out["configurations"].append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", help="write the full record here (JSON)")
    parser.add_argument("--compact", action="store_true", help="fold each configuration's uses in --out")
    parser.add_argument("--table", nargs="+", metavar="LABEL=FILE",
                        help="print the markdown summary of recorded runs and exit")
    parser.add_argument("--layout", help="with --table: only configurations launched on this layout")
    parser.add_argument("--worker", type=int, nargs=2, metavar=("INDEX", "JOBS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table:
        records = {}
        for item in args.table:
            label, _, path = item.rpartition("=")
            with open(path) as f:
                records[label or path] = json.load(f)
        print(table(records, args.layout))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run with TRITON_INTERPRET unset: the kernels must be compiled, not interpreted")
    if args.worker:
        records = worker(args.worker[0], args.worker[1], tuple(args.arch))
        with open(args.out, "w") as f:
            json.dump(records, f)
        return 0
    result = run_all(tuple(args.arch), args.jobs)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(compact(result) if args.compact else result, f, indent=None if args.compact else 1)
            f.write("\n")
    count = len(result["configurations"])
    print(f"triton {result['triton']}: {count} configurations in {result['seconds']} s")
    print(table({f"triton {result['triton']}": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
