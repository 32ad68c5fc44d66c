"""The samplers users actually run (diffusers, k-diffusion) driven by exact Gaussian-mixture denoisers.

    python -m benchmarks.real_peers --split test --count 40 --draws 200 --nfe 5 10 20 \\
        --out benchmarks/results/real_peers_test.json

Every configuration solves the probability-flow ODE of a variance-exploding diffusion of the data
x0 ~ mixture (u = x0 + sigma z; diffusers' VP samples are x = u / sqrt(1 + sigma^2)) and gets as
its network the exact denoiser D(u, sigma) = E[x0 | u] = mixture.denoise(u, 1 / sigma^2), counted
by `CountingDenoiser` (the NFE is counted, never assumed). So only the solver and its step
schedule differ from the exact flow.

diffusers (prediction_type "sample": the network returns D directly; all six support it):
DPMSolverMultistepScheduler (algorithm_type "dpmsolver++", solver_order 2 and 3),
UniPCMultistepScheduler (solver_type "bh2", solver_order 2 and 3), DEISMultistepScheduler (its
default order 2), EulerDiscreteScheduler, HeunDiscreteScheduler and LMSDiscreteScheduler (order 4),
each with beta_schedule "linear" (beta 1e-4 .. 0.02, DDPM's and the diffusers default) and
"scaled_linear" (0.00085 .. 0.012, Stable Diffusion's), use_karras_sigmas False and True, default
timestep spacing and final sigmas, 1000 training steps. The loop is diffusers' own: x = noise *
init_noise_sigma; per timestep x_in = scale_model_input(x, t), model, step. The denoiser is
evaluated at the noise level the scheduler's step uses for that call, sigma = scheduler.sigmas[i]
for call i (Heun's interleaved second-order calls included; with Karras sigmas these are the exact
Karras values, not the rounded or fractional timesteps), on u = x_in sqrt(1 + sigma^2) (x_in is VP-
scaled for every scheduler). Checked: scheduler.step_index == i at every call.

k-diffusion (k_diffusion.sampling): sample_euler, sample_heun, sample_dpm_2, sample_lms (order 4),
sample_dpmpp_2m on get_sigmas_karras (rho 7) and get_sigmas_exponential from sigma_max 80 to
sigma_min 0.002 (EDM's values, for data of std 0.5; ample for unit-scale data), then 0;
x = noise * 80; model(x, sigma) = D(x, sigma). `import k_diffusion` needs torchvision and other
training-time packages; when it fails, k_diffusion/sampling.py is loaded on its own (it needs only
torch, scipy, torchsde and torchdiffeq), with a stand-in for the one helper it takes from
k_diffusion.utils (append_dims).

NFE budget: the largest step count whose counted NFE <= the budget, and the counted NFE of the real
run is reported. Every step costs at least one call, so the budget itself is tried first; where it
does not fit (Heun and dpm_2 spend 2 per step, the last step to sigma 0 one), dry runs with a zero
denoiser find the step count (`steps_for_budget`), cached per configuration and budget.

Error: pathwise RMSE sqrt(mean over draws of |x_method - x_exact|^2 / D) against the method's own
exact probability-flow solution from the same initial noise, to the noise level its output really
has: sigma_end = scheduler.sigmas[step_index] after the loop (0 for most; DEIS ends at the sigma of
training step 0, 0.01 for "linear" and 0.029 for "scaled_linear", and with Karras sigmas spends its
last evaluation on a step of length 0). The exact flow du/dlog(sigma) = u - D(u, sigma) starts at
u = noise * init_noise_sigma (VE schedulers) or noise * sqrt(1 + sigma_max^2) (VP ones) at
sigma = the scheduler's first sigma, is integrated by scipy DOP853 (rtol = atol = 1e-10) in
log(sigma) to sigma_end (or to SIGMA_TINY = 1e-6, then one exact denoiser step, when sigma_end = 0;
its error is ~ SIGMA_TINY^2 / (2 s_min), < 1e-9 here) and compared in the method's own output
scale. Configurations with the same start state and endpoint share one solution (one integration
per start state, evaluated at all endpoints).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from psb_fast.benchmarks.problems import SPLITS, Problem, problems
from psb_fast.oracles import GaussianMixture

NFES = (5, 10, 20)
RTOL = 1e-10
SIGMA_TINY = 1e-6
BETAS: dict[str, tuple[float, float]] = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
KD_SIGMA_MIN, KD_SIGMA_MAX = 0.002, 80.0
_KD_SHIM = "_psb_k_diffusion"  # the private package name k_diffusion/sampling.py is loaded under


# ------------------------------------------------------------------------------------------ model


class CountingDenoiser:
    """D(u, sigma) = E[x0 | x0 + sigma z = u] of `mixture`, counting calls.

    u: [B, D] (any float dtype); sigma: float >= 0 (0: D = u). Returns [B, D] float64.
    """

    def __init__(self, mixture: GaussianMixture) -> None:
        self.mixture = mixture
        self.calls = 0

    def __call__(self, u: torch.Tensor, sigma: float) -> torch.Tensor:
        self.calls += 1
        if sigma == 0.0:
            return u.to(torch.float64, copy=True)
        return self.mixture.denoise(u, 1.0 / (sigma * sigma))


class _ZeroDenoiser(CountingDenoiser):
    """Counts calls and returns zeros: the dry runs that find a step count within an NFE budget."""

    def __call__(self, u: torch.Tensor, sigma: float) -> torch.Tensor:
        self.calls += 1
        return torch.zeros_like(u, dtype=torch.float64)


@dataclass(frozen=True)
class PeerRun:
    """One sampler run. x: output [B, D] float64, in the method's scale: x = u(sigma_end) * out_scale.
    The start state is u = noise * start_scale at sigma_start; nfe: counted denoiser calls."""

    x: torch.Tensor
    sigma_start: float
    start_scale: float
    sigma_end: float
    out_scale: float
    nfe: int
    steps: int


#: run(denoiser, noise [B, D] float64, steps) -> PeerRun
Runner = Callable[[CountingDenoiser, torch.Tensor, int], PeerRun]


@dataclass(frozen=True)
class PeerConfig:
    """A library sampler configuration: name "library:sampler/schedule"; run: see `Runner`."""

    name: str
    library: str
    run: Runner


# --------------------------------------------------------------------------------------- diffusers

_VE_SCHEDULERS = ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler")
_DIFFUSERS = (  # (short name, class name, extra config)
    ("dpmpp-2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ("dpmpp-3m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    ("unipc-bh2-2", "UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2}),
    ("unipc-bh2-3", "UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 3}),
    ("deis-2", "DEISMultistepScheduler", {}),
    ("euler", "EulerDiscreteScheduler", {}),
    ("heun", "HeunDiscreteScheduler", {}),
    ("lms", "LMSDiscreteScheduler", {}),
)


def _diffusers_runner(cls: type, config: dict) -> Runner:
    ve = cls.__name__ in _VE_SCHEDULERS

    def run(den: CountingDenoiser, noise: torch.Tensor, steps: int) -> PeerRun:
        sched = cls(**config)
        sched.set_timesteps(steps)
        sigmas = [float(s) for s in sched.sigmas]
        init = float(sched.init_noise_sigma)
        x = noise.to(torch.float64) * init
        start = den.calls
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(x, t)
            if sched.step_index not in (None, i):
                raise RuntimeError(f"{cls.__name__}: call {i} at step_index {sched.step_index}")
            sigma = sigmas[i]
            scale = math.sqrt(1.0 + sigma * sigma)  # x_in is VP-scaled: u = x_in sqrt(1 + sigma^2)
            if ve and not torch.allclose(x_in * scale, x, rtol=1e-6, atol=1e-12):
                raise RuntimeError(f"{cls.__name__}: scale_model_input is not x / sqrt(1 + sigma^2)")
            if not ve and x_in is not x and not torch.equal(x_in, x):
                raise RuntimeError(f"{cls.__name__}: scale_model_input is not the identity")
            x0 = den(x_in * scale, sigma)
            x = sched.step(x0, t, x).prev_sample.to(torch.float64)
        sigma_end = sigmas[sched.step_index]
        return PeerRun(
            x, sigmas[0], init if ve else init * math.sqrt(1 + sigmas[0] ** 2), sigma_end,
            1.0 if ve else 1 / math.sqrt(1 + sigma_end**2), den.calls - start, steps,
        )

    return run


def _diffusers_configs() -> list[PeerConfig]:
    import diffusers

    out = []
    for short, cls_name, extra in _DIFFUSERS:
        cls = getattr(diffusers, cls_name)
        for beta, (start, end) in BETAS.items():
            for karras in (False, True):
                config = {"beta_schedule": beta, "beta_start": start, "beta_end": end,
                          "prediction_type": "sample", "use_karras_sigmas": karras, **extra}
                name = f"diffusers:{short}/{beta}{'+karras' if karras else ''}"
                out.append(PeerConfig(name, "diffusers", _diffusers_runner(cls, config)))
    return out


# ------------------------------------------------------------------------------------- k-diffusion


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """x with trailing singleton dims up to `target_dims` dims (k_diffusion.utils' helper of that name)."""
    return x.reshape(x.shape + (1,) * (target_dims - x.dim()))


def import_k_diffusion_sampling() -> types.ModuleType:
    """k_diffusion.sampling, or, when `import k_diffusion` fails (it imports torchvision, wandb and
    other training-time packages), that file alone under a private package name. ImportError if
    k-diffusion is not installed or its sampling module cannot be loaded."""
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError as err:
        first = err
    if _KD_SHIM + ".sampling" in sys.modules:
        return sys.modules[_KD_SHIM + ".sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed") from first
    folder = Path(list(spec.submodule_search_locations)[0])
    package = types.ModuleType(_KD_SHIM)
    package.__path__ = [str(folder)]
    utils = types.ModuleType(_KD_SHIM + ".utils")
    utils.append_dims = _append_dims
    package.utils = utils
    file_spec = importlib.util.spec_from_file_location(_KD_SHIM + ".sampling", folder / "sampling.py")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules.update({_KD_SHIM: package, _KD_SHIM + ".utils": utils, _KD_SHIM + ".sampling": module})
    try:
        file_spec.loader.exec_module(module)
    except ImportError as err:
        for name in (_KD_SHIM, _KD_SHIM + ".utils", _KD_SHIM + ".sampling"):
            sys.modules.pop(name, None)
        raise ImportError(f"k_diffusion.sampling could not be loaded: {err} (and `import k_diffusion`: "
                          f"{first})") from err
    return module


_KD_SAMPLERS = ("euler", "heun", "dpm_2", "lms", "dpmpp_2m")
_KD_SCHEDULES = ("karras", "exponential")


def _kd_runner(kds: types.ModuleType, sampler: str, schedule: str) -> Runner:
    sample = getattr(kds, f"sample_{sampler}")
    make_sigmas = getattr(kds, f"get_sigmas_{schedule}")

    def run(den: CountingDenoiser, noise: torch.Tensor, steps: int) -> PeerRun:
        sigmas = make_sigmas(steps, KD_SIGMA_MIN, KD_SIGMA_MAX).to(torch.float64)

        def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            level = float(sigma.reshape(-1)[0])
            if not bool((sigma == sigma.reshape(-1)[0]).all()):
                raise RuntimeError(f"k-diffusion {sampler}: one noise level per call expected")
            return den(x, level)

        start = den.calls
        x = sample(model, noise.to(torch.float64) * sigmas[0], sigmas, disable=True)
        first, last = float(sigmas[0]), float(sigmas[-1])
        return PeerRun(x.to(torch.float64), first, first, last, 1.0, den.calls - start, steps)

    return run


def _kd_configs() -> list[PeerConfig]:
    kds = import_k_diffusion_sampling()
    return [PeerConfig(f"k-diffusion:{s}/{sch}", "k-diffusion", _kd_runner(kds, s, sch))
            for s in _KD_SAMPLERS for sch in _KD_SCHEDULES]


# ------------------------------------------------------------------------------------- the configs

_LIBRARIES: dict[str, tuple[Callable[[], list[PeerConfig]], int, str]] = {
    "diffusers": (_diffusers_configs, 2 * 2 * len(_DIFFUSERS), "pip install diffusers"),
    "k-diffusion": (_kd_configs, len(_KD_SAMPLERS) * len(_KD_SCHEDULES),
                    "pip install --no-deps k-diffusion torchsde torchdiffeq trampoline"),
}


def peer_configs() -> tuple[list[PeerConfig], list[str]]:
    """(every configuration of the installed libraries, one line per library that is missing)."""
    configs, missing = [], []
    for library, (build, count, hint) in _LIBRARIES.items():
        try:
            configs += build()
        except ImportError as err:
            missing.append(f"{library} is not installed ({err}): skipping its {count} configurations "
                           f"(to include them: {hint})")
    return configs, missing


_STEPS_CACHE: dict[tuple[str, int], int] = {}


def steps_for_budget(config: PeerConfig, budget: int) -> int:
    """The largest step count whose counted NFE <= budget (dry runs with a zero denoiser; cached).

    The count is nondecreasing in the steps; a guess from the calls per step, then a walk up or down.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    key = (config.name, budget)
    if key not in _STEPS_CACHE:
        dummy = GaussianMixture([[0.0]], [1.0])

        def count(steps: int) -> int:
            den = _ZeroDenoiser(dummy)
            config.run(den, torch.zeros(1, 1, dtype=torch.float64), steps)
            return den.calls

        steps = budget
        calls = count(steps)
        if calls > budget:
            steps = max(1, min(steps - 1, budget * steps // calls))
            calls = count(steps)
        while calls > budget and steps > 1:
            steps -= 1
            calls = count(steps)
        if calls > budget:
            raise ValueError(f"{config.name}: no step count fits in {budget} evaluations")
        while steps < budget and count(steps + 1) <= budget:
            steps += 1
        _STEPS_CACHE[key] = steps
    return _STEPS_CACHE[key]


# ------------------------------------------------------------------------------------- exact flows


def exact_flow(
    mixture: GaussianMixture, u_start: torch.Tensor, sigma_start: float, sigma_ends: Sequence[float],
    rtol: float = RTOL, atol: float = RTOL,
) -> dict[float, torch.Tensor]:
    """u(sigma_end) of du/dlog(sigma) = u - D(u, sigma) from u(sigma_start) = u_start, per endpoint.

    u_start: [B, D]; endpoints in [0, sigma_start]; 0 is reached by integrating to SIGMA_TINY and
    applying the exact denoiser. One scipy DOP853 integration for all endpoints. {sigma_end: [B, D]}.
    """
    from scipy.integrate import solve_ivp

    if not sigma_start > 0:
        raise ValueError(f"sigma_start must be > 0, got {sigma_start}")
    ends = sorted(set(float(s) for s in sigma_ends), reverse=True)
    if any(not 0 <= s <= sigma_start for s in ends):
        raise ValueError(f"sigma_ends must lie in [0, sigma_start = {sigma_start}], got {ends}")
    stops = sorted({max(s, SIGMA_TINY) for s in ends if s < sigma_start}, reverse=True)
    shape = tuple(u_start.shape)
    u0 = u_start.detach().to("cpu", torch.float64)
    states = {sigma_start: u0.clone()}
    if stops:
        def rhs(log_sigma: float, y):
            u = torch.from_numpy(y).view(shape)
            return (u - mixture.denoise(u, math.exp(-2 * log_sigma))).reshape(-1).numpy()

        logs = [math.log(s) for s in stops]
        sol = solve_ivp(rhs, (math.log(sigma_start), logs[-1]), u0.reshape(-1).numpy(), method="DOP853",
                        t_eval=logs, rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"exact_flow: solve_ivp failed: {sol.message}")
        for j, s in enumerate(stops):
            states[s] = torch.from_numpy(sol.y[:, j].copy()).view(shape)
    out = {}
    for s in ends:
        if s == 0.0:
            out[s] = mixture.denoise(states[SIGMA_TINY], 1.0 / SIGMA_TINY**2)
        else:
            out[s] = states[s]
    return out


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """sqrt(mean over rows of |x - ref|^2 / D) for [B, D] tensors."""
    return math.sqrt(((x.to(torch.float64) - ref.to(torch.float64)) ** 2).mean().item())


# ------------------------------------------------------------------------------------------ runner


def run_problem(
    problem: Problem, configs: Sequence[PeerConfig], nfes: Sequence[int] = NFES, draws: int = 200,
    seed: int = 0,
) -> dict:
    """Every configuration at every NFE budget on one problem, from one noise draw [draws, D].

    Returns {"label", "family", "split", "seed", "dim", "n_components", "seconds", "nfe": {str(budget):
    {"configs": {name: {"error", "nfe", "steps", "sigma_end"}}, "best": {"name", "error"}}}}.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    tic = time.perf_counter()
    mix = problem.mixture
    gen = torch.Generator().manual_seed(1_000_003 * seed + problem.seed)
    noise = torch.randn((draws, mix.dim), generator=gen, dtype=torch.float64)
    runs: dict[tuple[str, int], PeerRun] = {}
    for config in configs:
        for budget in nfes:
            # Every step costs >= 1 call, so `budget` steps is the most; if they fit it is the answer
            # (and the dry runs of `steps_for_budget` are needed only for samplers that do not fit).
            steps = _STEPS_CACHE.get((config.name, budget), budget)
            den = CountingDenoiser(mix)
            run = config.run(den, noise, steps)
            if den.calls > budget and steps == budget and (config.name, budget) not in _STEPS_CACHE:
                steps = steps_for_budget(config, budget)
                den = CountingDenoiser(mix)
                run = config.run(den, noise, steps)
            _STEPS_CACHE[(config.name, budget)] = steps
            if run.nfe != den.calls or run.nfe > budget:
                raise RuntimeError(f"{config.name}: counted {den.calls} calls, run says {run.nfe}, "
                                   f"budget {budget}")
            runs[(config.name, budget)] = run
    groups: dict[tuple[float, float], set[float]] = {}
    for run in runs.values():
        groups.setdefault((run.sigma_start, run.start_scale), set()).add(run.sigma_end)
    exact = {key: exact_flow(mix, noise * key[1], key[0], sorted(ends)) for key, ends in groups.items()}
    per_nfe = {}
    for budget in nfes:
        table = {}
        for config in configs:
            run = runs[(config.name, budget)]
            ref = exact[(run.sigma_start, run.start_scale)][run.sigma_end] * run.out_scale
            table[config.name] = {"error": rmse(run.x, ref), "nfe": run.nfe, "steps": run.steps,
                                  "sigma_end": run.sigma_end}
        best = min(table, key=lambda name: table[name]["error"]) if table else None
        per_nfe[str(budget)] = {"configs": table,
                                "best": {"name": best, "error": table[best]["error"] if best else None}}
    return {
        "label": problem.label, "family": problem.family, "split": problem.split, "seed": problem.seed,
        "dim": mix.dim, "n_components": mix.n_components, "seconds": time.perf_counter() - tic,
        "nfe": per_nfe,
    }


def run_real_peers(
    probs: Sequence[Problem], nfes: Sequence[int] = NFES, draws: int = 200, seed: int = 0,
    configs: Sequence[PeerConfig] | None = None, progress: bool = False,
    on_result: Callable[[str, dict], None] | None = None,
) -> dict[str, dict]:
    """`run_problem` on every problem; returns {problem name: its result}.

    configs: default every installed library's (`peer_configs`; missing libraries are reported on
    stderr, one line each). on_result(name, result) is called as each problem finishes.
    """
    if configs is None:
        configs, missing = peer_configs()
        for line in missing:
            print(line, file=sys.stderr)
    nfes = tuple(nfes)
    for budget in nfes:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"nfes must be ints >= 1, got {nfes}")
    results = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(probs), desc="real peers", unit="problem")
    try:
        for problem in probs:
            results[problem.name] = run_problem(problem, configs, nfes, draws, seed)
            if on_result is not None:
                on_result(problem.name, results[problem.name])
            if bar is not None:
                best = results[problem.name]["nfe"][str(nfes[0])]["best"]["error"]
                bar.set_postfix_str(f"{problem.name}: best@{nfes[0]} {best:.2e}")
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return results


def summarize(results: dict[str, dict], nfes: Sequence[int]) -> dict[str, dict]:
    """Per NFE: median and quartiles over problems of the best peer's error; how often each peer won."""
    out = {}
    for budget in nfes:
        bests = [r["nfe"][str(budget)]["best"] for r in results.values()]
        bests = [b for b in bests if b["name"]]
        if not bests:
            continue
        errors = sorted(b["error"] for b in bests)
        wins: dict[str, int] = {}
        for b in bests:
            wins[b["name"]] = wins.get(b["name"], 0) + 1
        q = statistics.quantiles(errors, n=4) if len(errors) > 1 else [errors[0]] * 3
        out[str(budget)] = {"problems": len(errors), "median_best_error": statistics.median(errors),
                            "quartiles_best_error": [q[0], q[2]],
                            "wins": dict(sorted(wins.items(), key=lambda kv: -kv[1]))}
    return out


# ------------------------------------------------------------------------------------------- suite

SUITE_SETTINGS = {"quick": {"count": 4, "draws": 64}, "full": {"count": 24, "draws": 200}}
ERROR_UNIT = "RMS per coordinate (data units)"


def suite_part(quick: bool, out_dir: Path, progress: bool = False) -> dict:
    """The benchmark suite's "real_peers" part: the first problems of the test split (quick: 4 x 64
    draws, full: 24 x 200) at NFE 5, 10, 20. Writes every error to out_dir/real_peers.json and returns
    the summary, each number as {"value", "unit"}."""
    mode = SUITE_SETTINGS["quick" if quick else "full"]
    configs, missing = peer_configs()
    for line in missing:
        print(line)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_real_peers(problems("test", mode["count"]), NFES, mode["draws"], 0, configs, progress)
    finally:
        torch.set_num_threads(torch_threads)
    summary = summarize(results, NFES)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "real_peers.json", {"settings": {**mode, "nfe": list(NFES)}, "missing": missing,
                                              "problems": results, "summary": summary})
    table = {}
    for budget, row in summary.items():
        table[budget] = {
            "median_best_error": {"value": row["median_best_error"], "unit": ERROR_UNIT},
            "quartiles_best_error": [{"value": q, "unit": ERROR_UNIT} for q in row["quartiles_best_error"]],
            "wins": {name: {"value": count, "unit": "problems"} for name, count in row["wins"].items()},
        }
    return {"problems": {"value": mode["count"], "unit": "problems"},
            "draws": {"value": mode["draws"], "unit": "draws"},
            "configurations": {"value": len(configs), "unit": "configurations"},
            "missing": missing, "summary": table, "file": "real_peers.json"}


def render_table(result: dict) -> str:
    """The suite part's summary as a markdown table."""
    lines = [f"{result['problems']['value']} test problems x {result['draws']['value']} draws, "
             f"{result['configurations']['value']} library configurations; error: {ERROR_UNIT}", "",
             "| NFE | median best-peer error | quartiles | most wins |", "|---|---|---|---|"]
    for budget, row in result["summary"].items():
        q1, q3 = (q["value"] for q in row["quartiles_best_error"])
        top = next(iter(row["wins"].items()), ("-", {"value": 0}))
        lines.append(f"| {budget} | {row['median_best_error']['value']:.3e} | {q1:.2e} .. {q3:.2e} | "
                     f"{top[0]} ({top[1]['value']}) |")
    lines += result["missing"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("diffusers", "k-diffusion", "torch", "scipy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def _write_json(path: Path, data: dict) -> None:
    """Write atomically (a temporary file beside `path`, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="test", choices=tuple(SPLITS))
    parser.add_argument("--count", type=int, default=None, help="first COUNT problems of the split")
    parser.add_argument("--draws", type=int, default=200, help="noise draws per problem")
    parser.add_argument("--nfe", type=int, nargs="+", default=list(NFES), help="NFE budgets")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (with each problem's own seed)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file (resumed if it exists)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small tensors: more intra-op threads only add overhead
    configs, missing = peer_configs()
    for line in missing:
        print(line)
    settings = {"split": args.split, "draws": args.draws, "nfe": args.nfe, "seed": args.seed,
                "configs": [c.name for c in configs], "betas": BETAS,
                "k_diffusion_sigmas": [KD_SIGMA_MIN, KD_SIGMA_MAX], "rtol": RTOL, "sigma_tiny": SIGMA_TINY}
    settings = json.loads(json.dumps(settings))  # as it reads back from the file (tuples -> lists)
    data = {"settings": settings, "versions": _versions(), "missing": missing, "problems": {}}
    if args.out.exists():
        old = json.loads(args.out.read_text())
        if old.get("settings") != settings:
            parser.error(f"{args.out} holds results of other settings ({old.get('settings')}); "
                         f"use another --out or remove it")
        data["problems"] = old.get("problems", {})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    todo = [p for p in problems(args.split, args.count) if p.name not in data["problems"]]
    print(f"{len(configs)} configurations, {len(todo)} problems to run "
          f"({len(data['problems'])} already in {args.out})")
    tic = time.perf_counter()

    def save(name: str, result: dict) -> None:
        data["problems"][name] = result
        data["summary"] = summarize(data["problems"], args.nfe)
        _write_json(args.out, data)

    run_real_peers(todo, args.nfe, args.draws, args.seed, configs, progress=not args.no_progress,
                   on_result=save)
    data["summary"] = summarize(data["problems"], args.nfe)
    _write_json(args.out, data)
    print(f"done in {time.perf_counter() - tic:.0f} s; median best-peer error per NFE:")
    for budget, row in data["summary"].items():
        print(f"  NFE {budget}: {row['median_best_error']:.3e} over {row['problems']} problems "
              f"(most wins: {next(iter(row['wins']))})")
    return data


if __name__ == "__main__":
    main()
