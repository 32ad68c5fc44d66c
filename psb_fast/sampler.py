"""PhaseSampler: few-NFE sampling of phase-space models with the fused step kernels (docs/math.md §10).

The loop is flat: evaluate F at each grid time, then one fused in-place update of m = [x | v]
(exponential multistep for "ode"; exact-noise, Euler-Maruyama or compat SSCS steps for SDE
models). All per-step coefficients are built once, in float64, when the sampler is made.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable, Sequence
from functools import lru_cache, partial

import torch
from tqdm.auto import tqdm

from .backends import BACKENDS, STORAGE_DTYPES, real_scalar, resolve_backend
from .bridge import PhaseBridge, split_phase
from .defaults import default_setting, make_grid
from .grids import GRID_NAMES, PUBLISHED_GRID, explicit_grid
from .guidance import StrokeGuide
from .hooks import Guidance, record_trajectory, report_to
from .loop import Hooks, ModelCall, check_finite, integrate
from .loop import raise_first_nonfinite as _raise_first_nonfinite
from .multistep import MultistepCoefficients, multistep_coefficients
from .ops.phase_step import _phase_step_unchecked
from .settings import PUBLISHED_ORDER, PUBLISHED_T, T_END, Setting, published_setting, published_T
from .solvers import graph_noise, make_plan, seeded_noise, solver_step, sscs_first_half
from .tuning import load_tuned
from .variant_tables import VariantTables, variant_tables
from .variants import VARIANTS, VariantSteps, scalar_rows, variant_form

SOLVERS = ("ode", "sde", "em", "sscs")
GRIDS = GRID_NAMES
# Upper bound on nfe: the coefficient tables take ~24 quadrature nodes per step (tens of MB of
# float64 temporaries at 10_000 steps, ~1 s to build), and no few-step sampler needs more.
MAX_NFE = 10_000
# T_END, published_T and the published settings live in psb_fast.settings, the grids in
# psb_fast.grids; the names stay importable from here.
__all__ = ["GRIDS", "MAX_NFE", "PUBLISHED_GRID", "PUBLISHED_ORDER", "PUBLISHED_T", "SOLVERS", "T_END",
           "PhaseSampler", "make_grid", "published_T"]


@lru_cache(maxsize=64)
def _cached_coefficients(
    bridge_key: tuple, grid: tuple[float, ...], order: int, t_end: float | None
) -> MultistepCoefficients:
    return multistep_coefficients(
        PhaseBridge(*bridge_key), torch.tensor(grid, dtype=torch.float64), order, t_end
    )


@lru_cache(maxsize=64)
def _cached_variant_tables(
    bridge_key: tuple, grid: tuple[float, ...], order: int, t_end: float | None, form: str
) -> VariantTables:
    grid_t = torch.tensor(grid, dtype=torch.float64)
    return variant_tables(PhaseBridge(*bridge_key), grid_t, order, form, t_end)


class PhaseSampler:
    """Few-NFE sampler for a model F = model(m, t[, cond]) trained on `bridge`.

    nfe: network evaluations, an int in [1, MAX_NFE = 10_000] (the per-step coefficient tables
    are built at construction). T: last grid time (the hop time with hop=True; with hop=False
    a final step runs from T to 0.999). t0: first grid time. T and t0 are real numbers or
    one-element real tensors. order: multistep order 0..3 ("ode" only). grid: "tuned",
    "rev-quad", "uniform", "power-<q>", or the nfe grid times themselves (an increasing sequence
    from t0 to T). hop: a bool, output the x1 estimate at T instead of x at 0.999.
    solver: "ode" (probODE models), or "sde" (exact noise), "em", "sscs" (SDE models).
    variant: the "ode" solver's variant (docs/math.md §7.4, psb_fast.variants): "multistep" (the
    published F-form multistep), "data" (extrapolates the hop's x1 estimate), "multistep-corrector"
    or "data-corrector" (plus a UniPC-style corrector that reuses the next evaluation).
    backend: "auto", "triton", "cpu" or "reference". cuda_graph: on CUDA, capture the whole
    loop (model included; it must be capturable: no host syncs, static shapes) in a CUDA graph
    on the first sample() call per (model, cond, m0 shape/dtype/device) and replay it after.

    Defaults (None): with solver="ode" and hop=True, T, order and grid take the per-NFE
    package defaults, `psb_fast.defaults.default_setting(nfe)` (psb_fast/defaults.json;
    benchmarks/results/defaults_study/); otherwise T is the published one (hop) or 0.99 (no hop),
    order 2 ("ode") and grid "rev-quad". variant=None is the default's variant when T, order and
    grid are all None (and solver="ode", hop=True), else "multistep". order=2, grid="rev-quad",
    T=published_T(nfe) and variant="multistep", i.e.
    `**psb_fast.settings.published_setting(nfe).sampler_kwargs()`, reproduce the published sampler.

    Every argument is checked here, before any table is built (ValueError for bad values,
    TypeError for bad types, each naming the argument); sample() checks its own arguments
    before the first model call.
    """

    def __init__(
        self,
        bridge: PhaseBridge,
        nfe: int = 10,
        T: float | None = None,
        t0: float = 1e-5,
        order: int | None = None,
        grid: str | Sequence[float] | torch.Tensor | None = None,
        hop: bool = True,
        solver: str = "ode",
        backend: str = "auto",
        cuda_graph: bool = False,
        variant: str | None = None,
    ) -> None:
        if not isinstance(bridge, PhaseBridge):
            raise TypeError(f"bridge must be a PhaseBridge, got {type(bridge).__name__}")
        nfe = _count("nfe", nfe, 1, MAX_NFE)
        if not isinstance(hop, bool):
            raise TypeError(f"hop must be a bool, got {hop!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        expected_mode = "probODE" if solver == "ode" else "SDE"
        if bridge.mode != expected_mode:
            raise ValueError(
                f"solver={solver!r} needs a bridge with mode={expected_mode!r}, got mode={bridge.mode!r}"
            )
        t0 = real_scalar("t0", t0)
        if not (math.isfinite(t0) and 0 <= t0 < 1):
            raise ValueError(f"t0 must be in [0, 1), got {t0!r}")
        tuned = solver == "ode" and hop
        default = default_setting(nfe) if tuned else published_setting(nfe)
        if variant is None:
            fully_default = tuned and T is None and order is None and grid is None
            variant = default.variant if fully_default else VARIANTS[0]
        if not isinstance(variant, str) or variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant != VARIANTS[0] and solver != "ode":
            raise ValueError(f"variant={variant!r} applies to solver='ode' only, got solver={solver!r}")
        if T is not None:
            T = real_scalar("T", T)
        explicit = grid is not None and not isinstance(grid, str)
        if explicit:
            times = explicit_grid(grid, nfe, float(t0))
            if T is not None and not math.isclose(float(T), float(times[-1]), rel_tol=0, abs_tol=1e-12):
                raise ValueError(f"T={T!r} disagrees with the given grid's last time {float(times[-1])!r}")
            T = float(times[-1])
        if T is None:
            T = default.T if hop else 0.99
        upper = 1.0 if hop else T_END
        if not (math.isfinite(T) and t0 < T < upper):
            raise ValueError(f"T must be in (t0, {upper}) = ({t0}, {upper}), got {T!r}")
        if order is None:
            order = default.order if solver == "ode" else 0
        order = _count("order", order, 0, 3)
        if solver != "ode" and order != 0:
            raise ValueError(f"order applies to solver='ode' only; got order={order} for {solver!r}")
        if grid is None:
            grid = "tuned" if tuned else PUBLISHED_GRID
        self.bridge, self.nfe, self.T, self.t0 = bridge, nfe, float(T), float(t0)
        self.order, self.hop, self.variant = order, bool(hop), variant
        self.grid_kind = "explicit" if explicit else grid
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {cuda_graph!r}")
        self.solver, self.backend, self.cuda_graph = solver, backend, cuda_graph
        self._graphs: dict[tuple, tuple] = {}
        self._grid_cache: dict[tuple, torch.Tensor] = {}
        self.grid = times if explicit else make_grid(grid, nfe, self.t0, self.T)
        t_end = None if self.hop else T_END
        self.coefficients = _cached_coefficients(
            bridge.key(), tuple(self.grid.tolist()), order, t_end
        )
        # The loop's per-step scalars and hop weights, float64, once (psb_fast.solvers.StepPlan).
        self._plan = make_plan(bridge, self.grid, self.coefficients, solver, order)
        self._variant_rows = None
        if variant != VARIANTS[0]:
            form, corrector = variant_form(variant)
            tables = _cached_variant_tables(bridge.key(), tuple(self.grid.tolist()), order, t_end, form)
            self._variant_rows = scalar_rows(tables, order, corrector)

    @classmethod
    def from_tuned(cls, path: str | os.PathLike, bridge: PhaseBridge, nfe: int, **kwargs) -> PhaseSampler:
        """A sampler with the settings `psb_fast.tune` / `psb-fast tune` saved for this NFE.

        path: the JSON written by psb_fast.tuning.save_tuned; kwargs: the other constructor
        arguments (t0, backend, ...; not T, order or grid, which come from the file)."""
        for key in ("T", "order", "grid", "variant"):
            if key in kwargs:
                raise ValueError(f"from_tuned takes {key} from the file; do not pass {key}={kwargs[key]!r}")
        entries = load_tuned(path)
        if nfe not in entries:
            raise ValueError(f"nfe={nfe!r} is not in {os.fspath(path)!r}; tuned NFEs: {sorted(entries)}")
        setting = Setting.from_json(entries[nfe])
        t0 = kwargs.pop("t0", 1e-5)
        return cls(bridge, nfe, T=setting.T, t0=t0, order=setting.order, grid=setting.grid(nfe, t0),
                   variant=setting.variant, **kwargs)

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
        seed = _resolve_seed(seed)
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
        x1, finite = self._run(model, m0, cond, seed=seed, guide=guide, progress=progress, callback=callback,
                               trajectory=trajectory)
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
        correct = None
        if self._variant_rows is None:
            step = solver_step(plan, self.solver, self.order, backend, noise, views)
        else:  # psb_fast.variants: the affine steps, with the corrector when the variant has one
            form = variant_form(self.variant)[0]
            steps = VariantSteps(self._variant_rows, self.order, form,
                                 plan.eval_hop_weights if form == "data" else None, plan.t_eval,
                                 fused=partial(_phase_step_unchecked, backend=backend, views=views))
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
        bar = tqdm(total=self.nfe, desc="PhaseSampler", unit="eval") if progress else None
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


def _count(name: str, value: object, lo: int, hi: int) -> int:
    """value as an int in [lo, hi]: a Python/NumPy int or an integer one-element tensor (not bool)."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or not lo <= number <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return number


def _resolve_seed(seed: int | None) -> int:
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    return seed
