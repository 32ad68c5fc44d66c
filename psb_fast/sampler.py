"""PhaseSampler: few-NFE sampling of phase-space models with the fused step kernels (docs/math.md §10).

The loop is flat: evaluate F at each grid time, then one fused in-place update of m = [x | v]
(exponential multistep for "ode"; exact-noise, Euler-Maruyama or compat SSCS steps for SDE
models). All per-step coefficients are built once, in float64, when the sampler is made.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from functools import partial
from numbers import Real

import torch

from . import checks
from .backends import STORAGE_DTYPES, backend_name, real_scalar, resolve_backend, warn_once
from .bridge import PhaseBridge, split_phase
from .defaults import default_setting
from .grids import GRID_NAMES, PUBLISHED_GRID, explicit_grid, parse_grid
from .guidance import StrokeGuide
from .hooks import Guidance, record_trajectory, report_to
from .loop import Hooks, ModelCall, check_finite, integrate
from .loop import raise_first_nonfinite as _raise_first_nonfinite
from .multistep import MAX_ORDER
from .ops.phase_step import _phase_step_unchecked, _scaled_hop_unchecked
from .progress import progress_bar
from .seeds import resolve_seed
from .settings import (
    PUBLISHED_ORDER,
    PUBLISHED_Q,
    PUBLISHED_T,
    T_END,
    Setting,
    load_tuned,
    published_T,
)
from .solvers import graph_noise, make_plan, seeded_noise, solver_step, sscs_first_half
from .variants import VARIANTS, Steps, step_rows, step_tables

SOLVERS = ("ode", "sde", "em", "sscs")
GRIDS = GRID_NAMES
# Upper bound on nfe: the coefficient tables take ~24 quadrature nodes per step (tens of MB of
# float64 temporaries at 10_000 steps, ~1 s to build), and no few-step sampler needs more.
MAX_NFE = 10_000
#: T without the hop (the last grid time; a final step then runs to T_END).
NO_HOP_T = 0.99
#: The constructor's arguments after `setting`, in their old positional order (still accepted).
_OLD_POSITIONAL = ("t0", "order", "grid", "hop", "solver", "backend", "cuda_graph", "variant")
# T_END, published_T and the published settings live in psb_fast.settings, the grids in
# psb_fast.grids; the names stay importable from here.
__all__ = ["GRIDS", "MAX_NFE", "PUBLISHED_GRID", "PUBLISHED_ORDER", "PUBLISHED_T", "SOLVERS", "T_END",
           "PhaseSampler", "published_T"]


class PhaseSampler:
    """Few-NFE sampler for a model F = model(m, t[, cond]) trained on `bridge`.

    nfe: network evaluations, an int in [1, MAX_NFE = 10_000] (the per-step coefficient tables
    are built at construction). setting: a `psb_fast.settings.Setting` (hop time T, grid power q
    and free fractions, order 0..3, variant; docs/math.md §7.4, §10), or None for the defaults:
    with solver="ode" and hop=True `psb_fast.defaults.default_setting(nfe)` (psb_fast/defaults.json),
    otherwise the published family (q = 2, order 2 for "ode", 0 for the SDE solvers, variant
    "multistep") at T = published_T(nfe) (hop) or NO_HOP_T = 0.99 (no hop). Change a field with
    `Setting.replace`: `PhaseSampler(bridge, 10, default_setting(10).replace(order=2))`;
    `published_setting(nfe)` reproduces the published sampler.
    t0: first grid time, a real number in [0, 1). hop: a bool, output the x1 estimate at T
    instead of x at 0.999 (then T < 0.999 and a final step runs from T to 0.999). solver: "ode"
    (probODE models), or "sde" (exact noise), "em", "sscs" (SDE models: variant "multistep",
    order 0). backend: "auto", "triton", "cpu" or "float64" ("reference", its old name, warns).
    cuda_graph: on CUDA, capture the whole loop (model included; it must be capturable: no host
    syncs, static shapes) in a CUDA graph on the first sample() call per (model, cond, m0
    shape/dtype/device) and replay it after.

    Old spellings, kept working with a FutureWarning that names the new one: T=, order=, grid=
    (a name, "tuned" = "default", or the nfe grid times themselves) and variant= set those fields
    of the default setting of this solver and hop (`Setting.replace`); T, order and grid given
    together (or grid times) with no variant mean variant "multistep", as before.

    Every argument is checked here, before any table is built (ValueError for bad values,
    TypeError for bad types, each naming the argument); sample() checks its own arguments
    before the first model call.
    """

    def __init__(
        self,
        bridge: PhaseBridge,
        nfe: int = 10,
        setting: Setting | None = None,
        *args: object,
        t0: float = 1e-5,
        hop: bool = True,
        solver: str = "ode",
        backend: str = "auto",
        cuda_graph: bool = False,
        T: float | None = None,
        order: int | None = None,
        grid: str | Sequence[float] | torch.Tensor | None = None,
        variant: str | None = None,
    ) -> None:
        if not isinstance(bridge, PhaseBridge):
            raise TypeError(f"bridge must be a PhaseBridge, got {type(bridge).__name__}")
        nfe = checks.count("nfe", nfe, 1, MAX_NFE)
        if args:  # the old positional order: (T, t0, order, grid, hop, solver, backend, cuda_graph, variant)
            if len(args) > len(_OLD_POSITIONAL):
                raise TypeError(f"PhaseSampler takes at most {3 + len(_OLD_POSITIONAL)} positional arguments")
            warn_once("PhaseSampler's arguments after `setting` are keyword-only: pass t0=, hop=, solver=, "
                      "backend=, ... by name")
            given = dict(zip(_OLD_POSITIONAL, args, strict=False))
            t0, hop = given.get("t0", t0), given.get("hop", hop)
            solver, backend = given.get("solver", solver), given.get("backend", backend)
            cuda_graph = given.get("cuda_graph", cuda_graph)
            order, grid = given.get("order", order), given.get("grid", grid)
            variant = given.get("variant", variant)
        if setting is not None and not isinstance(setting, Setting):
            if isinstance(setting, bool) or not isinstance(setting, (Real, torch.Tensor)):
                raise TypeError(f"setting must be a psb_fast.settings.Setting or None, got "
                                f"{type(setting).__name__}")
            setting, T = None, setting  # the old third positional argument, T
        checks.flag("hop", hop)
        checks.flag("cuda_graph", cuda_graph)
        checks.choice("solver", solver, SOLVERS)
        backend = backend_name(backend)
        expected_mode = "probODE" if solver == "ode" else "SDE"
        if bridge.mode != expected_mode:
            raise ValueError(
                f"solver={solver!r} needs a bridge with mode={expected_mode!r}, got mode={bridge.mode!r}"
            )
        t0 = real_scalar("t0", t0)
        if not (math.isfinite(t0) and 0 <= t0 < 1):
            raise ValueError(f"t0 must be in [0, 1), got {t0!r}")
        base, base_kind = _family_default(nfe, solver, hop)
        old = {k: v for k, v in (("T", T), ("order", order), ("grid", grid), ("variant", variant))
               if v is not None}
        times = None
        if setting is not None and old:
            raise ValueError(f"pass either setting or the old keywords {sorted(old)}, not both")
        if setting is None and not old:
            setting, grid_kind = base, base_kind
        elif setting is not None:
            is_default = setting == base and base_kind == "default"
            grid_kind = "default" if is_default else (setting.grid_name or "free")
        else:
            setting, grid_kind, times = _from_old_keywords(base, base_kind, nfe, t0, old)
        if setting.variant != VARIANTS[0] and solver != "ode":
            raise ValueError(f"variant={setting.variant!r} applies to solver='ode' only, got "
                             f"solver={solver!r}")
        if solver != "ode" and setting.order != 0:
            raise ValueError(f"order applies to solver='ode' only; got order={setting.order} for {solver!r}")
        upper = 1.0 if hop else T_END
        if not t0 < setting.T < upper:
            raise ValueError(f"T must be in (t0, {upper}) = ({t0}, {upper}), got {setting.T!r}")
        if times is None:
            setting.check(nfe, t0)
            times = setting.grid(nfe, t0)
        self.bridge, self.nfe, self.t0, self.setting = bridge, nfe, float(t0), setting
        self.T, self.order, self.variant = setting.T, setting.order, setting.variant
        self.hop, self.grid_kind, self.grid = hop, grid_kind, times
        self.solver, self.backend, self.cuda_graph = solver, backend, cuda_graph
        self._graphs: dict[tuple, tuple] = {}
        self._grid_cache: dict[tuple, torch.Tensor] = {}
        t_end = None if hop else T_END
        # One table cache for every variant and solver (psb_fast.variants); the SDE solvers use the
        # order-0 multistep integrals.
        name, order_used = (self.variant, self.order) if solver == "ode" else (VARIANTS[0], 0)
        self.tables = step_tables(bridge, self.grid, order_used, name, t_end)
        # The loop's per-step scalars and hop weights, float64, once (psb_fast.solvers.StepPlan).
        self._plan = make_plan(bridge, self.grid, self.tables, solver)
        self._rows = step_rows([self.tables], order_used) if solver == "ode" else None

    @classmethod
    def from_tuned(cls, path: str | os.PathLike, bridge: PhaseBridge, nfe: int, **kwargs) -> PhaseSampler:
        """A sampler with the setting `psb_fast.tune` / `psb-fast tune` saved for this NFE.

        path: the JSON written by psb_fast.settings.save_tuned; kwargs: the other constructor
        arguments (t0, backend, ...; not the setting or its fields, which come from the file)."""
        for key in ("setting", "T", "order", "grid", "variant"):
            if key in kwargs:
                raise ValueError(f"from_tuned takes {key} from the file; do not pass {key}={kwargs[key]!r}")
        entries = load_tuned(path)
        if nfe not in entries:
            raise ValueError(f"nfe={nfe!r} is not in {os.fspath(path)!r}; tuned NFEs: {sorted(entries)}")
        return cls(bridge, nfe, Setting.from_json(entries[nfe]), **kwargs)

    def __repr__(self) -> str:
        return (
            f"PhaseSampler(nfe={self.nfe}, T={self.T}, t0={self.t0}, order={self.order}, "
            f"grid={self.grid_kind!r}, hop={self.hop}, solver={self.solver!r}, backend={self.backend!r}, "
            f"cuda_graph={self.cuda_graph}, variant={self.variant!r})"
        )

    @torch.no_grad()
    def sample(
        self,
        model: Callable[..., torch.Tensor],
        m0: torch.Tensor,
        cond: object | None = None,
        seed: int | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
        callback: Callable[[dict], None] | None = None,
        guide: StrokeGuide | None = None,
    ):
        """Integrate from m0 ([B, 2C, ...], e.g. bridge.sample_prior) and return x1 ([B, C, ...]).

        model(m, t) -> F (or model(m, t, cond) when cond is given, e.g. class labels [B]), F of
        x's shape in normalized units, t a [B] tensor on m's device in m's dtype. seed: noise
        seed of the SDE solvers and of the guide's velocity draws (None draws one). guide: a
        psb_fast.guidance.StrokeGuide for stroke-guided generation or inpainting. With
        return_trajectory=True also returns a list of snapshots {"t", "x", "v", "x1_hat"} (one
        per NFE). callback receives {"i", "t", "m", "F"} after each evaluation. Runs without
        autograd (torch.no_grad), so a model in training mode or with trainable weights is fine.

        F may share memory with its input m (e.g. be a view of it): the sampler then keeps a
        copy, so the result is that of a model returning copies. The model must not write to m,
        nor to an output it returned earlier that the multistep still reads: such a write is
        caught through torch's version counter (ValueError), except writes that do not bump it
        (e.g. a CUDA-graph replay into a static output tensor, or any write under
        torch.inference_mode, whose tensors keep no counter): return a new tensor per call.
        model, callback, return_trajectory, progress, seed and guide are checked before the
        first model call. Raises ValueError naming the step when m0, a model output, the state
        after an update or the returned sample holds NaN or Inf (on the CPU at once; on
        accelerators through device flags read once after the loop).
        """
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {callback!r}")
        for name, flag in (("return_trajectory", return_trajectory), ("progress", progress)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        seed = resolve_seed(seed)
        if guide is not None and not isinstance(guide, StrokeGuide):
            raise TypeError(f"guide must be a StrokeGuide or None, got {type(guide).__name__}")
        if self.cuda_graph:
            if return_trajectory or callback is not None or guide is not None or progress:
                raise ValueError(
                    "cuda_graph=True replays one captured loop: return_trajectory, callback, guide and "
                    "progress are not available with it"
                )
            return self._sample_graphed(model, m0, cond)
        trajectory: list[dict] | None = [] if return_trajectory else None
        from .threads import api_threads

        with api_threads(m0):  # one thread for small calls unless the caller set the count
            x1, finite = self._run(model, m0, cond, seed=seed, guide=guide, progress=progress,
                                   callback=callback, trajectory=trajectory)
        _raise_first_nonfinite(finite)
        return (x1, trajectory) if return_trajectory else x1

    def _run(
        self, model, m0: torch.Tensor, cond, *, seed: int, guide: StrokeGuide | None = None,
        progress: bool = False, callback: Callable[[dict], None] | None = None,
        trajectory: list[dict] | None = None, graphed: bool = False,
    ) -> tuple[torch.Tensor, list[tuple]]:
        """One sampling run (docs/math.md §10.3) -> (x1 in m0's dtype, the finiteness flags).

        The loop is `psb_fast.loop.integrate`; this puts its pieces together: the checked model
        call, the solver's step (`psb_fast.solvers`) and the hooks the arguments ask for
        (`_hooks`). Everything is checked before the first model call; on accelerators the
        finiteness flags stay on the device and the caller reads them once, after the loop.
        """
        plan, finite = self._plan, []  # finite: (i, t, device flag, kind)
        m = self._initial_state(m0)  # m_0 = [x_0 | v_0], float32
        check_finite(m, finite, 0, self.t0, "m0")
        backend = resolve_backend(self.backend, m)
        C = m.shape[1] // 2
        views = (m.narrow(1, 0, C), m.narrow(1, C, C)) if backend == "cpu" else None  # (x, v), made once
        noise = graph_noise if graphed else seeded_noise(seed)
        hooks, bar = self._hooks(m, finite, backend, noise, views, seed=seed, guide=guide, callback=callback,
                                 trajectory=trajectory, progress=progress)
        # F_i = model(m_i, t_i), checked; on the CPU with no hook reading F_i before its step, the
        # state check after the step covers F_i's finiteness (see ModelCall).
        check_from = plan.n_steps if m.is_cpu and not hooks.after_eval else 0
        evaluate = ModelCall(model, cond, self._device_grid(m0.dtype, m0.device, m.shape[0]), m0.dtype, m,
                             finite, plan.t_eval, check_from)
        hooks.after_step.append(partial(_check_state, finite, plan.t_eval, evaluate))
        if self._rows is None:
            step, correct = solver_step(plan, self.solver, backend, noise, views), None
        else:  # every variant: psb_fast.variants.Steps on the fused phase_step
            rows, estimates = self._rows
            steps = Steps(rows, self.order, partial(_phase_step_unchecked, backend=backend, views=views),
                          estimates, partial(_scaled_estimate, backend=backend, views=views), plan.t_eval)
            step, correct = steps.step, steps.correct
        try:
            F = integrate(m, evaluate=evaluate, step=step, nfe=self.nfe, n_steps=plan.n_steps, hooks=hooks,
                          correct=correct)
        finally:
            if bar is not None:
                bar.close()
        x1 = plan.hop(m, F, backend, views) if self.hop else split_phase(m)[0]  # a_F F + a_x x + a_v v at T
        if x1.dtype != m0.dtype:
            x1 = x1.to(m0.dtype)
        check_finite(x1, finite, self.nfe - 1, plan.T_hop, "x1")
        return x1, finite

    def _hooks(
        self, m: torch.Tensor, finite: list[tuple], backend: str, noise, views, *, seed: int,
        guide: StrokeGuide | None, callback: Callable[[dict], None] | None, trajectory: list[dict] | None,
        progress: bool,
    ) -> tuple[Hooks, object | None]:
        """The run's hooks and its progress bar (None without progress). Before each evaluation:
        SSCS's first half step, the guide's velocity redraw; after it: the bar, the callback, the
        trajectory snapshot, inpainting's x1 estimate; after each step: the state's finiteness
        check (added by `_run`). The guide's init-v acts on m here, once."""
        plan = self._plan
        hooks = Hooks()
        if self.solver == "sscs":
            hooks.before_eval.append(sscs_first_half(plan, backend, noise, views))
        guidance = Guidance(guide, m, plan, backend, seed) if guide is not None else None
        bar = progress_bar(total=self.nfe, desc="PhaseSampler", unit="eval") if progress else None
        if bar is not None:
            hooks.after_eval.append(lambda i, m, F: bar.update())
        if callback is not None:
            hooks.after_eval.append(report_to(callback, plan))
        if trajectory is not None:
            hooks.after_eval.append(record_trajectory(trajectory, plan, backend))
        if guidance is not None:
            guidance.add_to(hooks)
        return hooks, bar

    def _device_grid(self, dtype: torch.dtype, device: torch.device, batch: int) -> list[torch.Tensor]:
        """The evaluation times (the grid; SSCS: its steps' midpoints), one [batch] tensor (a view)
        per evaluation on `device` in `dtype`, made once per (dtype, device, batch): no host-to-device
        copy per call (none may happen inside a CUDA-graph capture) and no op per step."""
        key = (dtype, device, batch)
        if key not in self._grid_cache:
            if len(self._grid_cache) >= 16:
                self._grid_cache.clear()
            times = torch.tensor(self._plan.t_eval, dtype=torch.float64).to(device=device, dtype=dtype)
            self._grid_cache[key] = [t.expand(batch) for t in times]
        return self._grid_cache[key]

    def _sample_graphed(self, model, m0: torch.Tensor, cond) -> torch.Tensor:
        """Capture the whole loop (model included) in a CUDA graph once per (model, cond, shape,
        dtype, device), then replay it: one launch per sample() call. SDE noise is drawn inside the
        graph from torch's CUDA generator, so every replay gets fresh numbers (seed is unused)."""
        if m0.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs m0 on a CUDA device, got {m0.device}")
        key = (id(model), id(cond), tuple(m0.shape), m0.dtype, m0.device)
        if key not in self._graphs:
            static_in = m0.detach().clone()
            side = torch.cuda.Stream(device=m0.device)
            side.wait_stream(torch.cuda.current_stream(m0.device))
            with torch.cuda.stream(side):  # warm-up outside the capture (allocator, autotuning)
                self._run(model, static_in, cond, seed=0, graphed=True)
            torch.cuda.current_stream(m0.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out, finite = self._run(model, static_in, cond, seed=0, graphed=True)
            self._graphs[key] = (graph, static_in, out, finite)
        graph, static_in, out, finite = self._graphs[key]
        static_in.copy_(m0)
        graph.replay()
        _raise_first_nonfinite(finite)
        return out.clone()

    def _initial_state(self, m0: torch.Tensor) -> torch.Tensor:
        if not isinstance(m0, torch.Tensor):
            raise TypeError(f"m0 must be a torch.Tensor, got {type(m0).__name__}")
        if m0.dim() < 2 or m0.shape[1] % 2 or m0.shape[0] < 1:
            raise ValueError(f"m0 must be [B, 2C, ...] with B >= 1 and an even dim 1, got {tuple(m0.shape)}")
        if not m0.dtype.is_floating_point:
            raise TypeError(f"m0 must be a floating tensor, got {m0.dtype}")
        # The state is kept in float32 (16-bit states would round away the small steps).
        state_dtype = torch.float32 if m0.dtype in STORAGE_DTYPES or m0.dtype == torch.float64 else None
        if state_dtype is None:
            raise TypeError(f"m0 dtype must be float64, float32, bfloat16 or float16, got {m0.dtype}")
        return m0.to(state_dtype, copy=True).contiguous()


def _check_state(
    finite: list[tuple], t_eval: Sequence[float], outputs: ModelCall, i: int, m: torch.Tensor
) -> None:
    """After step i: the state is finite (it overflows float32 when a model output is too large).
    A non-finite state on the CPU is laid on the step's model output F_i first when F_i holds
    NaN or Inf (its own check may have been left to here, `ModelCall`)."""
    try:
        check_finite(m, finite, i, t_eval[i], "state")
    except ValueError:
        check_finite(outputs.last, finite, i, t_eval[i], "model")
        raise


def _scaled_estimate(m: torch.Tensor, F: torch.Tensor, weights: tuple, *, backend: str,
                     views) -> torch.Tensor:
    """The data form's source Y~ = F + r_x x + r_v v (weights (1, r_x, r_v); psb_fast.variants)."""
    return _scaled_hop_unchecked(m, F, weights[1], weights[2], backend, views)


def _family_default(nfe: int, solver: str, hop: bool) -> tuple[Setting, str]:
    """(the default setting, its grid's name) of a solver and hop: the package defaults for the
    probability flow with the hop, else the published family (module docstring of PhaseSampler)."""
    if solver == "ode" and hop:
        return default_setting(nfe), "default"
    T = published_T(nfe) if hop else NO_HOP_T
    return Setting(float(T), PUBLISHED_Q, PUBLISHED_ORDER if solver == "ode" else 0), PUBLISHED_GRID


def _from_old_keywords(
    base: Setting, base_kind: str, nfe: int, t0: float, old: dict
) -> tuple[Setting, str, torch.Tensor | None]:
    """(setting, grid kind, explicit times or None) from the old keywords T, order, grid, variant,
    each warned about once: they replace fields of the family default `base`; T, order and grid
    all given (grid times fix T) with no variant mean "multistep", as before."""
    for key in old:
        spelling = "grid times" if key == "grid" and not isinstance(old[key], str) else f"{key}="
        warn_once(f"PhaseSampler({spelling}...) is deprecated: pass a Setting, e.g. "
                  f"PhaseSampler(bridge, nfe, default_setting(nfe).replace(...)) or published_setting(nfe)")
    return _fill_family(base, base_kind, nfe, t0, old)


def setting_from_fields(
    nfe: int, *, solver: str = "ode", hop: bool = True, T: float | None = None, order: int | None = None,
    grid: str | None = None, variant: str | None = None,
) -> Setting:
    """The Setting that the fields given (not None) make with the rest from the family default of
    (solver, hop): the package defaults for the probability flow with the hop, else the published
    family. T, order and grid all given with no variant mean the published "multistep" update.
    grid is a name ("default", "rev-quad", "uniform", "power-<q>"). This is how the CLI's --T,
    --order, --grid and --variant become the sampler's setting."""
    checks.count("nfe", nfe, 1, MAX_NFE)
    if grid is not None and not isinstance(grid, str):
        raise TypeError(f"grid must be a grid name here, got {type(grid).__name__}")
    base, base_kind = _family_default(nfe, solver, hop)
    fields = (("T", T), ("order", order), ("grid", grid), ("variant", variant))
    old = {k: v for k, v in fields if v is not None}
    return _fill_family(base, base_kind, nfe, 1e-5, old)[0]


def _fill_family(
    base: Setting, base_kind: str, nfe: int, t0: float, old: dict
) -> tuple[Setting, str, torch.Tensor | None]:
    """`_from_old_keywords` without the warning."""
    changes: dict = {}
    grid_kind, times = base_kind, None
    grid = old.get("grid")
    if isinstance(grid, str):
        kind, q = parse_grid(grid)
        if kind == "tuned":
            warn_once("grid='tuned' is now called grid='default' (the package defaults' grid)")
        if kind in ("tuned", "default"):
            default = default_setting(nfe)
            changes.update(q=default.q, fractions=default.fractions if default.fractions is None
                           or len(default.fractions) == nfe else None)
            grid_kind = "default"
        else:
            changes.update(q=1.0 if kind == "uniform" else q, fractions=None)
            grid_kind = grid
    elif grid is not None:
        times = explicit_grid(grid, nfe, t0)
        T = old.get("T")
        last = float(times[-1])
        if T is not None and not math.isclose(real_scalar("T", T), last, rel_tol=0, abs_tol=1e-12):
            raise ValueError(f"T={T!r} disagrees with the given grid's last time {float(times[-1])!r}")
        changes["T"] = float(times[-1])
        if nfe >= 2:
            span = float(times[-1]) - float(times[0])
            changes.update(q=1.0, fractions=tuple((float(t) - float(times[0])) / span for t in times))
            changes["fractions"] = (0.0, *changes["fractions"][1:-1], 1.0)
        grid_kind = "explicit"
    if "T" in old and "T" not in changes:
        changes["T"] = checks.finite("T", old["T"])
    if "order" in old:
        changes["order"] = checks.count("order", old["order"], 0, MAX_ORDER)
    full = grid is not None and ("T" in old or times is not None) and "order" in old
    if "variant" in old:
        changes["variant"] = checks.choice("variant", old["variant"], VARIANTS)
    elif full:
        changes["variant"] = VARIANTS[0]
    return base.replace(**changes), grid_kind, times
