"""The sampling loop (docs/math.md §10.3), shared by `PhaseSampler.sample` and `tuning.run_settings`.

`integrate` is the whole loop, in place on the phase state m = [x | v]:

    for i = 0 .. nfe - 1:
        hooks.before_eval(i, m)          # e.g. SSCS's first half step, a guidance velocity redraw
        F_i = evaluate(i, m)             # the model at t_i, checked (`ModelCall`)
        correct(i, m, F_i)               # corrector variants only: step i - 1 redone with F_i
                                         # (not applied when a before_eval hook replaced part of m)
        hooks.after_eval(i, m, F_i)      # e.g. progress, callback, trajectory
        if i == n_steps: stop            # with the hop the last evaluation is at T: no step after it
        step(i, m, F_i)                  # m_{i+1} from m_i and Y_i, Y_{i-1}, ... (`variants.Steps`; SDE)
        hooks.after_step(i, m)           # e.g. the state's finiteness check

and returns the last output, from which the caller takes the hop (x1 = a_F F + a_x x + a_v v at
T). PhaseSampler runs it on a float32 state with the fused steps of `psb_fast.ops` (scalar
coefficients, arguments validated once per call); tuning runs it on a float64 batch that stacks
many settings, each row with its own times, step coefficients and hop weights (`affine_rows`,
`hop_rows`). Both use the checked model call (`ModelCall`) and the variants' one step path with
its version-checked history (`psb_fast.variants.Steps`). The finiteness checks (`check_finite`,
`raise_first_nonfinite`) are the sampler's: a tuning sweep keeps going when one setting diverges.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .backends import all_finite, finite_flag, first_nonfinite, overlaps
from .bridge import split_phase

Hook = Callable[..., bool | None]


@dataclass
class Hooks:
    """Optional pieces run around each step of `integrate`, in list order.

    before_eval(i, m) runs before evaluation i, after_eval(i, m, F_i) after it, after_step(i, m)
    after step i. A hook may update m in place (SSCS's half step, a velocity redraw). A before_eval
    hook returns True when it replaced part of m (a guidance redraw): m_i is then no longer the
    output of step i - 1, so the corrector does not redo that step (its correction is the difference
    of two integrations from m_{i-1} and would carry the jump into the state); F_i is still kept as
    the history of later steps.
    """

    before_eval: list[Hook] = field(default_factory=list)
    after_eval: list[Hook] = field(default_factory=list)
    after_step: list[Hook] = field(default_factory=list)


def integrate(
    m: torch.Tensor,
    *,
    evaluate: Callable[[int, torch.Tensor], torch.Tensor],
    step: Callable[[int, torch.Tensor, torch.Tensor], None],
    nfe: int,
    n_steps: int,
    hooks: Hooks,
    correct: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the sampling loop on m (in place) and return the last model output F_{nfe-1}.

    evaluate(i, m) -> F_i: the i-th model evaluation; step(i, m, F_i): step i, in place on m.
    n_steps: nfe - 1 with the hop (the last evaluation, at T, feeds the hop), nfe without it
    (the last step runs from T to t_end). correct(i, m, F_i): the solver variant's corrector
    (`psb_fast.variants`), run right after each evaluation, before the hooks see m.
    """
    F = None
    for i in range(nfe):
        replaced = False
        for hook in hooks.before_eval:
            replaced = (hook(i, m) is True) or replaced
        F = evaluate(i, m)  # F_i = F_theta(m_i, t_i)
        if correct is not None:  # corrector variants: step i - 1 redone with F_i (no extra evaluation)
            correct(i, m, F, apply=not replaced)
        for hook in hooks.after_eval:
            hook(i, m, F)
        if i == n_steps:  # t_i = T: the hop follows
            break
        step(i, m, F)  # m_{i+1} = Phi(h_i) m_i + sum_j C_{i,j} F_{i-j} (+ noise)
        for hook in hooks.after_step:
            hook(i, m)
    return F


# ----------------------------------------------------------------------------- the model call


class ModelCall:
    """evaluate(i, m) -> F_i = model(m, t_i[, cond]) for `integrate`.

    m: the state the loop runs on. The model gets m in `dtype` (m itself when the state has that
    dtype) and t_i = times[i], a [B] tensor in `dtype` on m's device (times: one per evaluation).
    Its output must have x's shape and m's device (ValueError naming the step); it is returned in
    the state's dtype, copied when it shares memory with m (a view of m would change under the
    in-place step while the multistep history holds it). With `finite` (a list), the outputs of
    evaluations i >= check_from are checked for NaN and Inf (`check_finite`); earlier ones are left
    to the check of the state after their step, which names them (`last`: the latest output). That
    is enough when no hook sees F_i before the step: every step adds F_i with a positive weight
    (Cv_{i,0} > 0), so NaN or Inf in F_i makes the state non-finite. t_values: the evaluation
    times as floats, for messages.
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        cond: object | None,
        times: Sequence[torch.Tensor],
        dtype: torch.dtype,
        m: torch.Tensor,
        finite: list | None = None,
        t_values: Sequence[float] | None = None,
        check_from: int = 0,
    ) -> None:
        self.model, self.cond, self.times, self.dtype = model, cond, times, dtype
        self.x_shape = torch.Size((m.shape[0], m.shape[1] // 2, *m.shape[2:]))
        self.device = m.device
        self.finite, self.t_values, self.check_from = finite, t_values, check_from
        self.last: torch.Tensor | None = None

    def __call__(self, i: int, m: torch.Tensor) -> torch.Tensor:
        m_in = m if m.dtype == self.dtype else m.to(self.dtype)
        t = self.times[i]
        F = self.model(m_in, t) if self.cond is None else self.model(m_in, t, self.cond)
        if not isinstance(F, torch.Tensor) or F.shape != self.x_shape:
            got = tuple(F.shape) if isinstance(F, torch.Tensor) else type(F).__name__
            raise ValueError(
                f"model output at step {i}{self._at(i)} must have shape {tuple(self.x_shape)}, got {got}"
            )
        if F.device != self.device:
            raise ValueError(f"model output at step {i}{self._at(i)} must be on {self.device}, got "
                             f"{F.device}")
        if F.dtype != m.dtype:
            F = F.to(m.dtype)
        if overlaps(F, m):
            F = F.clone()
        if self.finite is not None and i >= self.check_from:
            check_finite(F, self.finite, i, self.t_values[i], "model")
        self.last = F
        return F

    def _at(self, i: int) -> str:
        return "" if self.t_values is None else f" (t={self.t_values[i]:.6g})"


# ----------------------------------------------------------------------------- per-row updates (tuning)


def affine_rows(
    m: torch.Tensor,
    sources: Sequence[torch.Tensor],
    phi: torch.Tensor | tuple[torch.Tensor, ...],
    Cx: Sequence[torch.Tensor],
    Cv: Sequence[torch.Tensor],
) -> torch.Tensor:
    """`phase_step`'s update with per-row coefficients, in place on m; returns m.

    For a batch that stacks several settings (tuning): phi is h ([B, 1, ...], the F form's
    transition [[1, h], [0, 1]]; a float 0.0 for none) or (p_xx, p_xv, p_vx, p_vv); each Cx[j],
    Cv[j] is a [B, 1, ...] tensor broadcasting against x (m's dtype and device); sources newest
    first. The F form takes the same sums in the same order as `phase_step`: x += h v, then
    x += Cx_j S_j, v += Cv_j S_j.
    """
    x, v = split_phase(m)
    if isinstance(phi, tuple):
        p_xx, p_xv, p_vx, p_vv = phi
        x_new = x * p_xx + v * p_xv
        v.mul_(p_vv).addcmul_(p_vx, x)
        x.copy_(x_new)
    elif isinstance(phi, torch.Tensor):
        x.addcmul_(phi, v)
    for S, a, b in zip(sources, Cx, Cv, strict=True):
        x.addcmul_(a, S)
        v.addcmul_(b, S)
    return m


def hop_rows(
    m: torch.Tensor, F: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The hop x1 = a_F F + a_x x + a_v v (docs/math.md §8) with per-row weights, a new tensor.

    weights: (a_F, a_x, a_v), each [B, 1, ...] broadcasting against x (m's dtype and device), e.g.
    `probode_hop_weights` of each row's `PhaseBridge.coefficients(T)`; the batched form of the
    fused hop PhaseSampler ends with.
    """
    a_f, a_x, a_v = weights
    x, v = split_phase(m)
    return (a_x * x).addcmul_(a_v, v).addcmul_(a_f, F)


# ----------------------------------------------------------------------------- reliability checks


NONFINITE = {
    "m0": "m0 (the initial state) contains NaN or Inf",
    "model": "model output at step {i} (t={t:.6g}) contains NaN or Inf",
    "state": (
        "sampler state after the update at step {i} (t={t:.6g}) contains NaN or Inf: it overflowed "
        "float32 (model output too large?)"
    ),
    "x1": (
        "the sample (x1 at step {i}, t={t:.6g}) contains NaN or Inf: the hop or the cast to m0's "
        "dtype overflowed"
    ),
}


def check_finite(t: torch.Tensor, finite: list[tuple], i: int, time: float, kind: str) -> None:
    """Raise the ValueError of `kind` (NONFINITE) now if t holds NaN or Inf (CPU tensors), or
    keep a device flag for the one check after the loop (accelerators: no per-step host sync)."""
    if not t.is_cpu:
        finite.append((i, time, finite_flag(t), kind))
    elif t.numel() and not math.isfinite(t.sum().item()) and not all_finite(t):  # a finite sum proves it
        detail = f" (first: {first_nonfinite(t)})" if kind == "m0" else ""
        raise ValueError(NONFINITE[kind].format(i=i, t=time) + detail)


def raise_first_nonfinite(finite: list[tuple]) -> None:
    """On accelerators the per-step finiteness flags stay on the device (no per-step host sync);
    one sync after the loop reports the first of them that is False: entries (i, t, flag) for
    model outputs, or (i, t, flag, kind) with kind a key of NONFINITE."""
    if not finite:
        return
    ok = torch.stack([entry[2] for entry in finite]).cpu()
    if not bool(ok.all()):
        i, t, _, *kind = finite[int((~ok).nonzero()[0])]
        raise ValueError(NONFINITE[kind[0] if kind else "model"].format(i=i, t=t))


def version_of(t: torch.Tensor) -> int | None:
    """torch's version counter of t, or None for an inference tensor (made under
    torch.inference_mode, which keeps no counter: its in-place writes cannot be detected)."""
    return None if t.is_inference() else t._version


def check_history(history: Sequence[tuple[int, torch.Tensor, int]], i: int, t: float | None) -> None:
    """Raise if an earlier model output the multistep still reads was written in place since it
    was returned (torch's version counter moved): a model that reuses its output buffer."""
    for j, F_j, version in history[1:]:
        if version is not None and F_j._version != version:
            at = "" if t is None else f" (t={t:.6g})"
            raise ValueError(
                f"model output of step {j} was overwritten in place before the update at step {i}"
                f"{at} used it (does the model reuse its output buffer?): return a new tensor per "
                "call, e.g. F.clone()"
            )
