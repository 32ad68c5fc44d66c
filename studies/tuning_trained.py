"""Robustness stage of the tuned sampler defaults: keep a tuned entry only where it holds on TRAINED models.

    python -m studies.tuning_study          # 1. the mixture search -> <out>/tuning.json
    python -m studies.tuning_trained        # 2. this stage, on the picks 1. recorded -> tuning_trained.json
    python -m studies.make_defaults         # later: the defaults file from all stages' results

Run from the repository root (studies/ is a plain folder, not installed; `-m` puts the root on
sys.path, so `from studies import tuning_study` works).

Why. The mixture search (studies/tuning_study.py) scores settings with the EXACT drift of
Gaussian mixtures. A trained network is not exact: its error differs across t, and a setting that
is best for an exact drift (e.g. order 3 at a late hop) can lose to the published sampler on a real
model. This stage re-scores a few principled variants of every tuned entry on trained models too,
and keeps the tuned entry only where it holds up.

Tuning problems (none of them held out anywhere):
- trained: small residual MLPs (hidden 128, depth 3) trained with psb_fast.train on the 2-D toy
  sets TOY_SETS and on BARS, 20000 generated 8x8 images of one soft bar each (random centre,
  angle, length and width; `bar_images`), flattened to 64-D: a continuous image-like stand-in
  (3000 steps, batch 512, lr 2e-3, warmup 200, EMA 0.995, CPU); run folders cached under
  <out>/cache/trained/<name> (regenerated when missing). The digits model of
  studies/digits_study.py is NOT used: it stays held out. Target per model: its own NFE-200
  solution `psb_fast.tuning.reference_solution` from B_TRAINED prior draws (seed SEED_TRAINED).
- mixtures: the study's tuning mixtures (tuning_study.TUNING) with their exact targets (cached by
  the study) on its fine batch (B = 1024, seed 1).
Error: pathwise RMSE of the sampler's hop output against the target (`psb_fast.tuning.settings_rmse`).

Candidates per NFE in 3..50 (`candidates`): the current tuned entry (with its fractions), the
published setting (order 2, q = 2, published_T), and variants: the tuned grid with order 2; the
tuned T and q on the power-q grid; the tuned grid at the published T (with the tuned order and
with order 2); the published grid (q = 2,
order 2) at the tuned T; the published setting with order 3; the neighbouring NFEs' (T, q, order)
on the power-q grid. An order above nfe - 2 is lowered to it (it never reaches the history).

Rule: with r_{p,c} = RMSE of candidate c / RMSE of the published setting on problem p, a
candidate is admissible when r_{p,c} <= 1 on EVERY problem (mixtures and trained models).
1. If the tuned entry is admissible it is kept: it won the mixture search over hundreds of
   settings on larger batches.
2. Otherwise the published setting is used. Re-picking the best admissible variant instead
   (--repick, `robust_choice` over all candidates) fits these same problems' noise a second time
   (a second winner's curse): in the first run of this stage the re-picked variants lost to the
   published setting on held-out data (a held-out mixture at NFE 31-46, the digits model at NFE 12)
   although they passed every tuning problem, so a rejected tuned entry now falls back to the
   published sampler. (--full: score every candidate at every NFE, for the report.) NFE 1, 2 and
   the NFE > 50 rule are left as they are.

Outputs: <out>/tuning_trained.json and tuning_trained.md (every candidate's ratios and the pick);
`python -m studies.make_defaults` takes the picks from there into psb_fast/defaults.json. Held-out
checks afterwards: `python -m studies.tuning_study --evaluate-only` (held-out mixtures) and
`python -m studies.digits_study --out benchmarks/results/digits --eval-only`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from psb_fast.config import TrainConfig
from psb_fast.defaults import load_defaults
from psb_fast.pretrained import load_trained
from psb_fast.settings import Setting, published_setting
from psb_fast.train import CHECKPOINT, train_or_resume
from psb_fast.tuning import reference_solution, settings_rmse
from studies import make_defaults
from studies import tuning_study as study

ROOT = Path(__file__).resolve().parents[1]

TOY_SETS = ("checkerboard", "spiral", "rings", "gmm-grid")
BARS, N_BARS = "bars8x8", 20000
TRAINED_SETS = TOY_SETS + (BARS,)
TRAIN_STEPS = 3000
NFES = tuple(range(3, 51))
B_TRAINED, SEED_TRAINED = 2048, 5
REFERENCE_NFE = 200
MIXTURE_BATCHES = {"fine": 1024}  # the study's fine batch (its size in the full study), seed SEEDS["fine"]
MAX_ROWS = 32768


# ----------------------------------------------------------------------------- selection (pure)


def candidates(nfe: int, picks: Mapping[int, Setting]) -> dict[str, Setting]:
    """Named candidate settings for one NFE (module docstring), duplicates removed (first name kept).

    picks: NFE -> the mixture search's setting (with its fractions). Every candidate is
    `Setting.effective(nfe)` (the order lowered to nfe - 2); T is kept exactly (not rounded), so a
    published pick IS the published sampler. The first two entries are always "published" and
    "tuned" (kept even when equal: the published one then wins the tie).
    """
    if nfe not in picks:
        raise ValueError(f"nfe must be a key of the picks ({min(picks)}..{max(picks)}), got {nfe!r}")
    tuned = Setting.coerce(picks[nfe])
    pub = published_setting(nfe)
    order2 = min(tuned.order, 2)
    named: list[tuple[str, Setting]] = [
        ("published", pub),
        ("tuned", tuned),
        ("tuned-order2", tuned.replace(order=order2)),
        ("tuned-power", tuned.replace(fractions=None)),
        ("tuned-grid-pubT", tuned.replace(T=pub.T)),
        ("tuned-grid-pubT-order2", tuned.replace(T=pub.T, order=order2)),
        ("pub-grid-tunedT", Setting(tuned.T, 2.0, 2)),
        ("published-order3", Setting(pub.T, 2.0, 3)),
    ]
    for name, other in (("prev-nfe", nfe - 1), ("next-nfe", nfe + 1)):
        if other in picks:
            named.append((name, Setting.coerce(picks[other]).replace(fractions=None)))
    out: dict[str, Setting] = {}
    for k, (name, setting) in enumerate(named):
        c = setting.effective(nfe)
        if k < 2 or c not in out.values():
            out[name] = c
    return out


def robust_choice(errs: torch.Tensor, published: int = 0, max_ratio: float = 1.0) -> tuple[int, dict]:
    """Index of the robust pick among C candidates from their RMSEs on P problems, errs [P, C].

    Admissible: ratio errs[p, c] / errs[p, published] <= max_ratio on every problem p; the pick is
    the admissible candidate with the smallest mean log-ratio (geometric mean), ties to the lower
    index. The published column is always admissible (ratio 1). Returns (index, {"ratios" [P, C],
    "admissible" [C] bool, "gmean" [C]}).
    """
    if errs.dim() != 2 or errs.shape[0] < 1 or errs.shape[1] < 1:
        raise ValueError(f"errs must be [problems, candidates] with both >= 1, got shape {tuple(errs.shape)}")
    if not 0 <= published < errs.shape[1]:
        raise ValueError(f"published must index a candidate (0..{errs.shape[1] - 1}), got {published}")
    if not bool(torch.isfinite(errs).all()) or bool((errs[:, published] <= 0).any()):
        raise ValueError("errs must be finite, with positive published errors")
    ratios = errs.to(torch.float64) / errs[:, published : published + 1].to(torch.float64)
    admissible = (ratios <= max_ratio).all(0)
    admissible[published] = True
    gmean = ratios.clamp_min(1e-300).log().mean(0).exp()
    score = torch.where(admissible, gmean, torch.full_like(gmean, math.inf))
    index = int(torch.nonzero(score == score.min())[0])
    return index, {"ratios": ratios, "admissible": admissible, "gmean": gmean}


# ----------------------------------------------------------------------------- problems


def bar_images(n: int, seed: int = 0) -> torch.Tensor:
    """n 8x8 images of one soft bar each, pixels in [-1, 1], float32 [n, 64] (row-major 8x8).

    Bar: centre (y, x) ~ U[2, 5]^2 pixels, angle ~ U[0, pi), length ~ U[3, 7], width ~ U[0.5, 1.1];
    intensity exp(-d_perp^2 / (2 width^2)) * sigmoid(2 (length / 2 - |d_par|)), mapped to 2 I - 1.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, 1, 1, generator=gen, dtype=torch.float64)

    cy, cx, angle = uniform(2.0, 5.0), uniform(2.0, 5.0), uniform(0.0, math.pi)
    length, width = uniform(3.0, 7.0), uniform(0.5, 1.1)
    yy, xx = torch.meshgrid(torch.arange(8.0, dtype=torch.float64), torch.arange(8.0, dtype=torch.float64),
                            indexing="ij")
    dy, dx = yy - cy, xx - cx
    along = dx * torch.cos(angle) + dy * torch.sin(angle)
    across = -dx * torch.sin(angle) + dy * torch.cos(angle)
    intensity = torch.exp(-across**2 / (2 * width**2)) * torch.sigmoid(2 * (length / 2 - along.abs()))
    return (2 * intensity - 1).reshape(n, 64).float()


def data_spec(name: str, root: Path) -> str:
    """The psb_fast.data spec of a training set; BARS is written once to root/<name>.npy."""
    if name != BARS:
        return name
    path = root / f"{BARS}.npy"
    if not path.is_file():
        np.save(path, bar_images(N_BARS, seed=0).numpy())
    return f"tensor:{path}"


def train_config(data: str, out_dir: Path, steps: int = TRAIN_STEPS) -> TrainConfig:
    """The run of one tuning model (module docstring); data: a psb_fast.data spec."""
    return TrainConfig(data=data, model="mlp", model_kwargs={"hidden": 128, "depth": 3}, batch_size=512,
                       steps=steps, lr=2e-3, warmup_steps=200, ema_decay=0.995, device="cpu",
                       eval_samples=0, ckpt_every=0, bf16=False, seed=0, out_dir=str(out_dir))


def ensure_trained(
    root: Path, names: Sequence[str] = TRAINED_SETS, steps: int = TRAIN_STEPS
) -> dict[str, Path]:
    """Train (once) the tuning models; returns name -> checkpoint path (a finished run is reused)."""
    paths = {}
    for name in names:
        folder = root / name
        ckpt = folder / CHECKPOINT
        train_or_resume(train_config(data_spec(name, root), folder, steps), progress=False)
        paths[name] = ckpt
    return paths


class TrainedProblem:
    """A trained model with a fixed prior batch and its own NFE-200 solution as the target."""

    def __init__(self, name: str, ckpt: Path, size: int = B_TRAINED, seed: int = SEED_TRAINED):
        trained = load_trained(ckpt)
        self.name, self.model, self.bridge = name, trained.model, trained.bridge
        self.m0 = trained.prior(size, seed=seed)
        self.key = f"trained:{name}:step{trained.step}:B{size}:s{seed}"
        path = ckpt.parent / f"target_nfe{REFERENCE_NFE}_B{size}_s{seed}_step{trained.step}.pt"
        if path.is_file():
            self.target = torch.load(path)
        else:
            with torch.inference_mode():
                self.target = reference_solution(self.model, self.bridge, self.m0, REFERENCE_NFE, study.T0,
                                                 MAX_ROWS)
            torch.save(self.target, path)

    def rmse(self, nfe: int, settings: Sequence[Setting], rows: slice = slice(None)) -> torch.Tensor:
        with torch.inference_mode():
            return settings_rmse(self.model, self.bridge, self.m0[rows], self.target[rows], nfe, settings,
                                 study.T0, MAX_ROWS)


class MixtureProblem:
    """A tuning mixture of the study with its exact targets on `batches` (name -> size; the study's
    seeds), pooled: sqrt of the size-weighted mean square of the per-batch RMSEs."""

    def __init__(self, problem: study.Problem, batches: Mapping[str, int] = MIXTURE_BATCHES):
        self.problem, self.name = problem, problem.name
        self.batches = [(size, study.SEEDS[k]) for k, size in batches.items()]
        self.key = f"mixture:{self.name}:" + ",".join(f"B{b}s{s}" for b, s in self.batches)

    def rmse(self, nfe: int, settings: Sequence[Setting], rows: slice = slice(None)) -> torch.Tensor:
        """rows: the same slice of every batch (sizes then count the rows it keeps)."""
        sizes = [len(range(b)[rows]) for b, _ in self.batches]
        sq = sum(n * self.problem.rmse(nfe, settings, b, s, MAX_ROWS, rows) ** 2
                 for n, (b, s) in zip(sizes, self.batches, strict=True))
        return torch.sqrt(sq / sum(sizes))


class RowsView:
    """The rows `rows` of a problem's fixed batch, as a problem of its own (own cache key)."""

    def __init__(self, problem, rows: slice):
        self.problem, self.rows, self.name = problem, rows, problem.name
        self.key = f"{problem.key}:rows{rows.start}-{rows.stop}"

    def rmse(self, nfe: int, settings: Sequence[Setting]) -> torch.Tensor:
        return self.problem.rmse(nfe, settings, self.rows)


class ErrorCache:
    """RMSE per (problem key, nfe, setting), kept in a JSON file so a rerun only scores new settings."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def errors(self, problem, nfe: int, settings: Sequence[Setting]) -> torch.Tensor:
        """RMSEs [C] of `settings` (Settings or tuples) on `problem` at this NFE, scoring the uncached."""
        settings = [Setting.coerce(s) for s in settings]
        keys = [self.key(problem, nfe, s) for s in settings]
        missing = [s for s, k in zip(settings, keys, strict=True) if k not in self.data]
        if missing:
            for s, e in zip(missing, problem.rmse(nfe, missing).tolist(), strict=True):
                self.data[self.key(problem, nfe, s)] = e
            if self.path.is_file():  # keep what another run wrote meanwhile
                self.data = {**json.loads(self.path.read_text()), **self.data}
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)
        return torch.tensor([self.data[k] for k in keys], dtype=torch.float64)

    @staticmethod
    def key(problem, nfe: int, setting: Setting) -> str:
        """"<problem key>|<nfe>|<repr of the setting's tuple form>" (the keys of existing caches)."""
        return f"{problem.key}|{nfe}|{setting.as_tuple()!r}"


def tuning_problems(out: Path, mixture_batches: Mapping[str, int] = MIXTURE_BATCHES
                    ) -> tuple[list[MixtureProblem], list[TrainedProblem], ErrorCache]:
    """The nine tuning problems (the study's mixtures on `mixture_batches`, the trained models, trained
    first if missing) and the shared score cache, all under <out>/cache."""
    cache_dir = study.cache_dir(out)
    (cache_dir / "trained").mkdir(exist_ok=True)
    bridge = study.PhaseBridge()
    mixtures = [MixtureProblem(study.Problem(n, f(), bridge, cache_dir), mixture_batches)
                for n, f in study.TUNING.items()]
    trained = [TrainedProblem(n, p) for n, p in ensure_trained(cache_dir / "trained").items()]
    return mixtures, trained, ErrorCache(cache_dir / "trained" / "errors.json")


def report_head(command: str, start: float, threads: int, problems: Sequence) -> dict:
    """The fields every tuning report starts with: command, runtime, machine, problem names."""
    return {"command": command, "runtime_s": time.time() - start,
            "platform": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                        f"{threads} thread(s)",
            "problems": [p.name for p in problems]}


# ----------------------------------------------------------------------------- the stage


def mixture_picks(out: Path) -> dict[int, Setting]:
    """The mixture search's pick per NFE, from <out>/tuning.json (`make_defaults.mixture_picks`)."""
    path = out / "tuning.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `python -m studies.tuning_study` first")
    return {n: s for n, (s, _) in make_defaults.mixture_picks(json.loads(path.read_text())).items()}


def run_stage(
    problems: Sequence, cache: ErrorCache, nfes: Sequence[int] = NFES, progress: bool = True,
    full: bool = False, picks: Mapping[int, Setting] | None = None, repick: bool = False,
) -> dict:
    """Per NFE: the candidates' RMSEs on every problem and the pick (module docstring, "Rule").

    The published and tuned settings are scored first; if the tuned one is admissible it is kept
    and the variants are not scored (full=True scores every candidate anyway); otherwise the
    published setting is picked, or with repick=True the best admissible candidate
    (`robust_choice`). picks: NFE -> the setting to check (default: the package defaults; `main`
    checks the mixture search's picks recorded in tuning.json). Settings in the result are in their
    tuple form (`Setting.as_tuple`, as in the JSON report).
    """
    if picks is None:
        picks = {n: entry["setting"] for n, entry in load_defaults().items()}
    result = {}
    for nfe in nfes:
        named = candidates(nfe, picks)
        names, settings = list(named), list(named.values())
        n_scored = len(names) if full else 2
        errs = torch.stack([cache.errors(p, nfe, settings[:n_scored]) for p in problems])
        index, info = robust_choice(errs, published=0)
        kept = bool(info["admissible"][1])
        if repick and not full and not kept:
            n_scored = len(names)
            errs = torch.stack([cache.errors(p, nfe, settings) for p in problems])
            index, info = robust_choice(errs, published=0)
        elif not repick:
            index = 1 if kept else 0
        result[nfe] = {
            "pick": names[index], "setting": settings[index].as_tuple(), "tuned_kept": kept,
            "candidates": {
                name: {"setting": settings[c].as_tuple(), "admissible": bool(info["admissible"][c]),
                       "gmean_ratio": float(info["gmean"][c]),
                       "ratios": {p.name: float(info["ratios"][m, c]) for m, p in enumerate(problems)}}
                for c, name in enumerate(names[:n_scored])
            },
        }
        if progress:
            tr = result[nfe]["candidates"]["tuned"]
            print(f"NFE {nfe:2d}: pick {names[index]:17s} gmean {float(info['gmean'][index]):.3f} (tuned: "
                  f"gmean {tr['gmean_ratio']:.3f}, worst {max(tr['ratios'].values()):.3f})", flush=True)
    return result


def markdown_head(title: str, report: dict) -> list[str]:
    """Title and command line of a tuning report (`report_head`'s fields), as markdown lines."""
    return [f"# {title}", "", f"Command: `{report['command']}` ({report['runtime_s']:.0f} s, "
            f"{report['platform']}).", ""]


def markdown(report: dict) -> str:
    names = report["problems"]
    lines = markdown_head("Tuned defaults on trained models: the robustness stage", report) + [
        "Ratios = RMSE / RMSE of the published setting, per tuning problem (trained models against their",
        f"own NFE-{REFERENCE_NFE} solution, B = {B_TRAINED}; the study's tuning mixtures against the exact "
        "flow, B = 1024).",
        "Rule (studies/tuning_trained.py): keep the tuned entry if its ratio is <= 1 on every problem;",
        "otherwise the published setting (with --repick: among the candidates with ratio <= 1 on every",
        "problem, the one with the smallest geometric-mean ratio). gmean / worst: over all problems.",
        "Scores are cached (cache/trained/errors.json); uncached, scoring took 686 s after training the",
        "five models (2-4 min each).",
        "", "| NFE | pick | T | q | order | free grid | gmean | worst | tuned gmean | tuned worst |",
        "|---:|---|---:|---:|---:|:---:|---:|---:|---:|---:|",
    ]
    for nfe, r in report["table"].items():
        c, t = r["candidates"][r["pick"]], r["candidates"]["tuned"]
        s = c["setting"]
        free = "yes" if len(s) > 3 else "no"
        lines.append(f"| {nfe} | {r['pick']} | {s[0]:.4f} | {s[1]:g} | {s[2]} | {free} "
                     f"| {c['gmean_ratio']:.3f} | {max(c['ratios'].values()):.3f} | {t['gmean_ratio']:.3f} | "
                     f"{max(t['ratios'].values()):.3f} |")
    lines += ["", "Per-problem ratios of the tuned entry (before this stage) and of the pick:", "",
              "| NFE | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for nfe, r in report["table"].items():
        t, c = r["candidates"]["tuned"]["ratios"], r["candidates"][r["pick"]]["ratios"]
        lines.append(f"| {nfe} | " + " | ".join(f"{t[n]:.2f} -> {c[n]:.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output folder")
    ap.add_argument("--nfes", type=int, nargs="*", default=list(NFES), help="NFEs to check (default 3..50)")
    ap.add_argument("--full", action="store_true", help="score every candidate at every NFE (for the report)")
    ap.add_argument("--repick", action="store_true",
                    help="replace a rejected tuned entry by the best admissible variant, not by published")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    out = Path(args.out)
    picks = mixture_picks(out)
    mixtures, trained, cache = tuning_problems(out)
    problems = mixtures + trained
    table = run_stage(problems, cache, sorted(set(args.nfes)), full=args.full, picks=picks,
                      repick=args.repick)
    flags = [name for name in ("full", "repick") if getattr(args, name)]
    command = "python -m studies.tuning_trained" + "".join(f" --{f}" for f in flags)
    report = {**report_head(command, start, args.threads, problems),
              "problem_keys": [p.key for p in problems], "table": {str(n): r for n, r in table.items()}}
    (out / "tuning_trained.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "tuning_trained.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
