"""The `psb-fast` command line: train, sample, tune, demo, bench.

    psb-fast train --config run.toml --set steps=2000 --set data=digits [--resume]
    torchrun --nproc_per_node 2 -m psb_fast.cli train --config run.toml     # several processes
    psb-fast sample runs/toy --nfe 10 -n 1000 --out samples/
    psb-fast tune runs/toy --nfe 5 10 20 --out tuned.json
    psb-fast sample runs/toy --nfe 10 --tuned tuned.json --out samples/
    psb-fast demo --out demo/
    psb-fast bench --quick --out bench/
    psb-fast eval runs/toy --bpd --out eval/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .config import default_config_toml, keys_help
from .grids import GRID_NAMES, parse_grid
from .settings import VARIANTS

GRID_CHOICES = GRID_NAMES
DEFAULT_CHUNK = 1000  # samples per shard of `psb-fast sample` (psb_fast.sharded)
TUNE_SEED = 2  # `psb-fast tune`'s default seed: the demo's tuning draws (psb_fast.demo.TUNE_SEED)
MAX_NFE = 10_000  # the largest NFE sample and tune accept (psb_fast.sampler.MAX_NFE)
log = logging.getLogger("psb_fast")


EXIT_OK = 0
EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_IO = 4
EXIT_SIGNAL = 128
"""Exit status of `psb-fast`, returned by main() for every command (3 and 128 + N come from train):

    ====  ================  ==================================================================
    code  constant          meaning
    ====  ================  ==================================================================
    0     EXIT_OK           finished
    1     EXIT_BUG          unexpected internal error (a bug): Python prints the traceback
    2     EXIT_BAD_INPUT    bad input: config / option / file errors (ValueError, TypeError,
                            FileNotFoundError; argparse usage errors too), one line on stderr
    3     EXIT_NONFINITE    non-finite loss or weights: training stopped, one line naming the
                            last good checkpoint and its step (or saying none exists)
    4     EXIT_IO           I/O failure (OSError other than FileNotFoundError: disk full,
                            read-only folder, ...), one line naming the path
    130   EXIT_SIGNAL + 2   train stopped by SIGINT after writing the checkpoint of that step, or
                            any command interrupted (Ctrl-C) before that: one line on stderr
    143   EXIT_SIGNAL + 15  train stopped by SIGTERM after writing the checkpoint of that step
    ====  ================  ==================================================================
"""


def _train(args: argparse.Namespace) -> int:
    """Train per --config / --set [--resume]; EXIT_OK, or EXIT_SIGNAL + the signal number when a
    SIGINT / SIGTERM stopped the run (after its checkpoint was written)."""
    import signal

    from .config import TrainConfig, apply_overrides, load_config
    from .train import train

    cfg = load_config(args.config) if args.config else TrainConfig()
    cfg = apply_overrides(cfg, args.set)
    summary = train(cfg, resume=args.resume, progress=not args.no_progress)
    if summary["rank"] == 0:
        keys = ("step", "steps_per_s", "stopped", "checkpoint", "metrics", "eval")
        print(json.dumps({k: summary[k] for k in keys}, indent=2, default=str))
    if summary["stopped"] in ("SIGINT", "SIGTERM"):
        if summary["rank"] == 0:
            print(f"psb-fast train: stopped by {summary['stopped']} at step {summary['step']}; checkpoint "
                  f"{summary['checkpoint']} written (continue with --resume)", file=sys.stderr)
        return EXIT_SIGNAL + signal.Signals[summary["stopped"]].value
    return EXIT_OK


def _sampler(trained, args: argparse.Namespace):
    from .sampler import PhaseSampler, setting_from_fields

    solver = args.solver or ("ode" if trained.bridge.mode == "probODE" else "sde")
    if args.tuned and not Path(args.tuned).is_file():
        raise ValueError(f"--tuned file {args.tuned!r} does not exist (expected a JSON from `psb-fast tune`)")
    if args.tuned:
        return PhaseSampler.from_tuned(args.tuned, trained.bridge, args.nfe, solver=solver,
                                       backend=args.backend)
    setting = setting_from_fields(args.nfe, solver=solver, hop=not args.no_hop, T=args.T, order=args.order,
                                  grid=args.grid, variant=args.variant)
    return PhaseSampler(trained.bridge, args.nfe, setting, hop=not args.no_hop, solver=solver,
                        backend=args.backend)


def _labels(trained, args: argparse.Namespace, n: int, device: torch.device) -> torch.Tensor | None:
    if args.label is None:
        return None
    if trained.num_classes is None:
        raise ValueError(f"--label {args.label} needs a class-conditional model; this one has no classes")
    if not 0 <= args.label < trained.num_classes:
        raise ValueError(f"--label must be in 0..{trained.num_classes - 1}, got {args.label}")
    return torch.full((n,), args.label, dtype=torch.long, device=device)


def _guide(args: argparse.Namespace):
    """The StrokeGuide of --stroke/--stroke-mode/--strength (None without --stroke); the two options
    are refused without a stroke, and --strength with init-v (which has no redraw steps)."""
    if args.stroke is None:
        for flag, value in (("--stroke-mode", args.stroke_mode), ("--strength", args.strength)):
            if value is not None:
                raise ValueError(f"{flag} {value} needs --stroke FILE.npy (it configures stroke guidance, "
                                 f"which is off without a stroke)")
        return None
    from .guidance import StrokeGuide

    mode = args.stroke_mode or "dyn-v"
    if args.strength is not None:
        if mode == "init-v":
            raise ValueError(f"--strength {args.strength} does not apply to --stroke-mode init-v (it mixes "
                             f"the initial velocity once, with no redraw steps); leave --strength out")
        if not 0.0 <= args.strength <= 1.0:
            raise ValueError(f"--strength must be in [0, 1] (the share of steps with a velocity redraw), "
                             f"got {args.strength}")
    return StrokeGuide(_stroke(Path(args.stroke)), mode=mode, strength=args.strength)


def _stroke(path: Path) -> torch.Tensor:
    """The --stroke .npy file as a float32 tensor (numeric arrays only, no pickles)."""
    if not path.is_file():
        raise ValueError(f"--stroke file {str(path)!r} does not exist")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"--stroke file {str(path)!r} is not a readable .npy array "
                         f"({err or type(err).__name__})") from err
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        got = array.dtype if isinstance(array, np.ndarray) else "an .npz archive"
        raise ValueError(f"--stroke file {str(path)!r} must hold a numeric .npy array, got {got}")
    return torch.from_numpy(array.astype(np.float32))


def _grid(text: str) -> str:
    """--grid's value: one of GRID_CHOICES, power-<q> with a number q > 0 (psb_fast.grids.parse_grid)."""
    try:
        parse_grid(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(GRID_CHOICES)} (q a number > 0), "
                                         f"got {text!r}") from None
    return text


def _threads(value: int, elements: int, device: torch.device) -> int:
    """--threads: torch's CPU threads for this command's network calls on `elements` elements of x
    (0: psb_fast.threads' automatic choice)."""
    from .threads import choose_threads

    if value < 0:
        raise ValueError(f"--threads must be >= 0 (0: automatic, one thread for small calls), got {value}")
    return choose_threads(value, elements, device)


def _nfes(flag: str, values: Sequence[int]) -> None:
    """NFE option values, each in [1, MAX_NFE] (what PhaseSampler accepts)."""
    for nfe in values:
        if not 1 <= nfe <= MAX_NFE:
            raise ValueError(f"{flag} must be in [1, {MAX_NFE}] (network evaluations per sample), got {nfe}")


def _count(flag: str, value: int) -> int:
    """A sample count option, checked >= 1."""
    if value < 1:
        raise ValueError(f"{flag} must be a positive number of samples, got {value}")
    return value


def _sample(args: argparse.Namespace) -> int:
    """Sample N from a checkpoint in chunks (psb_fast.sharded): under torchrun the chunks are
    spread over the ranks; a rerun of an interrupted command resumes from the finished shards."""
    from . import plots
    from .data import load_data
    from .distributed import distributed_env, init_group, resolve_device
    from .pretrained import load_trained
    from .sharded import ShardPlan, sample_sharded, save_samples
    from .threads import intra_op_threads, work_elements

    _count("-n/--num", args.num)
    _count("--chunk", args.chunk)
    _nfes("--nfe", [args.nfe])
    _threads(args.threads, 0, torch.device("cpu"))  # checks the value; the count is chosen below
    rank, world_size, local_rank = distributed_env()
    device = resolve_device(args.device, "--device", local_rank if world_size > 1 else None)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} is an existing file; expected a folder (created if missing) "
                         f"for samples.npz and samples.png")
    guide = _guide(args)
    trained = load_trained(args.checkpoint, device=device)
    sampler = _sampler(trained, args)
    _labels(trained, args, 1, device)  # checks --label
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:  # a file on the way; other OSErrors are I/O
        raise ValueError(f"--out {args.out!r}: cannot create the folder, a file is in the way "
                         f"({err})") from err
    plan = ShardPlan(n=args.num, chunk=args.chunk, seed=args.seed, x_shape=trained.x_shape)
    init_group(device, world_size)
    threads = _threads(args.threads, work_elements(min(args.chunk, args.num), trained.x_shape), device)
    with intra_op_threads(threads):
        x1, seconds = sample_sharded(trained.model, sampler, plan, out, device=device, cond_label=args.label,
                                     guide=guide, progress=not args.no_progress, rank=rank,
                                     world_size=world_size)
    if rank != 0:
        return 0
    save_samples(out / "samples.npz", x1=x1, nfe=args.nfe, seconds=seconds, seed=args.seed, chunk=args.chunk)
    x1 = torch.from_numpy(x1)
    title = plots.sampler_label(sampler) + ("" if args.label is None else f", label {args.label}")
    if trained.x_shape == (2,):
        data, _ = load_data(trained.config.data, split="test", seed=args.seed).all(args.num)
        plots.toy_panels(data, {title: x1}, out / "samples.png",
                         title=f"{args.num} samples of {args.checkpoint} (step {trained.step})")
    elif len(trained.x_shape) == 3 and trained.x_shape[0] in (1, 3):
        plots.image_grid(x1[:64], out / "samples.png", title=f"{title}: {min(64, args.num)} of {args.num}")
    log.info(f"{sampler!r}: {args.num} samples on {world_size} rank(s), {threads} thread(s), {seconds:.2f} s "
             f"sampling in this call -> {out / 'samples.npz'}, {out / 'samples.png'}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from .distributed import resolve_device
    from .pretrained import load_trained
    from .threads import intra_op_threads, work_elements
    from .tuning import Search, save_tuned, tune

    _count("-n/--num", args.num)
    _nfes("--nfe", args.nfe)
    _nfes("--reference-nfe", [args.reference_nfe])
    _threads(args.threads, 0, torch.device("cpu"))  # checks the value; the count is chosen below
    device = resolve_device(args.device, "--device")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {args.out!r} is a folder; expected the path of the JSON file to write")
    if not out.parent.is_dir():
        raise ValueError(f"--out {args.out!r}: its folder {str(out.parent)!r} does not exist")
    trained = load_trained(args.checkpoint, device=device)
    if trained.bridge.mode != "probODE":
        raise ValueError("tune searches the probability-flow sampler; this checkpoint is an SDE model")
    m0 = trained.prior(args.num, seed=args.seed, device=device)
    threads = _threads(args.threads, work_elements(args.num, trained.x_shape), device)
    with torch.no_grad(), intra_op_threads(threads):
        chosen = {"Ts": args.T_values, "qs": args.q_values, "orders": args.orders, "variants": args.variants}
        search = Search(**{k: v for k, v in chosen.items() if v is not None}, refine=not args.no_refine)
        result = tune(trained.model, trained.bridge, args.nfe, m0, search, reference_nfe=args.reference_nfe,
                      progress=not args.no_progress, learn=args.learn)
    save_tuned(result, args.out)
    print(f"{'NFE':>4} {'T':>8} {'q':>6} {'order':>5} {'variant':>20} {'RMSE':>10} {'defaults':>10} "
          f"{'published':>10}")
    for nfe, r in sorted(result.items()):
        print(f"{nfe:>4} {r['T']:>8.4f} {r['q']:>6.3f} {r['order']:>5} {r.get('variant', 'multistep'):>20} "
              f"{r['rmse']:>10.3e} {r['default_rmse']:>10.3e} {r['published_rmse']:>10.3e}")
    with torch.no_grad(), intra_op_threads(threads):
        _tune_quality(trained, result, args.num, args.seed + 1, device)
    log.info(f"saved {args.out} ({threads} thread(s)); load with PhaseSampler.from_tuned({str(args.out)!r}, "
             f"bridge, nfe)")
    return 0


def _tune_quality(trained, result: dict, num: int, seed: int, device: torch.device) -> None:
    """The tune report's distribution table: every compared setting (`tuning.compared_settings`) on
    `num` fresh prior draws (`seed`) against held-out data of the run (`metrics.held_out_halves`),
    with the data-vs-data floor; one line instead where the run's data has no held-out split or no
    longer loads (the tuned file is saved by then)."""
    from .metrics import distribution_quality, held_out_halves, median_bandwidth
    from .tuning import compared_settings, run_settings

    try:
        halves = held_out_halves(trained.config.data, num)
    except (ValueError, TypeError, OSError) as e:  # the run's data moved or changed since training
        print(f"distribution quality: not measured (the run's data {trained.config.data!r} did not load: "
              f"{e})")
        return
    if halves is None:
        print(f"distribution quality: not measured ({trained.config.data!r} has no held-out split)")
        return
    data, other = halves
    h = median_bandwidth(data)
    floor = distribution_quality(other, data, h)
    m0 = trained.prior(num, seed=seed, device=device)
    print(f"distribution quality on {num} fresh prior draws (seed {seed}) vs {len(data)} held-out points of "
          f"{trained.config.data}; data vs data (the other {len(other)}): SW2 {floor['sw2']:.4f}, MMD "
          f"{floor['mmd']:.4f}\n{'NFE':>4} {'settings':<10} {'SW2':>8} {'MMD':>8}")
    for nfe, entry in sorted(result.items()):
        named = compared_settings(entry, nfe)
        outs = run_settings(trained.model, trained.bridge, m0, nfe, list(named.values()))
        kept = "learned" if entry.get("learn", {}).get("kept") == "learned" else "tuned"
        for name, x1 in zip(named, outs, strict=True):
            quality = distribution_quality(x1, data, h)
            label = name + ("*" if name == kept else "")
            print(f"{nfe:>4} {label:<10} {quality['sw2']:>8.4f} {quality['mmd']:>8.4f}")
    print("* the setting saved in the tuned file")


def _config(args: argparse.Namespace) -> int:
    print(default_config_toml(), end="")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps, progress=not args.no_progress, learn=not args.no_learn)
    return 0


def _eval(args: argparse.Namespace) -> int:
    """--bpd: bits/dim of the checkpoint's model on held-out data (psb_fast.likelihood), resumable."""
    from .likelihood import evaluate_run

    if not args.bpd:
        raise ValueError("eval needs a metric: pass --bpd (bits/dim through the probability flow)")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = {-1: "auto", 0: None}.get(args.levels, args.levels)
    s = evaluate_run(args.checkpoint, Path(args.out), split=args.split, n=args.num, batch=args.batch,
                     seed=args.seed, T_end=args.T_end, rtol=args.rtol, atol=args.atol,
                     exact_dims=args.exact_dims, probes=args.probes, levels=levels, device=args.device,
                     progress=not args.no_progress)
    print(f"{s['bpd']:.4f} +- {s['bpd_stderr']:.4f} bits/dim ({s['nll']:.4f} nats per sample) on {s['n']} "
          f"points of {s['plan']['source']}; NFE {s['nfe_mean']:.0f} per batch, {s['seconds']:.1f} s "
          f"-> {Path(args.out) / 'bpd.json'}")
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from .benchmarks.suite import run_suite

    run_suite(Path(args.out), quick=args.quick)
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends each option's default to its help (unless the help already says it, or the default
    is None / False) and keeps the epilog's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "(default" in text or hidden or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psb-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = partial(sub.add_parser, formatter_class=_HelpFormatter)

    p = sub.add_parser("train", help="train a model (torchrun-aware)",
                       epilog="config keys (default, meaning); `psb-fast config` prints them as TOML:\n"
                              + keys_help())
    p.add_argument("--config", help="TOML or JSON file of config keys (default: every key's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable): --set steps=2000 --set model_kwargs.hidden=256")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_train)

    p = sub.add_parser("config", help="print every training config key with its default and meaning (TOML)")
    p.set_defaults(run=_config)

    def sampling_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("checkpoint", help="checkpoint.pt of a training run, or its out_dir")
        p.add_argument("-n", "--num", type=int, default=64, help="number of samples (prior draws)")
        p.add_argument("--seed", type=int, default=0, help="seed of the prior draws (and SDE noise)")
        p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N")
        p.add_argument("--threads", type=int, default=0,
                       help="CPU threads of torch; 0: automatic, one thread when a network call holds fewer "
                            "than psb_fast.threads.SMALL_WORK elements of x, else torch's default")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("sample", help="sample a trained checkpoint -> samples.npz and samples.png")
    sampling_args(p)
    p.add_argument("--nfe", type=int, default=10, help="network evaluations")
    p.add_argument("--T", type=float, default=None, help="hop time (default: tuned)")
    p.add_argument("--order", type=int, default=None, help="multistep order 0..3 (default: tuned)")
    p.add_argument("--grid", type=_grid, default=None, metavar="|".join(GRID_CHOICES),
                   help="time grid: tuned, the published rev-quad (power 2), uniform, or power-<q> for any "
                        "q > 0, e.g. power-1.5 (default: the tuned defaults)")
    p.add_argument("--variant", choices=VARIANTS, default=None,
                   help="ode solver variant (default: the tuned defaults' with none of --T/--order/--grid, "
                        "else multistep, the published update)")
    p.add_argument("--no-hop", action="store_true", help="integrate to t = 0.999 instead of hopping")
    p.add_argument("--solver", choices=("ode", "sde", "em", "sscs"), default=None,
                   help="sampler (default: ode for probODE models, sde for SDE models)")
    p.add_argument("--backend", default="auto", help="fused-op backend: auto | triton | cpu | float64")
    p.add_argument("--tuned",
                   help="settings JSON from `psb-fast tune` (overrides --T/--order/--grid/--variant)")
    p.add_argument("--label", type=int, default=None,
                   help="class label for a conditional model (default: none, unconditional samples)")
    p.add_argument("--stroke", help=".npy stroke of one data point's shape (-1 = unknown, for inpaint; "
                                    "default: none, no stroke guidance)")
    p.add_argument("--stroke-mode", choices=("dyn-v", "init-v", "inpaint"), default=None,
                   help="how --stroke guides (default: dyn-v); needs --stroke")
    p.add_argument("--strength", type=float, default=None,
                   help="share of steps in [0, 1] with a velocity redraw (default: 0.25 for dyn-v, 1 for "
                        "inpaint); needs --stroke, not with init-v")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                   help="samples per shard: the unit of work, of resuming and of spreading over ranks")
    p.add_argument("--out", default="samples", help="output folder: samples.npz, samples.png, shards/")
    p.set_defaults(run=_sample)

    p = sub.add_parser("tune", help="search T / grid / order per NFE for a trained model -> JSON")
    sampling_args(p)
    p.set_defaults(num=512, seed=TUNE_SEED)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20], help="NFEs to tune")
    p.add_argument("--reference-nfe", type=int, default=400,
                   help="NFE of the model's own reference solve (order-3 corrector to t = 0.999)")
    p.add_argument("--T-values", type=float, nargs="+", default=None,
                   help="hop times to search (default: 6 around the package default's T per NFE)")
    p.add_argument("--q-values", type=float, nargs="+", default=None,
                   help="grid powers q to search (default: 1.5 2)")
    p.add_argument("--orders", type=int, nargs="+", default=None,
                   help="solver orders to search (0..3; default: 1 2)")
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                   help="solver variants to search (default: multistep-corrector data-corrector)")
    p.add_argument("--no-refine", action="store_true",
                   help="only the search grid (T x q x order), no finer search around its best settings")
    p.add_argument("--learn", action="store_true",
                   help="then learn every step time and T from the search's pick (psb_fast.learn): -n draws "
                        "split into tuning, validation and evaluation rows; kept per NFE only where it wins "
                        "on the last")
    p.add_argument("--out", default="tuned.json", help="settings JSON to write")
    p.set_defaults(run=_tune)

    p = sub.add_parser("demo", help="train a toy model on CPU, sample at NFE 5/10/20, write figures")
    p.add_argument("--out", default="demo", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="training steps (None: the demo's 3500)")
    p.add_argument("--no-learn", action="store_true",
                   help="tune by the grid search alone (default: learned step times too, kept where they "
                        "win)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_demo)

    p = sub.add_parser("eval", help="bits/dim of a checkpoint on held-out data (--bpd) -> OUT/bpd.json")
    p.add_argument("checkpoint", help="checkpoint.pt of a training run, or its out_dir")
    p.add_argument("--bpd", action="store_true", help="negative log-likelihood bound in bits/dim")
    p.add_argument("--split", choices=("test", "train"), default="test", help="data split (test: held out)")
    p.add_argument("-n", "--num", type=int, default=None,
                   help="points (default: the whole split; 1000 for generated toy sets)")
    p.add_argument("--batch", type=int, default=200, help="points per batch: the unit of resuming")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (dequantization, phase, probes)")
    p.add_argument("--T-end", type=float, default=0.99, help="data end of the flow, in (0, 1)")
    p.add_argument("--rtol", type=float, default=1e-5, help="dopri5 relative tolerance")
    p.add_argument("--atol", type=float, default=1e-5, help="dopri5 absolute tolerance")
    p.add_argument("--exact-dims", type=int, default=16,
                   help="exact trace up to this many dimensions, Hutchinson above")
    p.add_argument("--probes", type=int, default=4, help="Hutchinson probes per sample (>= 2)")
    p.add_argument("--levels", type=int, default=-1,
                   help="data levels in [-1, 1] (-1: from the data, 17 digits, 256 images; 0: continuous)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of torch (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default="eval", help="output folder: bpd.json, plan.json, batches/")
    p.set_defaults(run=_eval)

    p = sub.add_parser("bench", help="the benchmark suite -> results.json, PNG plots, tables")
    p.add_argument("--quick", action="store_true", help="the short suite (minutes on a CPU)")
    p.add_argument("--out", default="bench", help="output folder")
    p.set_defaults(run=_bench)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Plain lines on the current sys.stderr (looked up per message, so a replaced stderr is used)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; sys.stderr is always used
        pass


def _log_to_stderr() -> None:
    """Run messages of the `psb_fast` logger (INFO and up) on stderr; added once per process."""
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    log.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `psb-fast`: returns the exit status (the EXIT_* table above). Bad input,
    a non-finite training loss, I/O failures and an interrupt (Ctrl-C) print one line on stderr;
    anything else is a bug and propagates with its traceback (status 1). Run messages go through
    the `psb_fast` logger, shown here on stderr; results (tables, the train summary) on stdout."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _log_to_stderr()

    def fail(kind: str, err: BaseException, code: int) -> int:
        message = " ".join(str(err).splitlines())
        print(f"psb-fast {args.command}: {kind}: {message}", file=sys.stderr)
        return code

    try:
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C outside train's own handling (start-up, sampling, tuning)
        done = {"sample": "finished shards are kept: rerun the same command to resume",
                "train": "checkpoints already written are kept"}.get(args.command, "nothing was saved")
        print(f"psb-fast {args.command}: interrupted (SIGINT); {done}", file=sys.stderr)
        return EXIT_SIGNAL + 2
    except (ValueError, TypeError, FileNotFoundError) as err:
        return fail("error", err, EXIT_BAD_INPUT)
    except FloatingPointError as err:  # non-finite loss or weights; the last good checkpoint is kept
        return fail("stopped", err, EXIT_NONFINITE)
    except OSError as err:  # disk full, read-only folder, ...: the message names the file
        return fail("I/O error", err, EXIT_IO)


if __name__ == "__main__":
    sys.exit(main())
