"""The solver variants of the probability-flow sampler (docs/math.md §7.4), apart from the main path.

"multistep" (the published F-form exponential multistep) runs on the fused `phase_step` op
(psb_fast.loop.Multistep). The other variants take the affine steps of
`psb_fast.variant_tables` (the F form's on the same fused op, the data form's in torch ops):

- "data":                predictor on Y = x1_hat, the hop's data estimate at each grid time;
- "multistep-corrector": predictor on Y = F plus the UniPC-style corrector;
- "data-corrector":      predictor on Y = x1_hat plus the corrector.

With a corrector, evaluation i + 1 (made at the predicted state) also corrects step i before
anything else reads the state; the history keeps Y_{i+1} from the predicted state (as UniPC does),
and the hop at T reads the corrected state with the last F ("re-hop", no extra evaluation).

`VariantSteps` works on one state with scalar tables (PhaseSampler) or on a batch stacking many
settings with per-row tables (tuning): every number it multiplies by is a Python float or a
tensor broadcasting against x ([rows, 1, ...]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .bridge import split_phase
from .loop import check_history, version_of
from .multistep import MAX_HISTORY
from .settings import VARIANTS

Scalar = float | torch.Tensor


def variant_form(variant: str) -> tuple[str, bool]:
    """(form, corrector) of a variant: form "F" or "data" (what the multistep extrapolates)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return ("data" if variant.startswith("data") else "F"), variant.endswith("-corrector")


class VariantSteps:
    """correct(i, m, F_i) and step(i, m, F_i) for `psb_fast.loop.integrate`.

    rows[i] = (Phi_i, C_i, D_i) for step i: Phi_i = (p_xx, p_xv, p_vx, p_vv); C_i: q + 1 pairs
    (c_x, c_v), pair j multiplying Y_{i-j}; D_i: q + 2 pairs, pair 0 multiplying Y_{i+1} and pair
    j + 1 multiplying Y_{i-j}, or None (no corrector). hop_weights[i] = (a_F, a_x, a_v) at
    evaluation time i (data form: Y_i = a_F F_i + a_x x_i + a_v v_i). order: the history length - 1.
    """

    def __init__(
        self, rows: Sequence[tuple], order: int, form: str, hop_weights: Sequence[tuple] | None = None,
        times: Sequence[float] | None = None, fused: Callable[..., object] | None = None,
    ) -> None:
        if form == "data" and hop_weights is None:
            raise ValueError("the data form needs the hop weights at every evaluation time")
        self.rows, self.order, self.form = rows, order, form
        self.hop_weights, self.times = hop_weights, times
        # The F form with scalar tables is phase_step's update: x += h v + sum Cx F, v += sum Cv F
        # (the corrector with h = 0), so it runs on the fused op when one is given.
        self.fused = fused if form == "F" else None
        self.history: list[tuple[int, torch.Tensor, int | None]] = []  # (i, Y_i, version), newest first

    def correct(self, i: int, m: torch.Tensor, F: torch.Tensor) -> None:
        """Form Y_i from F_i (at the predicted state), correct step i - 1 with it, keep it."""
        x, v = split_phase(m)
        if self.form == "data":
            a_f, a_x, a_v = self.hop_weights[i]
            Y = x * a_x + v * a_v + F * a_f  # x1_hat_i, a new tensor
        else:
            Y = F
        if i > 0 and self.rows[i - 1][2] is not None:
            check_history(self.history, i, None if self.times is None else self.times[i])
            D = self.rows[i - 1][2]
            outputs = [Y] + [Y_j for _, Y_j, _ in self.history]
            if self.fused is not None:  # at most MAX_HISTORY outputs per fused call
                for lo in range(0, len(D), MAX_HISTORY):
                    part = D[lo : lo + MAX_HISTORY]
                    d_x, d_v = [d[0] for d in part], [d[1] for d in part]
                    self.fused(m, outputs[lo : lo + len(part)], 0.0, d_x, d_v)
            else:
                for (d_x, d_v), Y_j in zip(D, outputs, strict=False):
                    x.add_(Y_j * d_x)
                    v.add_(Y_j * d_v)
        self.history.insert(0, (i, Y, version_of(Y)))
        del self.history[self.order + 1 :]

    def step(self, i: int, m: torch.Tensor, F: torch.Tensor) -> None:
        """The predictor of step i: m <- Phi_i m + sum_j C_{i,j} Y_{i-j} (Y_i kept by `correct`)."""
        check_history(self.history, i, None if self.times is None else self.times[i])
        (p_xx, p_xv, p_vx, p_vv), C, _ = self.rows[i]
        if self.fused is not None:  # Phi = [[1, h], [0, 1]]
            outputs = [Y_j for _, Y_j, _ in self.history][: len(C)]
            self.fused(m, outputs, p_xv, [c[0] for c in C], [c[1] for c in C])
            return
        x, v = split_phase(m)
        x_new = x * p_xx + v * p_xv
        v.mul_(p_vv).add_(x * p_vx)
        x.copy_(x_new)
        for (c_x, c_v), (_, Y_j, _) in zip(C, self.history, strict=False):
            x.add_(Y_j * c_x)
            v.add_(Y_j * c_v)


def scalar_rows(tables, order: int, corrector: bool) -> list[tuple]:
    """`VariantSteps` rows of one setting as Python floats, from `variant_tables` output (the F
    form's transition is [[1, h], [0, 1]] exactly)."""
    Phi, C, D, h = tables.Phi.tolist(), tables.C.tolist(), tables.D.tolist(), tables.h.tolist()
    rows = []
    for i in range(len(Phi)):
        q = min(i, order)
        phi = (Phi[i][0][0], Phi[i][0][1], Phi[i][1][0], Phi[i][1][1])
        if tables.form == "F":
            phi = (1.0, h[i], 0.0, 1.0)
        c = [(C[i][0][j], C[i][1][j]) for j in range(q + 1)]
        d = [(D[i][0][j], D[i][1][j]) for j in range(q + 2)] if corrector else None
        rows.append((phi, c, d))
    return rows
