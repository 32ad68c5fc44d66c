"""Optional pieces of a PhaseSampler run, as hooks of `psb_fast.loop.integrate` (`loop.Hooks`).

- `report_to(callback, ...)`: callback({"i", "t", "m", "F"}) after each evaluation;
- `record_trajectory(trajectory, ...)`: a snapshot {"t", "x", "v", "x1_hat"} after each evaluation;
- `Guidance`: stroke guidance (docs/math.md §11, `psb_fast.guidance`): init-v once before the
  loop, dyn-v / inpaint velocity redraws before the first evaluations, and inpainting's running
  x1 estimate after them.

The progress bar and the finiteness checks are set up by `PhaseSampler` itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .bridge import split_phase
from .guidance import StrokeGuide, fill_unknown, mix_initial_velocity, redraw_velocity
from .loop import Hook, Hooks
from .seeds import step_seed
from .solvers import StepPlan


def report_to(callback: Callable[[dict], None], plan: StepPlan) -> Hook:
    """After evaluation i: callback({"i": i, "t": t_i, "m": m, "F": F_i}) (m is the live state)."""

    def report(i: int, m: torch.Tensor, F: torch.Tensor) -> None:
        callback({"i": i, "t": plan.t_eval[i], "m": m, "F": F})

    return report


def record_trajectory(trajectory: list[dict], plan: StepPlan, backend: str) -> Hook:
    """After evaluation i: append {"t", "x", "v", "x1_hat"} (copies of x and v, the hop estimate)."""

    def record(i: int, m: torch.Tensor, F: torch.Tensor) -> None:
        x, v = split_phase(m)
        trajectory.append({"t": plan.t_eval[i], "x": x.clone(), "v": v.clone(),
                           "x1_hat": plan.x1_hat(i, m, F, backend)})

    return record


class Guidance:
    """A StrokeGuide bound to one run on the state m: init-v is applied here, on construction
    (v0 <- (1 - w) v0 + w s); `add_to(hooks)` adds the redraws and the inpainting estimate.

    Redraws (dyn-v, inpaint): before each of the first guide.redraw_steps(nfe) evaluations,
    v ~ N(cv s + (Lxv/Lxx)(x - cx s), Lvv^2) at the evaluation time, from a generator seeded
    with step_seed(seed, -1); for inpaint s has its unknown entries (-1) filled from the hop
    estimate of the previous evaluation (zeros before the first).
    """

    def __init__(self, guide: StrokeGuide, m: torch.Tensor, plan: StepPlan, backend: str, seed: int) -> None:
        self.plan, self.backend = plan, backend
        self.stroke, self.known = guide.bind(split_phase(m)[0])
        if guide.mode == "init-v":
            mix_initial_velocity(m, self.stroke, guide.init_weight)
        self.redraws = guide.redraw_steps(plan.nfe)
        self.generator = (torch.Generator(device=m.device).manual_seed(step_seed(seed, -1))
                          if self.redraws else None)
        self.x1_hat = torch.zeros_like(self.stroke) if self.known is not None else None

    def add_to(self, hooks: Hooks) -> None:
        if self.redraws:
            hooks.before_eval.append(self.redraw)
        if self.known is not None:
            hooks.after_eval.append(self.estimate)

    def redraw(self, i: int, m: torch.Tensor) -> bool:
        """Before evaluation i: v from its bridge conditional given x and x1 = the stroke. True when
        v was replaced (the corrector then leaves step i - 1 as it is: `psb_fast.loop.Hooks`)."""
        if i >= self.redraws:
            return False
        target = self.stroke if self.known is None else fill_unknown(self.stroke, self.known, self.x1_hat)
        redraw_velocity(m, target, self.plan.coefficients_at(i), self.generator)
        return True

    def estimate(self, i: int, m: torch.Tensor, F: torch.Tensor) -> None:
        """After evaluation i (inpaint): the x1 estimate that fills the next redraw's unknown entries."""
        if i + 1 < self.redraws:
            self.x1_hat = self.plan.x1_hat(i, m, F, self.backend)
