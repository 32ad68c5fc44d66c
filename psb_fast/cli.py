"""The `psb-fast` command line: train, sample, tune, demo, bench.

    psb-fast train --config run.toml --set steps=2000 --set data=digits [--resume]
    torchrun --nproc_per_node 2 -m psb_fast.cli train --config run.toml     # several processes
    psb-fast sample runs/toy --nfe 10 -n 1000 --out samples/
    psb-fast tune runs/toy --nfe 5 10 20 --out tuned.json
    psb-fast sample runs/toy --nfe 10 --tuned tuned.json --out samples/
    psb-fast demo --out demo/
    psb-fast bench --quick --out bench/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

GRID_CHOICES = ("tuned", "rev-quad", "uniform")


def _train(args: argparse.Namespace) -> int:
    from .config import TrainConfig, apply_overrides, load_config
    from .train import train

    cfg = load_config(args.config) if args.config else TrainConfig()
    cfg = apply_overrides(cfg, args.set)
    summary = train(cfg, resume=args.resume, progress=not args.no_progress)
    if summary["rank"] == 0:
        keys = ("step", "steps_per_s", "stopped", "checkpoint", "metrics", "eval")
        print(json.dumps({k: summary[k] for k in keys}, indent=2, default=str))
    return 0


def _sampler(trained, args: argparse.Namespace):
    from .sampler import PhaseSampler

    solver = args.solver or ("ode" if trained.bridge.mode == "probODE" else "sde")
    if args.tuned:
        return PhaseSampler.from_tuned(args.tuned, trained.bridge, args.nfe, solver=solver,
                                       backend=args.backend)
    return PhaseSampler(trained.bridge, args.nfe, T=args.T, order=args.order, grid=args.grid,
                        hop=not args.no_hop, solver=solver, backend=args.backend)


def _labels(trained, args: argparse.Namespace, n: int, device: torch.device) -> torch.Tensor | None:
    if args.label is None:
        return None
    if trained.num_classes is None:
        raise ValueError(f"--label {args.label} needs a class-conditional model; this one has no classes")
    if not 0 <= args.label < trained.num_classes:
        raise ValueError(f"--label must be in 0..{trained.num_classes - 1}, got {args.label}")
    return torch.full((n,), args.label, dtype=torch.long, device=device)


def _guide(args: argparse.Namespace):
    if args.stroke is None:
        return None
    from .guidance import StrokeGuide

    path = Path(args.stroke)
    if not path.is_file():
        raise ValueError(f"--stroke file {str(path)!r} does not exist")
    stroke = torch.from_numpy(np.load(path)).float()
    return StrokeGuide(stroke, mode=args.stroke_mode, strength=args.strength)


def _sample(args: argparse.Namespace) -> int:
    from . import plots
    from .data import load_data
    from .pretrained import load_trained

    device = torch.device(args.device)
    trained = load_trained(args.checkpoint, device=device)
    sampler = _sampler(trained, args)
    m0 = trained.prior(args.num, seed=args.seed, device=device)
    cond = _labels(trained, args, args.num, device)
    start = time.perf_counter()
    with torch.no_grad():
        x1 = sampler.sample(trained.model, m0, cond=cond, seed=args.seed, progress=True, guide=_guide(args))
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x1 = x1.float().cpu()
    np.savez(out / "samples.npz", x1=x1.numpy(), nfe=args.nfe, seconds=seconds)
    if trained.x_shape == (2,):
        data, _ = load_data(trained.config.data, split="test", seed=args.seed).all(args.num)
        plots.toy_panels(data, {f"NFE {args.nfe}": x1}, out / "samples.png")
    else:
        plots.image_grid(x1[:64], out / "samples.png")
    print(f"{sampler!r}: {args.num} samples in {seconds:.2f} s -> {out / 'samples.npz'}, "
          f"{out / 'samples.png'}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from .pretrained import load_trained
    from .tuning import save_tuned, tune

    trained = load_trained(args.checkpoint, device=args.device)
    if trained.bridge.mode != "probODE":
        raise ValueError("tune searches the probability-flow sampler; this checkpoint is an SDE model")
    m0 = trained.prior(args.num, seed=args.seed, device=args.device)
    with torch.no_grad():
        result = tune(trained.model, trained.bridge, args.nfe, m0, Ts=args.T_values, qs=args.q_values,
                      orders=args.orders, reference_nfe=args.reference_nfe)
    save_tuned(result, args.out)
    print(f"{'NFE':>4} {'T':>8} {'q':>6} {'order':>5} {'RMSE':>10} {'published':>10}")
    for nfe, r in sorted(result.items()):
        print(f"{nfe:>4} {r['T']:>8.4f} {r['q']:>6.3f} {r['order']:>5} {r['rmse']:>10.3e} "
              f"{r.get('published_rmse', float('nan')):>10.3e}")
    print(f"saved {args.out}; load with PhaseSampler.from_tuned({str(args.out)!r}, bridge, nfe)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps, progress=not args.no_progress)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .benchmarks.suite import run_suite

    run_suite(Path(args.out), quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psb-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (torchrun-aware)")
    p.add_argument("--config", help="TOML or JSON file of TrainConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_train)

    def sampling_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("checkpoint", help="checkpoint.pt of a training run, or its out_dir")
        p.add_argument("-n", "--num", type=int, default=64, help="number of samples")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu")

    p = sub.add_parser("sample", help="sample a trained checkpoint -> samples.npz and samples.png")
    sampling_args(p)
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--T", type=float, default=None, help="hop time (default: tuned)")
    p.add_argument("--order", type=int, default=None, help="multistep order 0..3 (default: tuned)")
    p.add_argument("--grid", choices=GRID_CHOICES, default=None, help="time grid (default: tuned)")
    p.add_argument("--no-hop", action="store_true", help="integrate to t = 0.999 instead of hopping")
    p.add_argument("--solver", choices=("ode", "sde", "em", "sscs"), default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--tuned", help="settings JSON from `psb-fast tune` (overrides --T/--order/--grid)")
    p.add_argument("--label", type=int, default=None, help="class label for a conditional model")
    p.add_argument("--stroke", help=".npy stroke of one data point's shape (-1 = unknown, for inpaint)")
    p.add_argument("--stroke-mode", choices=("dyn-v", "init-v", "inpaint"), default="dyn-v")
    p.add_argument("--strength", type=float, default=None, help="share of steps with a velocity redraw")
    p.add_argument("--out", default="samples")
    p.set_defaults(run=_sample)

    p = sub.add_parser("tune", help="search T / grid / order per NFE for a trained model -> JSON")
    sampling_args(p)
    p.set_defaults(num=512)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--reference-nfe", type=int, default=200, help="NFE of the model's own reference solve")
    p.add_argument("--T-values", type=float, nargs="+", default=None, help="hop times to search")
    p.add_argument("--q-values", type=float, nargs="+", default=None, help="grid orders q to search")
    p.add_argument("--orders", type=int, nargs="+", default=None, help="solver orders to search (1..3)")
    p.add_argument("--out", default="tuned.json")
    p.set_defaults(run=_tune)

    p = sub.add_parser("demo", help="train a toy model on CPU, sample at NFE 5/10/20, write figures")
    p.add_argument("--out", default="demo")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_demo)

    p = sub.add_parser("bench", help="the benchmark suite -> results.json, PNG plots, tables")
    p.add_argument("--quick", action="store_true", help="the short suite (minutes on a CPU)")
    p.add_argument("--out", default="bench")
    p.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `psb-fast`; bad input exits with status 2 and a one-line message, a
    non-finite training loss with status 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"psb-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a non-finite training loss; the last good checkpoint is kept
        print(f"psb-fast {args.command}: stopped: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
