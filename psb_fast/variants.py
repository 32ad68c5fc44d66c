"""The solver variants of the probability-flow sampler (docs/math.md §7.1, §7.4): their registry, their
step tables (one cache), their step rows (one builder) and the one step path that runs them all.

Every variant steps the phase state m = (x, v) per coordinate by one affine form,

    m_{i+1} = Phi_i m_i + sum_{j<=q} C_{i,j} Y_{i-j}                 (predictor, q = min(i, order))
    m_{i+1} += D_{i,0} Y_{i+1} + sum_{j<=q} D_{i,j+1} Y_{i-j}         (corrector, after evaluation i+1)

with Y the model output F (the F form, Phi_i = [[1, h_i], [0, 1]]) or the hop's data estimate
x1_hat = a_F F + a_x x + a_v v (the data form), each update one fused `phase_step` (a transition
plus weighted sources). A variant is a record of `REGISTRY` (name, form, corrector); adding one is
its record, its tables (psb_fast.variant_tables) and its tests. "multistep" is the published
algorithm (its coefficients by Gauss-Legendre, psb_fast.multistep); the others use the RK4 tables
of `variant_tables`.

With a corrector, evaluation i + 1 (made at the predicted state) also corrects step i before
anything else reads the state; the history keeps Y_{i+1} from the predicted state (as UniPC does),
and the hop at T reads the corrected state with the last F ("re-hop", no extra evaluation).

The data form's sources are kept divided by their hop weight a_F (Y~ = F + (a_x/a_F) x + (a_v/a_F)
v, one op less to form) and every coefficient that multiplies Y~_j carries a_F(t_j) instead.

`Steps` runs the rows on one state with scalar rows (PhaseSampler) or on a batch stacking many
settings with per-row tensors (tuning): `step_rows` builds both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .bridge import PhaseBridge
from .loop import check_history, version_of
from .multistep import MAX_ORDER, multistep_coefficients
from .variant_tables import variant_tables_many


@dataclass(frozen=True)
class Variant:
    """A solver variant: name, form ("F": Y = F; "data": Y = the hop's estimate x1_hat), whether the
    corrector runs, and one line for the docs and the CLI help."""

    name: str
    form: str
    corrector: bool
    about: str


#: The solver variants, the published one first (docs/math.md §7.4).
REGISTRY = (
    Variant("multistep", "F", False, "the published F-form exponential multistep (gDDIM)"),
    Variant("data", "data", False, "extrapolates the hop's data estimate x1_hat instead of F"),
    Variant("multistep-corrector", "F", True, "multistep plus the UniPC-style corrector"),
    Variant("data-corrector", "data", True, "data plus the UniPC-style corrector"),
)
VARIANTS = tuple(v.name for v in REGISTRY)
_BY_NAME = {v.name: v for v in REGISTRY}


def variant(name: str) -> Variant:
    """The registry's record of a variant name (ValueError naming the choices otherwise)."""
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")
    return _BY_NAME[name]


# ----------------------------------------------------------------------------- the tables (one cache)


@dataclass(frozen=True)
class StepTables:
    """Per-step tables of one setting, float64 on the CPU (docs/math.md §7.4).

    variant: its record. t, h: [S] step starts and sizes. Phi: [S, 2, 2] transition of (x, v)
    ([[1, h], [0, 1]] in the F form). C: [S, 2, order + 1], column j multiplies Y_{i-j} (rows x,
    v). D: [S, 2, order + 2] corrector increments (column 0: Y_{i+1}; column j + 1: Y_{i-j}), zero
    for a step without an evaluation at its end, or None without the corrector. hop: [n, 3] the
    probODE hop weights (a_F, a_x, a_v) at each grid time (the data form's estimates, the hop at
    T), or None ("multistep", whose tables serve the SDE solvers too).
    """

    variant: Variant
    t: torch.Tensor
    h: torch.Tensor
    Phi: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor | None
    hop: torch.Tensor | None


_CACHE: OrderedDict[tuple, StepTables] = OrderedDict()
CACHE_SIZE = 4096


def step_tables(
    bridge: PhaseBridge, grid: torch.Tensor, order: int, name: str, t_end: float | None = None
) -> StepTables:
    """The tables of `variant(name)` for the steps between consecutive grid times (increasing
    float64 [n]), plus T -> t_end if given; order 0..MAX_ORDER. Cached (one cache for the sampler
    and tuning), keyed by the bridge's parameters, the grid times, order, variant and t_end."""
    return step_tables_many(bridge, [grid], [order], name, t_end)[0]


def step_tables_many(
    bridge: PhaseBridge, grids: Sequence[torch.Tensor], orders: Sequence[int], name: str,
    t_end: float | None = None,
) -> list[StepTables]:
    """`step_tables` of many settings of one variant; the missing ones made in one vectorized call."""
    record = variant(name)
    keys = [(bridge.key(), tuple(g.tolist()), int(o), record.name, t_end)
            for g, o in zip(grids, orders, strict=True)]
    missing = list(dict.fromkeys(k for k in keys if k not in _CACHE))
    if missing:
        made = _make_tables(bridge, record, [torch.tensor(k[1], dtype=torch.float64) for k in missing],
                            [k[2] for k in missing], t_end)
        for key, tables in zip(missing, made, strict=True):
            _CACHE[key] = tables
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return [_CACHE[k] for k in keys]


def _make_tables(
    bridge: PhaseBridge, record: Variant, grids: list[torch.Tensor], orders: list[int], t_end: float | None
) -> list[StepTables]:
    if record.name == "multistep":  # the published update: Gauss-Legendre coefficients (§7.3)
        out = []
        for grid, order in zip(grids, orders, strict=True):
            co = multistep_coefficients(bridge, grid, order, t_end)
            Phi = torch.zeros(len(co.h), 2, 2, dtype=torch.float64)
            Phi[:, 0, 0], Phi[:, 0, 1], Phi[:, 1, 1] = 1.0, co.h, 1.0
            out.append(StepTables(record, co.t, co.h, Phi, torch.stack([co.Cx, co.Cv], 1), None, None))
        return out
    made = variant_tables_many(bridge, grids, orders, record.form, t_end)
    return [StepTables(record, tab.t, tab.h, tab.Phi, tab.C, tab.D if record.corrector else None, tab.hop)
            for tab in made]


# ----------------------------------------------------------------------------- the rows (one builder)


def step_rows(
    tables: Sequence[StepTables], order: int, value: Callable[[torch.Tensor], object] | None = None,
) -> tuple[list[tuple], list[tuple] | None]:
    """The rows `Steps` runs, for one setting or a stack of settings of one variant.

    tables: one StepTables per setting (equal step counts); order: the largest order among them
    (shorter histories are zero-padded). value maps a [len(tables)] float64 column to what the
    update multiplies by: None for one setting (Python floats, the fused op's scalars) or a
    function to per-row tensors (tuning). Returns (rows, estimates): rows[i] = (t_i, phi, Cx, Cv,
    Dx, Dv) with phi = h_i (F form) or (p_xx, p_xv, p_vx, p_vv), Cx, Cv: q + 1 coefficients of
    the sources Y_i, ..., Y_{i-q}, Dx, Dv: q + 2 (Y_{i+1} first), None without a corrector or an
    evaluation at the step's end; estimates[i] = (1, a_x/a_F, a_v/a_F) at evaluation i (data
    form; None in the F form), the weights that form the scaled source Y~_i.
    """
    first = tables[0]
    record = first.variant
    S = len(first.h)

    def stack(get: Callable[[StepTables], torch.Tensor], width: int) -> torch.Tensor:
        out = torch.zeros(len(tables), *get(first).shape[:-1], width, dtype=torch.float64)
        for c, tab in enumerate(tables):
            part = get(tab)
            out[c, ..., : part.shape[-1]] = part
        return out

    Phi = stack(lambda tab: tab.Phi, 2)  # [C, S, 2, 2]
    C = stack(lambda tab: tab.C, order + 1)  # [C, S, 2, order + 1]
    D = stack(lambda tab: tab.D, order + 2) if record.corrector else None
    has_D = None if D is None else (D != 0).flatten(2).any(2).any(0).tolist()  # [S]
    estimates = None
    if record.form == "data":
        hop = torch.stack([tab.hop for tab in tables])  # [C, n, 3]
        a_f = hop[:, :, 0]
        C = C * _source_weights(a_f, S, order + 1, 0)[:, :, None, :]
        if D is not None:
            D = D * _source_weights(a_f, S, order + 2, 1)[:, :, None, :]
        ratio = hop[:, :, 1:] / a_f[:, :, None]  # [C, n, 2]
    if value is None:  # one setting: plain floats, read out once
        Phi_l, C_l = Phi[0].tolist(), C[0].tolist()
        D_l = None if D is None else D[0].tolist()
        times = first.t.tolist()
        if record.form == "data":
            estimates = [(1.0, r_x, r_v) for r_x, r_v in ratio[0].tolist()]
        rows = []
        for i in range(S):
            q = min(i, order)
            phi = Phi_l[i][0][1] if record.form == "F" else (*Phi_l[i][0], *Phi_l[i][1])
            Dx = Dv = None
            if D_l is not None and has_D[i]:
                Dx, Dv = D_l[i][0][: q + 2], D_l[i][1][: q + 2]
            rows.append((times[i], phi, C_l[i][0][: q + 1], C_l[i][1][: q + 1], Dx, Dv))
        return rows, estimates
    if record.form == "data":
        estimates = [(1.0, value(ratio[:, i, 0]), value(ratio[:, i, 1])) for i in range(ratio.shape[1])]
    rows = []
    for i in range(S):
        q = min(i, order)
        if record.form == "F":
            phi = value(Phi[:, i, 0, 1])
        else:
            phi = tuple(value(Phi[:, i, r, k]) for r in (0, 1) for k in (0, 1))
        Cx = [value(C[:, i, 0, j]) for j in range(q + 1)]
        Cv = [value(C[:, i, 1, j]) for j in range(q + 1)]
        Dx = Dv = None
        if D is not None and has_D[i]:
            Dx = [value(D[:, i, 0, j]) for j in range(q + 2)]
            Dv = [value(D[:, i, 1, j]) for j in range(q + 2)]
        rows.append((None, phi, Cx, Cv, Dx, Dv))
    return rows, estimates


def _source_weights(a_f: torch.Tensor, S: int, width: int, shift: int) -> torch.Tensor:
    """[C, S, width]: a_F at the time of the source that column j of step i multiplies: t_{i-j+shift}
    (zero where that time precedes the grid, whose coefficients are zero anyway)."""
    n = a_f.shape[1]
    k = torch.arange(S)[:, None] - torch.arange(width)[None, :] + shift  # [S, width]
    inside = (k >= 0) & (k < n)
    return torch.where(inside, a_f[:, k.clamp(0, n - 1)], 0.0)


# ----------------------------------------------------------------------------- the one step path


Update = Callable[..., object]


class Steps:
    """correct(i, m, F_i) and step(i, m, F_i) of every variant, for `psb_fast.loop.integrate`.

    rows, estimates: from `step_rows`. update(m, sources, phi, Cx, Cv): the fused update in place
    (`psb_fast.ops.phase_step`'s unchecked entry for one state; `loop.affine_rows` for per-row
    tensors). estimate(m, F, weights) -> Y~: the data form's scaled source (a new tensor; unused in
    the F form, whose source is F itself). order: the history length - 1. Sources kept from earlier
    evaluations are checked unchanged through torch's version counter (`check_history`): a model
    that writes into an output it returned earlier would otherwise corrupt the update silently.
    """

    def __init__(
        self, rows: Sequence[tuple], order: int, update: Update,
        estimates: Sequence[tuple] | None = None, estimate: Callable[..., torch.Tensor] | None = None,
        times: Sequence[float] | None = None,
    ) -> None:
        if order > MAX_ORDER:
            raise ValueError(f"order must be at most {MAX_ORDER}, got {order}")
        self.rows, self.order, self.update = rows, order, update
        self.estimates, self.estimate, self.times = estimates, estimate, times
        self.history: list[tuple[int, torch.Tensor, int | None]] = []  # (i, Y_i, version), newest first

    def correct(self, i: int, m: torch.Tensor, F: torch.Tensor, apply: bool = True) -> None:
        """Form Y_i from F_i (at the predicted state), correct step i - 1 with it (unless `apply` is
        False: a hook replaced part of m after that step, `psb_fast.loop.Hooks`), keep it."""
        Y = F if self.estimates is None else self.estimate(m, F, self.estimates[i])
        history = self.history
        history.insert(0, (i, Y, version_of(Y)))
        if apply and i > 0 and self.rows[i - 1][4] is not None:
            check_history(history, i, None if self.times is None else self.times[i])
            _, _, _, _, Dx, Dv = self.rows[i - 1]
            # m_i += D_{i-1,0} Y_i + sum_j D_{i-1,j+1} Y_{i-1-j}
            self.update(m, [Y_j for _, Y_j, _ in history[: len(Dx)]], 0.0, Dx, Dv)
        del history[self.order + 1 :]

    def step(self, i: int, m: torch.Tensor, F: torch.Tensor) -> None:
        """The predictor of step i: m <- Phi_i m + sum_j C_{i,j} Y_{i-j} (Y_i kept by `correct`)."""
        t, phi, Cx, Cv, _, _ = self.rows[i]
        check_history(self.history, i, t)
        self.update(m, [Y_j for _, Y_j, _ in self.history[: len(Cx)]], phi, Cx, Cv)
