"""Likelihood of data under a probODE model: the phase-space probability flow with its log-determinant.

    result = likelihood(model, bridge, x1, levels=256)      # x1 [B, C, ...] in data units
    result.nll, result.bpd, result.stderr, result.nfe       # [B] nats, [B] bits/dim, [B] nats, int

The math is docs/math.md §13. In steps:

1. (images) uniform dequantization: x = x1 + bin (u - 1/2), bin = 2 / (levels - 1) (§13.5);
2. a phase state at T_end drawn from the bridge conditional q(m | x) = N((cx, cv) x, Sigma(T_end))
   per coordinate (§13.2);
3. log p_T(m) of the model by the probability-flow ODE solved from T_end back to t = 0 with the
   divergence of its drift accumulated beside the state (§13.1): the trace of dF/dv exactly (one
   vector-Jacobian product per dimension) up to `exact_dims` dimensions, else Hutchinson's
   estimate with Rademacher probes and its standard error (§13.4);
4. the bound nll = -(log p_T(m) + log r(x | m) - log q(m | x)) with the bridge's own decoder r
   (§13.2), plus D log((levels - 1) / 2) for discrete data.

The ODE is solved by torchdiffeq's dopri5 (an optional dependency, the `likelihood` extra:
`pip install torchdiffeq`) in
log time u = -log(1 - t), on the whole batch as one system (the step size is set by the sample that
needs the smallest), with the error norm the largest per-sample RMS. Rows must be independent
(the model in eval mode: no batch statistics).

`evaluate_bpd` runs `likelihood` over a data set in batches, one result file per batch written
atomically, so an interrupted evaluation resumes where it stopped (`psb-fast eval RUN --bpd`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import checks
from .bridge import PhaseBridge
from .checkpoint import write_atomic
from .files import read_json
from .progress import progress_bar
from .seeds import derive_seed

Model = Callable[..., torch.Tensor]
#: Default end time: the data end of the flow (docs/math.md §13.6 on the choice).
T_END_LIKELIHOOD = 0.99
RESULTS = "batches"
PLAN = "plan.json"
SUMMARY = "bpd.json"


@dataclass(frozen=True)
class LogDensity:
    """log p_t(m) of the model at the end time, [B] float64 nats; stderr [B] nats of the trace
    estimator (0 for the exact trace); m0 [B, 2C, ...] the state at t = 0; nfe model calls."""

    logp: torch.Tensor
    stderr: torch.Tensor
    m0: torch.Tensor
    nfe: int
    exact_trace: bool


@dataclass(frozen=True)
class Likelihood:
    """The result of `likelihood`, all [B] float64 tensors on x1's device except the ints.

    nll: the bound on -log p(x1) in nats, summed over the D dimensions of a sample (D = C*H*W)
        (for `levels`: on the discrete levels; else a continuous density); bpd: nll / (D log 2);
    stderr: standard error of nll from the trace estimator, nats (0 with the exact trace);
    m: the phase state [B, 2C, ...] drawn from the bridge at T_end (float64); log_pT: log p_T(m) of
    the model there; nfe: model evaluations of the solve (each with D or `probes` vector-Jacobian
    products); dims: D; exact_trace; seconds: wall time.
    """

    nll: torch.Tensor
    bpd: torch.Tensor
    stderr: torch.Tensor
    m: torch.Tensor
    log_pT: torch.Tensor
    nfe: int
    dims: int
    exact_trace: bool
    seconds: float


def _solver():
    try:
        from torchdiffeq import odeint
    except ImportError as err:
        raise ImportError("the likelihood needs torchdiffeq (its adaptive dopri5 solver): "
                          "pip install torchdiffeq") from err
    return odeint


def _check_model_and_bridge(model: object, bridge: object) -> None:
    if not isinstance(bridge, PhaseBridge):
        raise TypeError(f"bridge must be a PhaseBridge, got {type(bridge).__name__}")
    if bridge.mode != "probODE":
        raise ValueError(f"the likelihood needs a probability-flow model (bridge mode 'probODE'), got a "
                         f"model of mode {bridge.mode!r}, whose output is not the flow's drift")
    if not callable(model):
        raise TypeError(f"model must be callable as model(m, t), got {type(model).__name__}")


def _check_data(name: str, x: object, batch_dims: int = 2) -> torch.Tensor:
    """A finite real floating tensor [B, C, ...] (at least `batch_dims` dims, no empty dim)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor (float32 or float64), got dtype {x.dtype}")
    if x.dim() < batch_dims or x.numel() == 0:
        raise ValueError(f"{name} must be [B, C, ...] with at least {batch_dims} non-empty dims, got "
                         f"shape {tuple(x.shape)}")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise ValueError(f"{name} must be finite, got {x[bad].flatten()[0].item()} at index "
                         f"{tuple(i.item() for i in torch.nonzero(bad)[0])}")
    return x


def _input_dtype(model: object, fallback: torch.dtype) -> torch.dtype:
    """The dtype to call the model in: its first floating parameter's, else the state's."""
    if isinstance(model, torch.nn.Module):
        for param in model.parameters():
            if param.is_floating_point():
                return param.dtype
    return fallback


def phase_log_density(
    model: Model,
    bridge: PhaseBridge,
    m: torch.Tensor,
    t: float,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    exact_dims: int = 16,
    probes: int = 4,
    seed: int = 0,
    cond: torch.Tensor | None = None,
    progress: bool = False,
) -> LogDensity:
    """log p_t(m) of the model's probability flow (docs/math.md §13.1), [B] nats.

    m: [B, 2C, ...] = [x | v] phase states at time t in (0, 1) (float32 or float64: the ODE state
    has m's dtype; the model is called in its parameters' dtype). The flow dx/dt = v,
    dv/dt = N(t) F(m, t) is solved back to t = 0 by dopri5 at (rtol, atol) while
    d(log p)/dt = -N(t) tr(dF/dv) is accumulated; log p_t(m) = log N(m0; 0, Sigma0) + the integral.
    exact_dims: up to this many dimensions D = C*... the trace is exact (D vector-Jacobian products
    per evaluation); above it Hutchinson's estimate with `probes` (>= 2) Rademacher probes drawn
    from `seed`, fixed along the path, whose spread gives `stderr`. cond: class labels [B] passed
    as model(m, t, cond) (None: model(m, t)). progress: a tqdm bar over t.
    """
    _check_model_and_bridge(model, bridge)
    m = _check_data("m", m)
    if m.shape[1] % 2:
        raise ValueError(f"m must be [B, 2C, ...] = [x | v] with an even dim 1, got shape {tuple(m.shape)}")
    t = checks.interval("t", t, 0.0, 1.0, open_lo=True)
    rtol = checks.interval("rtol", rtol, 0.0, 1.0, open_lo=True)
    atol = checks.interval("atol", atol, 0.0, 1.0, open_lo=True)
    exact_dims = checks.count("exact_dims", exact_dims, 0)
    probes = checks.count("probes", probes, 2)
    seed = checks.count("seed", seed, 0)
    if cond is not None and (not isinstance(cond, torch.Tensor) or cond.shape != (m.shape[0],)
                             or cond.dtype != torch.long):
        got = f"{cond.dtype} {tuple(cond.shape)}" if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise ValueError(f"cond must be a long tensor [{m.shape[0]}] of class labels or None, got {got}")
    odeint = _solver()

    batch, dtype, device = m.shape[0], m.dtype, m.device
    half = m.shape[1] // 2
    x_shape = (batch, half, *m.shape[2:])
    dims = math.prod(x_shape[1:])
    exact = dims <= exact_dims
    in_dtype = _input_dtype(model, dtype)
    generator = torch.Generator().manual_seed(derive_seed(seed, "likelihood-probes"))
    eps = None if exact else (
        torch.randint(0, 2, (probes, *x_shape), generator=generator).to(device, dtype) * 2 - 1)
    width = 1 if exact else probes
    calls = [0]
    u_end = -math.log1p(-t)
    bar = progress_bar(total=1000, desc="likelihood", unit="‰", disable=not progress, leave=False)

    def rhs(u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # u = -log(1 - t): dm/du = tau dm/dt, tau = e^-u (docs/math.md §13.1). Steps end exactly at
        # u = 0 (step_t below); only the solver's first-step probe may look past it: clamped to t = 0.
        u = max(float(u), 0.0)
        s, tau = -math.expm1(-u), math.exp(-u)
        normalizer = bridge.coefficients(s).normalizer.item()
        state = y[:, : 2 * dims].reshape(m.shape)
        with torch.enable_grad():
            leaf = state.detach().to(in_dtype).requires_grad_(True)
            times = torch.full((batch,), s, dtype=in_dtype, device=device)
            F = model(leaf, times) if cond is None else model(leaf, times, cond)
            if not isinstance(F, torch.Tensor) or tuple(F.shape) != x_shape:
                got = tuple(F.shape) if isinstance(F, torch.Tensor) else type(F).__name__
                raise ValueError(f"model output must have x's shape {x_shape}, got {got}")
            if not F.requires_grad:
                raise ValueError("model output does not depend on m through autograd (no grad_fn); the "
                                 "likelihood needs the divergence of a differentiable model")
            if not bool(torch.isfinite(F).all()):
                raise ValueError(f"model output is not finite at t = {s:.6g}")
            trace = torch.empty((batch, width), dtype=dtype, device=device)
            if exact:
                flat = F.reshape(batch, dims)
                diagonal = []
                for j in range(dims):  # one vector-Jacobian product per dimension: row j of dF/dv
                    (grad,) = torch.autograd.grad(flat[:, j].sum(), leaf, retain_graph=j < dims - 1)
                    diagonal.append(grad[:, half:].reshape(batch, dims)[:, j])
                trace[:, 0] = torch.stack(diagonal, 1).sum(1).to(dtype)
            else:
                for k in range(probes):  # Hutchinson: eps^T (dF/dv) eps per probe
                    (grad,) = torch.autograd.grad(F, leaf, grad_outputs=eps[k].to(F.dtype),
                                                  retain_graph=k < probes - 1)
                    trace[:, k] = (grad[:, half:] * eps[k]).reshape(batch, dims).sum(1).to(dtype)
        calls[0] += 1
        bar.n = max(bar.n, round(1000 * (1 - s / t)))
        bar.set_postfix(nfe=calls[0], refresh=False)
        bar.update(0)
        velocity = state[:, half:].reshape(batch, dims)
        dv = normalizer * F.detach().to(dtype).reshape(batch, dims)
        # d(log p)/du = -tau N tr(dF/dv); the accumulator integrates it backwards from u_end.
        return tau * torch.cat([velocity, dv, -normalizer * trace], dim=1)

    def norm(ratio: torch.Tensor) -> torch.Tensor:  # the largest per-sample RMS of the error ratio
        return ratio.reshape(batch, -1).pow(2).mean(1).sqrt().max()

    x, v = m[:, :half].reshape(batch, dims), m[:, half:].reshape(batch, dims)
    y0 = torch.cat([x, v, torch.zeros((batch, width), dtype=dtype, device=device)], dim=1)
    span = torch.tensor([u_end, 0.0], dtype=dtype, device=device)
    try:
        options = {"norm": norm, "step_t": span[1:]}
        y = odeint(rhs, y0, span, rtol=rtol, atol=atol, method="dopri5", options=options)[-1]
    finally:
        bar.close()
    m0 = torch.cat([y[:, :dims].reshape(x_shape), y[:, dims: 2 * dims].reshape(x_shape)], dim=1)
    # log p_t(m) = log p_0(m0) + integral_0^t N tr(dF/dv) dt  (the accumulator holds minus it)
    change = -y[:, 2 * dims:].to(torch.float64)
    logp = _prior_logp(bridge, m0) + change.mean(1)
    stderr = torch.zeros(batch, dtype=torch.float64, device=device) if exact else \
        change.std(1) / math.sqrt(probes)
    return LogDensity(logp, stderr, m0, calls[0], exact)


def _prior_logp(bridge: PhaseBridge, m0: torch.Tensor) -> torch.Tensor:
    """log N(m0; 0, Sigma0) per row [B] float64 (Sigma0 per coordinate, docs/math.md §1.2)."""
    lxx, lxv, lvv = bridge.prior_cholesky()
    half = m0.shape[1] // 2
    x, v = m0[:, :half].to(torch.float64).flatten(1), m0[:, half:].to(torch.float64).flatten(1)
    ex = x / lxx
    ev = (v - lxv * ex) / lvv
    dims = x.shape[1]
    return -0.5 * (ex * ex + ev * ev).sum(1) - dims * (math.log(2 * math.pi) + math.log(lxx * lvv))


def likelihood(
    model: Model,
    bridge: PhaseBridge,
    x1: torch.Tensor,
    *,
    T_end: float = T_END_LIKELIHOOD,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    exact_dims: int = 16,
    probes: int = 4,
    levels: int | None = None,
    seed: int = 0,
    cond: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> Likelihood:
    """A bound on -log p(x1) of a probODE model (docs/math.md §13), per sample.

    model: F(m, t[, cond]) of a "probODE" bridge (an SDE-mode model is refused); bridge: its
    PhaseBridge. x1: [B, C, ...] data in data units (float; e.g. [B, 2] toy points or [B, 1, 8, 8]
    images). T_end: the data end of the flow in (0, 1) (§13.6). rtol, atol: dopri5's tolerances on
    the state and the log-density. exact_dims, probes: the trace estimator (`phase_log_density`).
    levels: None for continuous data; an int >= 2 for data on `levels` equally spaced values
    spanning [-1, 1] (256 for 8-bit images, 17 for the 0..16 digits): uniform dequantization and a
    bound on the discrete probability (§13.5). seed: the dequantization noise, the phase-state
    draw and the probes (CPU generators, so results do not depend on the device). dtype: of the ODE
    state (float64 or float32); every per-t coefficient is float64. Works on any device of x1.
    Returns a `Likelihood`: nll and bpd per sample, the trace estimator's stderr and the NFE.
    """
    start = time.perf_counter()
    _check_model_and_bridge(model, bridge)
    x1 = _check_data("x1", x1)
    T_end = checks.interval("T_end", T_end, 0.0, 1.0, open_lo=True)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    seed = checks.count("seed", seed, 0)
    if levels is not None:
        levels = checks.count("levels", levels, 2)
        bin_width = 2.0 / (levels - 1)
        steps = (x1.to(torch.float64) + 1) / bin_width
        off = (steps - steps.round()).abs().max().item()
        if off > 1e-3 or x1.min().item() < -1 - 1e-6 or x1.max().item() > 1 + 1e-6:
            raise ValueError(f"x1 must lie on the {levels} levels -1, -1 + {bin_width:.6g}, ..., 1 for "
                             f"levels={levels}, got values off the grid by up to {off:.3g} steps (or "
                             f"outside [-1, 1]); pass levels=None for continuous data")
    dims, device = math.prod(x1.shape[1:]), x1.device
    generator = torch.Generator().manual_seed(derive_seed(seed, "likelihood-data"))
    x = x1.to(torch.float64)
    if levels is not None:  # uniform dequantization within each level's bin (§13.5)
        u = torch.rand(x1.shape, generator=generator, dtype=torch.float64).to(device)
        x = (steps.round() * bin_width - 1) + bin_width * (u - 0.5)
    # m ~ q(m | x) = N((cx, cv) x, Sigma(T_end)) per coordinate (§13.2)
    noise = torch.randn((2, *x1.shape), generator=generator, dtype=torch.float64).to(device)
    co = bridge.coefficients(T_end)
    cx, cv, lxx, lxv, lvv = (getattr(co, name).item() for name in ("cx", "cv", "lxx", "lxv", "lvv"))
    m = torch.cat([cx * x + lxx * noise[0], cv * x + lxv * noise[0] + lvv * noise[1]], dim=1)
    density = phase_log_density(model, bridge, m.to(dtype), T_end, rtol=rtol, atol=atol,
                                exact_dims=exact_dims, probes=probes, seed=seed, cond=cond,
                                progress=progress)
    # log r(x | m) - log q(m | x) per coordinate = 1/2 log(2 pi a det Sigma) + 1/2 s2^2, with
    # u = L^-1 (cx, cv), a = |u|^2 and s2 the noise across u (§13.2).
    ux, uv = cx / lxx, (cv * lxx - lxv * cx) / (lxx * lvv)
    a = ux * ux + uv * uv
    s2 = (ux * noise[1] - uv * noise[0]).flatten(1) / math.sqrt(a)
    decoder = 0.5 * dims * math.log(2 * math.pi * a * (lxx * lvv) ** 2) + 0.5 * (s2 * s2).sum(1)
    nll = -(density.logp + decoder)
    if levels is not None:
        nll = nll + dims * math.log((levels - 1) / 2)
    return Likelihood(nll=nll, bpd=nll / (dims * math.log(2)), stderr=density.stderr, m=m,
                      log_pT=density.logp, nfe=density.nfe, dims=dims, exact_trace=density.exact_trace,
                      seconds=time.perf_counter() - start)


@dataclass(frozen=True)
class EvalPlan:
    """What an evaluation computes; a rerun into the same folder must match it (else refused)."""

    source: str
    n: int
    batch: int
    seed: int
    T_end: float
    rtol: float
    atol: float
    exact_dims: int
    probes: int
    levels: int | None
    model_step: int


def evaluate_bpd(
    model: Model,
    bridge: PhaseBridge,
    x: torch.Tensor,
    plan: EvalPlan,
    out: str | os.PathLike,
    *,
    progress: bool = True,
) -> dict:
    """`likelihood` over the data x [N, ...] in batches of plan.batch, resumable.

    Batch b (rows b*batch ...) uses seed derive_seed(plan.seed, "bpd", b) and is written atomically
    to OUT/batches/batch-BBBBBB.json (nll, stderr per row, nfe, seconds); a rerun keeps the batches
    on disk and computes the others. OUT/plan.json pins the plan: another plan is refused. Returns
    (and writes to OUT/bpd.json) the summary: mean bpd and nll, their standard error over the data,
    the trace estimator's share of it, mean NFE per batch and seconds of model time.
    """
    if not isinstance(plan, EvalPlan):
        raise TypeError(f"plan must be an EvalPlan, got {type(plan).__name__}")
    _check_model_and_bridge(model, bridge)
    for name in ("n", "batch"):
        checks.count(name, getattr(plan, name), 1)
    for name in ("seed", "exact_dims", "model_step"):
        checks.count(name, getattr(plan, name), 0)
    checks.count("probes", plan.probes, 2)
    for name in ("T_end", "rtol", "atol"):
        checks.interval(name, getattr(plan, name), 0.0, 1.0, open_lo=True)
    if plan.levels is not None:
        checks.count("levels", plan.levels, 2)
    x = _check_data("x", x)
    if x.shape[0] != plan.n:
        raise ValueError(f"x must hold plan.n = {plan.n} rows, got {x.shape[0]}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} is an existing file; expected a folder (created if missing)")
    wanted = asdict(plan)
    plan_file = out / PLAN
    if plan_file.is_file():
        try:
            found = read_json(plan_file, "likelihood plan")
        except ValueError as err:
            raise ValueError(f"{err}; remove the folder or pick another") from err
        if found != wanted:
            diff = sorted(k for k in wanted if found.get(k) != wanted[k])
            raise ValueError(f"{str(out)!r} holds an evaluation with other settings ({', '.join(diff)} "
                             f"differ); pick another folder or remove it")
    else:
        write_atomic(plan_file, lambda f: f.write(json.dumps(wanted, indent=1).encode()))
    batches = math.ceil(plan.n / plan.batch)
    bar = progress_bar(total=plan.n, desc="bpd", unit="sample", disable=not progress)
    records = []
    for b in range(batches):
        rows = slice(b * plan.batch, min(plan.n, (b + 1) * plan.batch))
        path = out / RESULTS / f"batch-{b:06d}.json"
        record = _read_record(path, rows.stop - rows.start)
        if record is None:
            result = likelihood(model, bridge, x[rows], T_end=plan.T_end, rtol=plan.rtol, atol=plan.atol,
                                exact_dims=plan.exact_dims, probes=plan.probes, levels=plan.levels,
                                seed=derive_seed(plan.seed, "bpd", b), progress=progress)
            record = {"nll": result.nll.tolist(), "stderr": result.stderr.tolist(), "nfe": result.nfe,
                      "seconds": result.seconds, "dims": result.dims, "exact_trace": result.exact_trace}
            write_atomic(path, lambda f, r=record: f.write(json.dumps(r).encode()))
        records.append(record)
        bar.update(rows.stop - rows.start)
    bar.close()
    summary = _summary(records, plan)
    write_atomic(out / SUMMARY, lambda f: f.write(json.dumps(summary, indent=1).encode()))
    return summary


def _read_record(path: Path, rows: int) -> dict | None:
    """A finished batch's record, or None when missing or unusable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        record = read_json(path, "likelihood batch record")
        ok = len(record["nll"]) == rows and len(record["stderr"]) == rows and record["nfe"] >= 1
    except (ValueError, KeyError, TypeError):
        return None
    return record if ok and all(math.isfinite(v) for v in record["nll"]) else None


def _summary(records: list[dict], plan: EvalPlan) -> dict:
    nll = torch.tensor([v for r in records for v in r["nll"]], dtype=torch.float64)
    trace_se = torch.tensor([v for r in records for v in r["stderr"]], dtype=torch.float64)
    dims = records[0]["dims"]
    to_bits = 1 / (dims * math.log(2))
    n = nll.numel()
    spread = nll.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return {
        "bpd": nll.mean().item() * to_bits, "bpd_stderr": spread * to_bits,
        "nll": nll.mean().item(), "nll_stderr": spread,
        "trace_stderr": trace_se.pow(2).sum().sqrt().item() / n,
        "n": n, "dims": dims, "exact_trace": records[0]["exact_trace"],
        "nfe_mean": sum(r["nfe"] for r in records) / len(records),
        "seconds": sum(r["seconds"] for r in records), "plan": asdict(plan),
    }


def data_levels(spec: str) -> int | None:
    """The levels of a data spec's values in [-1, 1]: 17 for "digits" (0..16), 256 for 8-bit image
    folders and CIFAR-10, None (continuous) for the toy sets and tensor files."""
    if spec == "digits":
        return 17
    if spec.startswith(("images:", "cifar10:")):
        return 256
    return None


def evaluate_run(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str = "test",
    n: int | None = None,
    batch: int = 200,
    seed: int = 0,
    T_end: float = T_END_LIKELIHOOD,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    exact_dims: int = 16,
    probes: int = 4,
    levels: int | None | str = "auto",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """bits/dim of a training run's model on its data's `split` (held out: "test"), resumable in OUT.

    n: the number of points (None: the whole split; generated toy sets need it, default 1000).
    levels: "auto" (`data_levels` of the run's data), None (continuous) or an int >= 2. A
    class-conditional model is evaluated unconditionally (its null class). Other arguments as in
    `likelihood` and `evaluate_bpd`; returns the summary written to OUT/bpd.json.
    """
    from .data import load_data
    from .pretrained import load_trained

    batch = checks.count("batch", batch, 1)
    trained = load_trained(checkpoint, device=device)
    spec = trained.config.data
    source = load_data(spec, split=split, seed=seed)
    if n is None and source.size is None:
        n = 1000
    x, _ = source.all(n)
    levels = data_levels(spec) if levels == "auto" else levels
    plan = EvalPlan(source=f"{spec}:{split}", n=x.shape[0], batch=batch, seed=seed, T_end=T_end, rtol=rtol,
                    atol=atol, exact_dims=exact_dims, probes=probes, levels=levels, model_step=trained.step)
    model_device = next(trained.model.parameters()).device
    return evaluate_bpd(trained.model, trained.bridge, x.to(model_device), plan, out, progress=progress)
