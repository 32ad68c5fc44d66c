"""PhaseSampler: few-NFE sampling of phase-space models with the fused step kernels (SPEC §3).

The loop is flat: evaluate F at each grid time, then one fused in-place update of m = [x | v]
(exponential multistep for "ode"; exact-noise, Euler-Maruyama or compat SSCS steps for SDE
models). All per-step coefficients are built once, in float64, when the sampler is made.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from functools import lru_cache

import torch
from tqdm.auto import tqdm

from .backends import BACKENDS, STORAGE_DTYPES
from .bridge import PhaseBridge, split_phase
from .multistep import MultistepCoefficients, multistep_coefficients
from .reference.grids import rev_quad_grid, uniform_grid
from .stepping import phase_hop, phase_step, sde_step

SOLVERS = ("ode", "sde", "em", "sscs")
GRIDS = ("rev-quad", "uniform", "power-<q>")
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

    kind: "rev-quad" (the published grid, power 2), "uniform", or "power-<q>" for the power
    grid t_i = (t0^(1/q) + i/(n-1) (T^(1/q) - t0^(1/q)))^q of any order q > 0 (e.g. "power-2.5").
    """
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
    hop=False a final step runs from T to 0.999); None takes the published T for this NFE
    (hop) or 0.99 (no hop). t0: first grid time. order: multistep order 0..3 ("ode" only;
    None -> 2). grid: "rev-quad" or "uniform" (None -> "rev-quad"). hop: output the x1
    estimate at T instead of x at 0.999. solver: "ode" (probODE models), or "sde" (exact
    noise), "em", "sscs" (SDE models). backend: "auto", "triton", "cpu" or "reference".
    """

    def __init__(
        self,
        bridge: PhaseBridge,
        nfe: int = 10,
        T: float | None = None,
        t0: float = 1e-5,
        order: int | None = None,
        grid: str | None = None,
        hop: bool = True,
        solver: str = "ode",
        backend: str = "auto",
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
        if T is None:
            T = published_T(nfe) if hop else 0.99
        upper = 1.0 if hop else T_END
        if not (isinstance(T, (int, float)) and math.isfinite(T) and t0 < T < upper):
            raise ValueError(f"T must be in (t0, {upper}) = ({t0}, {upper}), got {T!r}")
        if order is None:
            order = PUBLISHED_ORDER if solver == "ode" else 0
        if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= 3:
            raise ValueError(f"order must be an int in 0..3, got {order!r}")
        if solver != "ode" and order != 0:
            raise ValueError(f"order applies to solver='ode' only; got order={order} for {solver!r}")
        self.bridge, self.nfe, self.T, self.t0 = bridge, nfe, float(T), float(t0)
        self.order, self.grid_kind, self.hop = order, grid or PUBLISHED_GRID, bool(hop)
        self.solver, self.backend = solver, backend
        self.grid = make_grid(self.grid_kind, nfe, self.t0, self.T)
        t_end = None if self.hop else T_END
        self.coefficients = _cached_coefficients(
            bridge.key(), tuple(self.grid.tolist()), order, t_end
        )
        self._steps = [
            (i, float(self.coefficients.t[i]), float(self.coefficients.h[i]))
            for i in range(len(self.coefficients.h))
        ]

    def __repr__(self) -> str:
        return (
            f"PhaseSampler(nfe={self.nfe}, T={self.T}, t0={self.t0}, order={self.order}, "
            f"grid={self.grid_kind!r}, hop={self.hop}, solver={self.solver!r}, backend={self.backend!r})"
        )

    def sample(
        self,
        model: Callable[..., torch.Tensor],
        m0: torch.Tensor,
        cond: object | None = None,
        seed: int | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
        callback: Callable[[dict], None] | None = None,
    ):
        """Integrate from m0 ([B, 2C, ...], e.g. bridge.sample_prior) and return x1 ([B, C, ...]).

        model(m, t) -> F (or model(m, t, cond) when cond is given), F of x's shape in
        normalized units, t a [B] tensor on m's device in m's dtype. seed: noise seed of the
        SDE solvers (None draws one). With return_trajectory=True also returns a list of
        snapshots {"t", "x", "v", "x1_hat"} (one per NFE). callback receives
        {"i", "t", "m", "F"} after each evaluation.
        """
        m = self._initial_state(m0)
        x_shape = split_phase(m)[0].shape
        seed = _resolve_seed(seed)
        trajectory: list[dict] = []
        times = torch.as_tensor(self.grid, dtype=m0.dtype, device=m0.device)
        history: list[torch.Tensor] = []
        finite: list[tuple[int, float, torch.Tensor]] = []  # device flags, checked once at the end
        F = None
        for i in tqdm(range(self.nfe), disable=not progress, desc="PhaseSampler"):
            t_i = float(self.grid[i])
            if self.solver == "sscs" and i < len(self._steps):
                # Compat SSCS: half step, then F at the midpoint (below), then half step.
                h = self._steps[i][2]
                sde_step("sscs_half", m, None, self.bridge, t_i, 0.5 * h,
                         seed=_step_seed(seed, 2 * i), backend=self.backend)
                t_eval = t_i + 0.5 * h
                t_vec = torch.full((m.shape[0],), t_eval, dtype=m0.dtype, device=m0.device)
            else:
                t_eval, t_vec = t_i, times[i].expand(m.shape[0])
            F = self._evaluate(model, m, t_vec, cond, x_shape, m0.dtype, i, t_eval)
            if F.device.type != "cpu":
                finite.append((i, t_eval, torch.isfinite(F).all()))
            if callback is not None:
                callback({"i": i, "t": t_eval, "m": m, "F": F})
            if return_trajectory:
                trajectory.append(self._snapshot(m, F, t_eval))
            if i == len(self._steps):
                break
            self._advance(m, F, history, i, seed)
        _raise_first_nonfinite(finite)
        T_hop = float(self.grid[-1])  # = T, or t0 when nfe == 1
        x1 = phase_hop(self.bridge, m, F, T_hop, self.backend) if self.hop else split_phase(m)[0]
        x1 = x1.to(m0.dtype)
        return (x1, trajectory) if return_trajectory else x1

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

    def _advance(self, m, F, history, i, seed) -> None:
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
                     seed=_step_seed(seed, i), backend=self.backend)
        elif self.solver == "em":
            sde_step("em", m, F, self.bridge, t, h, seed=_step_seed(seed, i), backend=self.backend)
        else:
            N_mid = float(self.bridge.coefficients(t + 0.5 * h).normalizer)
            phase_step(m, [F], 0.0, [0.0], [h * N_mid], backend=self.backend)
            sde_step("sscs_half", m, None, self.bridge, t + 0.5 * h, 0.5 * h,
                     seed=_step_seed(seed, 2 * i + 1), backend=self.backend)

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


def _step_seed(seed: int, i: int) -> int:
    """A distinct 31-bit seed per (sampling seed, noise draw index)."""
    return zlib.crc32(f"{seed}:{i}".encode()) & 0x7FFFFFFF
