"""PhaseSampler: few-NFE sampling of phase-space models with the fused step kernels (SPEC §3).

The loop is flat: evaluate F at each grid time, then one fused in-place update of m = [x | v]
(exponential multistep for "ode"; exact-noise, Euler-Maruyama or compat SSCS steps for SDE
models). All per-step coefficients are built once, in float64, when the sampler is made.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
from tqdm.auto import tqdm

from .backends import BACKENDS, STORAGE_DTYPES
from .bridge import PhaseBridge, split_phase
from .guidance import StrokeGuide, fill_unknown, mix_initial_velocity, redraw_velocity
from .multistep import MultistepCoefficients, multistep_coefficients
from .reference.grids import rev_quad_grid, uniform_grid
from .stepping import phase_hop, phase_step, sde_step
from .tuned_defaults import grid_from_setting, tuned_grid, tuned_settings
from .tuning import load_tuned

SOLVERS = ("ode", "sde", "em", "sscs")
GRIDS = ("tuned", "rev-quad", "uniform", "power-<q>")
T_END = 0.999
# Published settings (AGM, CIFAR-10 with hop): NFE -> T; order 2 on the rev-quad grid.
PUBLISHED_T = {5: 0.4, 10: 0.7, 20: 0.9}
PUBLISHED_ORDER = 2
PUBLISHED_GRID = "rev-quad"


def published_T(nfe: int) -> float:
    """T of the published settings, linearly interpolated in NFE between 5, 10 and 20 (clamped)."""
    keys = sorted(PUBLISHED_T)
    if nfe <= keys[0]:
        return PUBLISHED_T[keys[0]]
    if nfe >= keys[-1]:
        return PUBLISHED_T[keys[-1]]
    lo = max(k for k in keys if k <= nfe)
    hi = min(k for k in keys if k >= nfe)
    if lo == hi:
        return PUBLISHED_T[lo]
    w = (nfe - lo) / (hi - lo)
    return (1 - w) * PUBLISHED_T[lo] + w * PUBLISHED_T[hi]


def make_grid(kind: str, nfe: int, t0: float, T: float) -> torch.Tensor:
    """The NFE evaluation times, float64 [nfe].

    kind: "tuned" (the tuned grid for this NFE, psb_fast.tuned_defaults), "rev-quad" (the
    published grid, power 2), "uniform", or "power-<q>" for the power grid
    t_i = (t0^(1/q) + i/(n-1) (T^(1/q) - t0^(1/q)))^q of any order q > 0 (e.g. "power-2.5").
    """
    if kind == "tuned":
        return tuned_grid(nfe, t0, T)
    if kind == "rev-quad":
        return rev_quad_grid(nfe, t0, T, 2.0)
    if kind == "uniform":
        return uniform_grid(nfe, t0, T)
    if isinstance(kind, str) and kind.startswith("power-"):
        try:
            q = float(kind[len("power-"):])
        except ValueError:
            q = math.nan
        if math.isfinite(q) and q > 0:
            return rev_quad_grid(nfe, t0, T, q)
    raise ValueError(f"grid must be one of {GRIDS} (q > 0), got {kind!r}")


def _explicit_grid(grid: Sequence[float] | torch.Tensor, nfe: int, t0: float) -> torch.Tensor:
    """Validate user-given grid times: nfe finite values, strictly increasing, from t0, below 1."""
    try:
        times = torch.as_tensor(grid, dtype=torch.float64).flatten().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"grid must be a grid name {GRIDS} or a sequence of times, got {grid!r}") from err
    if times.numel() != nfe:
        raise ValueError(f"grid must hold nfe={nfe} times, got {times.numel()}")
    if not bool(torch.isfinite(times).all()) or (nfe > 1 and not bool((times.diff() > 0).all())):
        raise ValueError(f"grid times must be finite and strictly increasing, got {times.tolist()}")
    if not math.isclose(float(times[0]), t0, rel_tol=0, abs_tol=1e-12):
        raise ValueError(f"grid must start at t0={t0}, got {float(times[0])!r}")
    return times


@lru_cache(maxsize=64)
def _cached_coefficients(
    bridge_key: tuple, grid: tuple[float, ...], order: int, t_end: float | None
) -> MultistepCoefficients:
    return multistep_coefficients(
        PhaseBridge(*bridge_key), torch.tensor(grid, dtype=torch.float64), order, t_end
    )


class PhaseSampler:
    """Few-NFE sampler for a model F = model(m, t[, cond]) trained on `bridge`.

    nfe: network evaluations (>= 1). T: last grid time (the hop time with hop=True; with
    hop=False a final step runs from T to 0.999). t0: first grid time. order: multistep order
    0..3 ("ode" only). grid: "tuned", "rev-quad", "uniform", "power-<q>", or the nfe grid times
    themselves (an increasing sequence from t0 to T). hop: output the x1 estimate at T instead of
    x at 0.999. solver: "ode" (probODE models), or "sde" (exact noise), "em", "sscs" (SDE models).
    backend: "auto", "triton", "cpu" or "reference". cuda_graph: on CUDA, capture the whole
    loop (model included; it must be capturable: no host syncs, static shapes) in a CUDA graph
    on the first sample() call per (model, cond, m0 shape/dtype/device) and replay it after.

    Defaults (None): with solver="ode" and hop=True, T, order and grid take the tuned
    per-NFE defaults of `psb_fast.tuned_defaults` (benchmarks/results/tuning_table.md); otherwise
    T is the published one (hop) or 0.99 (no hop), order 2 ("ode") and grid "rev-quad".
    order=2, grid="rev-quad" and T=published_T(nfe) reproduce the published sampler.
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
    ) -> None:
        if not isinstance(bridge, PhaseBridge):
            raise TypeError(f"bridge must be a PhaseBridge, got {type(bridge).__name__}")
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"nfe must be an int >= 1, got {nfe!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        expected_mode = "probODE" if solver == "ode" else "SDE"
        if bridge.mode != expected_mode:
            raise ValueError(
                f"solver={solver!r} needs a bridge with mode={expected_mode!r}, got mode={bridge.mode!r}"
            )
        if not (isinstance(t0, (int, float)) and math.isfinite(t0) and 0 <= t0 < 1):
            raise ValueError(f"t0 must be in [0, 1), got {t0!r}")
        tuned = solver == "ode" and hop
        explicit = grid is not None and not isinstance(grid, str)
        if explicit:
            times = _explicit_grid(grid, nfe, float(t0))
            if T is not None and not math.isclose(float(T), float(times[-1]), rel_tol=0, abs_tol=1e-12):
                raise ValueError(f"T={T!r} disagrees with the given grid's last time {float(times[-1])!r}")
            T = float(times[-1])
        if T is None:
            T = tuned_settings(nfe)[0] if tuned else (published_T(nfe) if hop else 0.99)
        upper = 1.0 if hop else T_END
        if not (isinstance(T, (int, float)) and math.isfinite(T) and t0 < T < upper):
            raise ValueError(f"T must be in (t0, {upper}) = ({t0}, {upper}), got {T!r}")
        if order is None:
            order = (tuned_settings(nfe)[2] if tuned else PUBLISHED_ORDER) if solver == "ode" else 0
        if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= 3:
            raise ValueError(f"order must be an int in 0..3, got {order!r}")
        if solver != "ode" and order != 0:
            raise ValueError(f"order applies to solver='ode' only; got order={order} for {solver!r}")
        if grid is None:
            grid = "tuned" if tuned else PUBLISHED_GRID
        self.bridge, self.nfe, self.T, self.t0 = bridge, nfe, float(T), float(t0)
        self.order, self.hop = order, bool(hop)
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
        self._steps = [
            (i, float(self.coefficients.t[i]), float(self.coefficients.h[i]))
            for i in range(len(self.coefficients.h))
        ]

    @classmethod
    def from_tuned(cls, path: str | os.PathLike, bridge: PhaseBridge, nfe: int, **kwargs) -> PhaseSampler:
        """A sampler with the settings `psb_fast.tune` / `psb-fast tune` saved for this NFE.

        path: the JSON written by psb_fast.tuning.save_tuned; kwargs: the other constructor
        arguments (t0, backend, ...; not T, order or grid, which come from the file)."""
        for key in ("T", "order", "grid"):
            if key in kwargs:
                raise ValueError(f"from_tuned takes {key} from the file; do not pass {key}={kwargs[key]!r}")
        entries = load_tuned(path)
        if nfe not in entries:
            raise ValueError(f"nfe={nfe!r} is not in {os.fspath(path)!r}; tuned NFEs: {sorted(entries)}")
        e = entries[nfe]
        t0 = kwargs.pop("t0", 1e-5)
        grid = grid_from_setting(nfe, t0, e["T"], e["q"], e.get("fractions"))
        return cls(bridge, nfe, T=e["T"], t0=t0, order=e["order"], grid=grid, **kwargs)

    def __repr__(self) -> str:
        return (
            f"PhaseSampler(nfe={self.nfe}, T={self.T}, t0={self.t0}, order={self.order}, "
            f"grid={self.grid_kind!r}, hop={self.hop}, solver={self.solver!r}, backend={self.backend!r}, "
            f"cuda_graph={self.cuda_graph})"
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
        """
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
        x1, trajectory, finite = self._integrate(model, m0, cond, seed, guide, progress, callback,
                                                 return_trajectory, graphed=False)
        _raise_first_nonfinite(finite)
        return (x1, trajectory) if return_trajectory else x1

    def _integrate(self, model, m0, cond, seed, guide, progress, callback, return_trajectory, graphed):
        """The sampling loop (SPEC §3): returns (x1 in m0's dtype, trajectory, finiteness flags)."""
        m = self._initial_state(m0)
        x_shape = split_phase(m)[0].shape
        stroke, known = guide.bind(split_phase(m)[0]) if guide is not None else (None, None)
        if guide is not None and guide.mode == "init-v":
            mix_initial_velocity(m, stroke, guide.init_weight)
        redraws = guide.redraw_steps(self.nfe) if guide is not None else 0
        generator = torch.Generator(device=m.device).manual_seed(_step_seed(seed, -1)) if redraws else None
        x1_hat = torch.zeros_like(stroke) if known is not None else None
        noise = _graph_noise if graphed else _seeded_noise
        trajectory: list[dict] = []
        times = self._device_grid(m0.dtype, m0.device)
        history: list[torch.Tensor] = []
        finite: list[tuple[int, float, torch.Tensor]] = []  # device flags, checked once at the end
        F = None
        for i in tqdm(range(self.nfe), disable=not progress, desc="PhaseSampler"):
            t_i = float(self.grid[i])
            if self.solver == "sscs" and i < len(self._steps):
                # Compat SSCS: half step, then F at the midpoint (below), then half step.
                h = self._steps[i][2]
                sde_step("sscs_half", m, None, self.bridge, t_i, 0.5 * h, **noise(m, seed, 2 * i),
                         backend=self.backend)
                t_eval = t_i + 0.5 * h
                t_vec = torch.full((m.shape[0],), t_eval, dtype=m0.dtype, device=m0.device)
            else:
                t_eval, t_vec = t_i, times[i].expand(m.shape[0])
            if i < redraws:  # dyn-v / inpaint: v from its conditional given x and x1 = stroke
                target = stroke if known is None else fill_unknown(stroke, known, x1_hat)
                redraw_velocity(m, target, self.bridge.coefficients(t_eval), generator)
            F = self._evaluate(model, m, t_vec, cond, x_shape, m0.dtype, i, t_eval)
            if F.device.type != "cpu":
                finite.append((i, t_eval, torch.isfinite(F).all()))
            if callback is not None:
                callback({"i": i, "t": t_eval, "m": m, "F": F})
            if return_trajectory:
                trajectory.append(self._snapshot(m, F, t_eval))
            if known is not None and i + 1 < redraws:
                x1_hat = phase_hop(self.bridge, m, F, t_eval, self.backend)
            if i == len(self._steps):
                break
            self._advance(m, F, history, i, seed, noise)
        T_hop = float(self.grid[-1])  # = T, or t0 when nfe == 1
        x1 = phase_hop(self.bridge, m, F, T_hop, self.backend) if self.hop else split_phase(m)[0]
        return x1.to(m0.dtype), trajectory, finite

    def _device_grid(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The grid times as a tensor on `device`, made once per (dtype, device): no host-to-device
        copy per call (none may happen inside a CUDA-graph capture)."""
        key = (dtype, device)
        if key not in self._grid_cache:
            self._grid_cache[key] = self.grid.to(device=device, dtype=dtype)
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
                self._integrate(model, static_in, cond, 0, None, False, None, False, graphed=True)
            torch.cuda.current_stream(m0.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out, _, finite = self._integrate(model, static_in, cond, 0, None, False, None, False,
                                                 graphed=True)
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

    def _evaluate(self, model, m, t_vec, cond, x_shape, dtype, i, t) -> torch.Tensor:
        m_in = m if m.dtype == dtype else m.to(dtype)
        F = model(m_in, t_vec) if cond is None else model(m_in, t_vec, cond)
        if not isinstance(F, torch.Tensor) or F.shape != x_shape:
            got = tuple(F.shape) if isinstance(F, torch.Tensor) else type(F).__name__
            raise ValueError(
                f"model output at step {i} (t={t:.6g}) must have shape {tuple(x_shape)}, got {got}"
            )
        if F.device.type == "cpu" and not bool(torch.isfinite(F).all()):
            raise ValueError(f"model output at step {i} (t={t:.6g}) contains NaN or Inf")
        return F.to(torch.float32)

    def _advance(self, m, F, history, i, seed, noise) -> None:
        """One step from grid time i (SPEC §3), in place on m."""
        _, t, h = self._steps[i]
        co = self.coefficients
        if self.solver == "ode":
            history.insert(0, F)
            del history[self.order + 1:]
            q = min(i, self.order)
            phase_step(m, history[: q + 1], h, co.Cx[i, : q + 1].tolist(), co.Cv[i, : q + 1].tolist(),
                       backend=self.backend)
        elif self.solver == "sde":
            sde_step("exact", m, F, self.bridge, t, h, cx=float(co.Cx[i, 0]), cv=float(co.Cv[i, 0]),
                     **noise(m, seed, i), backend=self.backend)
        elif self.solver == "em":
            sde_step("em", m, F, self.bridge, t, h, **noise(m, seed, i), backend=self.backend)
        else:
            N_mid = float(self.bridge.coefficients(t + 0.5 * h).normalizer)
            phase_step(m, [F], 0.0, [0.0], [h * N_mid], backend=self.backend)
            sde_step("sscs_half", m, None, self.bridge, t + 0.5 * h, 0.5 * h, **noise(m, seed, 2 * i + 1),
                     backend=self.backend)

    def _snapshot(self, m: torch.Tensor, F: torch.Tensor, t: float) -> dict:
        x, v = split_phase(m)
        x1_hat = phase_hop(self.bridge, m, F, t, self.backend)
        return {"t": t, "x": x.clone(), "v": v.clone(), "x1_hat": x1_hat}


def _raise_first_nonfinite(finite: list[tuple[int, float, torch.Tensor]]) -> None:
    """On accelerators the per-step finiteness flags stay on the device (no per-step host sync);
    one sync after the loop reports the first step whose model output held NaN or Inf."""
    if not finite:
        return
    ok = torch.stack([flag for _, _, flag in finite]).cpu()
    if not bool(ok.all()):
        i, t, _ = finite[int((~ok).nonzero()[0])]
        raise ValueError(f"model output at step {i} (t={t:.6g}) contains NaN or Inf")


def _resolve_seed(seed: int | None) -> int:
    if seed is None:
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    return seed


def _seeded_noise(m: torch.Tensor, seed: int, k: int) -> dict:
    """Noise of draw k: the kernels' own generator keyed by a per-draw seed."""
    return {"seed": _step_seed(seed, k)}


def _graph_noise(m: torch.Tensor, seed: int, k: int) -> dict:
    """Noise of draw k under CUDA-graph capture: tensors from torch's graph-safe CUDA generator."""
    x, v = split_phase(m)
    return {"xi": (torch.randn(x.shape, device=m.device), torch.randn(v.shape, device=m.device))}


def _step_seed(seed: int, i: int) -> int:
    """A distinct 31-bit seed per (sampling seed, noise draw index)."""
    return zlib.crc32(f"{seed}:{i}".encode()) & 0x7FFFFFFF
