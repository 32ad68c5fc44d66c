"""One intra-op thread vs torch's default count, per size of a network call: the crossover behind
psb_fast.threads.SMALL_WORK (the automatic thread choice of train, sample, tune and the API).

    python benchmarks/bench_threads.py                 # the table, and the crossover it implies
    python benchmarks/bench_threads.py --json out.json # also the rows as JSON

Each case samples at NFE 10 (PhaseSampler, cpu backend, no grad) from B prior draws through an
untrained network: the demo's MLP (hidden 128, depth 3) on 2-D points, and the UNet of
psb_fast.models on [1, 8, 8] (digits), [1, 16, 16] (the own-data example) and [3, 32, 32]
(CIFAR-sized) images. One thread and torch's default count (one per core, or OMP_NUM_THREADS)
run in turn (interleaved medians, so load on a shared machine hits both alike). The work of a
call is counted as the elements of x per network call, B x prod(x_shape); the crossover is the
smallest size from which every larger case of that model runs at least 5 % faster on all threads.
Also printed: the cost of switching the count and back (what psb_fast.threads.intra_op_threads
adds to a call).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from psb_fast.benchmarks._timing import interleaved_medians
from psb_fast.bridge import PhaseBridge
from psb_fast.models import make_model
from psb_fast.sampler import PhaseSampler

CASES = {  # (model, x_shape, model kwargs) -> batch sizes
    ("mlp", (2,), (("hidden", 128), ("depth", 3))): (64, 256, 1024, 4096, 16384),
    ("unet", (1, 8, 8), ()): (4, 16, 64, 256),
    ("unet", (1, 16, 16), ()): (4, 16, 64),
    ("unet", (3, 32, 32), ()): (2, 8, 32),
}
QUICK = {key: batches[:3] for key, batches in CASES.items()}
FASTER = 0.95  # all threads count as faster below this ratio of times (all / one)


def sample_time(model_name: str, x_shape: tuple[int, ...], kwargs: dict, batch: int, threads: int,
                reps: int) -> tuple[float, float]:
    """Median seconds of one NFE-10 sample() call on 1 thread and on `threads`, run in turn."""
    torch.manual_seed(0)
    model = make_model(model_name, x_shape, **kwargs).eval()
    bridge = PhaseBridge()
    m0 = bridge.sample_prior((batch, *x_shape), generator=torch.Generator().manual_seed(0),
                             dtype=torch.float32)
    sampler = PhaseSampler(bridge, 10, backend="cpu")

    def run(n: int) -> None:
        torch.set_num_threads(n)
        with torch.no_grad():
            sampler.sample(model, m0)

    medians = interleaved_medians({"one": lambda: run(1), "all": lambda: run(threads)}, warmup=1, reps=reps)
    return medians["one"], medians["all"]


def switch_cost(threads: int, reps: int = 200) -> float:
    """Seconds to set the thread count to 1 and back to `threads` around a tiny op."""
    x = torch.randn(64, 64)
    tic = time.perf_counter()
    for _ in range(reps):
        torch.set_num_threads(1)
        x @ x
        torch.set_num_threads(threads)
    switched = time.perf_counter() - tic
    tic = time.perf_counter()
    for _ in range(reps):
        x @ x
    return (switched - (time.perf_counter() - tic)) / reps


def crossover(rows: list[dict]) -> dict[str, int | None]:
    """Per model case, the smallest elements per call from which all larger cases run faster on all
    threads (None: one thread was never beaten)."""
    out: dict[str, int | None] = {}
    for case in dict.fromkeys(row["case"] for row in rows):
        sizes = sorted((row["elements"], row["all_over_one"]) for row in rows if row["case"] == case)
        found = None
        for elements, ratio in reversed(sizes):
            if ratio >= FASTER:
                break
            found = elements
        out[case] = found
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the three smallest batches of each model")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per setting")
    parser.add_argument("--json", help="write the rows and crossovers to this file")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, default threads {threads}; NFE 10, interleaved medians of {args.reps}")
    if threads == 1:
        print("torch's default is one thread here (one core, or OMP_NUM_THREADS=1): nothing to compare")
        return 0
    print("| model | x_shape | B | elements per call | 1 thread (ms) | "
          f"{threads} threads (ms) | {threads} / 1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for (model_name, x_shape, kwargs), batches in (QUICK if args.quick else CASES).items():
        for batch in batches:
            one, all_ = sample_time(model_name, x_shape, dict(kwargs), batch, threads, args.reps)
            row = {"case": f"{model_name} {list(x_shape)}", "batch": batch,
                   "elements": batch * math.prod(x_shape), "one_thread_s": one, "all_threads_s": all_,
                   "all_over_one": all_ / one}
            rows.append(row)
            print(f"| {model_name} | {list(x_shape)} | {batch} | {row['elements']} | {1e3 * one:.2f} | "
                  f"{1e3 * all_:.2f} | {row['all_over_one']:.2f} |", flush=True)
    torch.set_num_threads(threads)
    cost = switch_cost(threads)
    found = crossover(rows)
    for case, elements in found.items():
        print(f"crossover {case}: " + ("one thread was never slower by 5 %" if elements is None
                                       else f"all threads faster from {elements} elements per call"))
    print(f"switching the count to 1 and back: {1e6 * cost:.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": threads, "torch": torch.__version__, "rows": rows, "crossover": found,
                       "switch_seconds": cost}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
