"""Sampler overhead with a zero model: PhaseSampler.sample against a lean loop, a peer library's
loop and a loop written the published way. The model returns a fresh zero tensor, so the time is
the sampler's own. Side-by-side medians of interleaved runs in one process, NFE 10, 2 torch threads:

    python benchmarks/bench_sampler.py            # --nfe, --reps, --threads; --no-published: part 1 only

1. Overhead table, state m0 = [B, 2C, ...] of B x [2], 4096 x [2] and 64 x [6, 32, 32] (B = 256):
   - "lean loop" (`lean_loop`): the same steps written as plainly as torch allows: one model call,
     one in-place multistep update of x and v per step with precomputed coefficients, then the hop;
   - "PhaseSampler": `PhaseSampler(...).sample` (backend "cpu"), with its checks (arguments once
     per call; finiteness of every model output and state; the multistep history's version
     counters) and hooks; and the same with variant "multistep-corrector" (one more fused update
     per step, docs/math.md §7.4);
   - "peer loop": diffusers' DPMSolverMultistepScheduler (DPM-Solver++(2M), the same kind of
     2nd-order multistep) stepping a state of the same size with the same zero model, if
     `diffusers` is installed (the `bench` extra); "-" otherwise.
   The table's ratio is PhaseSampler / lean loop.
2. The solver variants side by side (`variant_table`, `--variants`): sample() with the zero model
   per variant (setting T 0.8, q 1.5, order 2) at 64 x [6, 32, 32] and 4096 x [2], ms per
   evaluation and the ratio to "multistep-corrector" (docs/math.md §7.4: the data form's update is
   the fused phase_step with a 2x2 transition plus one op forming its source); and the build time
   of a fresh default sampler at NFE 20 (`build_times`: the table cache emptied before each build,
   the bridge made once).
3. PhaseSampler against the published-way loop (`published_loop`: float64 state, each step's
   coefficients by the official 50,000-point Riemann sum, network input by torch.cat), B = 64 x
   [3, 32, 32] and 4096 x [2] (x's shape); and the time to build the multistep coefficients (NFE
   20, order 2, rev-quad to T = 0.9): `multistep_coefficients` (Gauss-Legendre, what PhaseSampler
   caches) against the Riemann sums.

    python benchmarks/bench_sampler.py --variants --threads 1   # part 2 only
"""

from __future__ import annotations

import argparse

import torch

from psb_fast import PhaseBridge, PhaseSampler, variants
from psb_fast.benchmarks._timing import interleaved_medians, median_time
from psb_fast.multistep import multistep_coefficients
from psb_fast.reference.grids import rev_quad_grid
from psb_fast.settings import Setting, published_setting

RIEMANN_POINTS = 50_000
SHAPES = ((64, 3, 32, 32), (4096, 2))  # x's shape, published-way comparison
LEAN_SHAPES = ((256, 2), (4096, 2), (64, 6, 32, 32))  # m0's shape [B, 2C, ...], overhead table
VARIANT_SHAPES = ((64, 6, 32, 32), (4096, 2))  # m0's shape, variants side by side
VARIANT_SETTING = Setting(0.8, 1.5, 2)
T_HOP, ORDER = 0.7, 2


# ----------------------------------------------------------------------------- the lean loop


def lean_plan(sampler: PhaseSampler, m0: torch.Tensor) -> tuple:
    """What the lean loop precomputes once: per-evaluation [B] time tensors, per-step (h, Cx, Cv)
    as floats, and the hop weights (a_F, a_x, a_v) at T."""
    tab = sampler.tables
    times = [torch.full((m0.shape[0],), t, dtype=m0.dtype) for t in sampler.grid.tolist()]
    steps = [(h, Cx[: min(i, sampler.order) + 1], Cv[: min(i, sampler.order) + 1])
             for i, (h, Cx, Cv) in enumerate(zip(tab.h.tolist(), tab.C[:, 0].tolist(), tab.C[:, 1].tolist(),
                                                 strict=True))]
    return times, steps, sampler.bridge.hop_weights(sampler.T)


def lean_loop(model, m0: torch.Tensor, plan: tuple) -> torch.Tensor:
    """The probability-flow sampler with the hop as a lean in-place torch loop (float32 state)."""
    times, steps, (a_f, a_x, a_v) = plan
    m = m0.clone()
    c = m.shape[1] // 2
    x, v = m[:, :c], m[:, c:]
    history: list[torch.Tensor] = []
    for i, t in enumerate(times):
        F = model(m, t)
        history = [F, *history[: ORDER]]
        if i == len(steps):
            break
        h, Cx, Cv = steps[i]
        x.add_(v, alpha=h)  # x += h v + sum_j Cx_j F_{i-j}
        for a, b, F_j in zip(Cx, Cv, history, strict=False):
            x.add_(F_j, alpha=a)
            v.add_(F_j, alpha=b)  # v += sum_j Cv_j F_{i-j}
    return x.mul(a_x).add_(v, alpha=a_v).add_(F, alpha=a_f)  # the hop at T


# ----------------------------------------------------------------------------- a peer library's loop


def peer_loop(nfe: int):
    """diffusers' DPM-Solver++(2M) loop with a zero model, as a function of the state (None if
    diffusers is not installed). Per call: set_timesteps, then nfe scheduler steps."""
    try:
        from diffusers import DPMSolverMultistepScheduler
    except ImportError:
        return None
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++",
                                            solver_order=2)

    def run(sample: torch.Tensor) -> torch.Tensor:
        scheduler.set_timesteps(nfe)
        for t in scheduler.timesteps:
            sample = scheduler.step(torch.zeros_like(sample), t, sample).prev_sample
        return sample

    return run


def zero_model(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(m[:, : m.shape[1] // 2])


def overhead_table(nfe: int, reps: int) -> list[dict]:
    """Per m0 shape: median ms of the lean loop, PhaseSampler and the peer loop (None if absent).

    The lean loop and PhaseSampler are timed in turn (`interleaved_medians`, so that load drifts
    hit both alike), each sample averaging enough calls to last about 2 ms; the peer, 20-40x
    slower, is timed on its own after them (median of max(3, reps // 4) calls).
    """
    bridge = PhaseBridge()
    published = Setting(T_HOP, 2.0, ORDER)
    sampler = PhaseSampler(bridge, nfe, published, backend="cpu")
    corrected = PhaseSampler(bridge, nfe, published.replace(variant="multistep-corrector"), backend="cpu")
    peer = peer_loop(nfe)
    rows = []
    for shape in LEAN_SHAPES:
        m0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        plan = lean_plan(sampler, m0)
        lean = lean_loop(zero_model, m0, plan)
        assert torch.allclose(sampler.sample(zero_model, m0), lean, atol=1e-5), "the loops disagree"
        fns = {"lean": lambda m0=m0, plan=plan: lean_loop(zero_model, m0, plan),
               "ours": lambda m0=m0: sampler.sample(zero_model, m0),
               "corrector": lambda m0=m0: corrected.sample(zero_model, m0)}
        inner = max(1, round(2e-3 / median_time(fns["ours"], warmup=2, reps=3)))
        ms = {name: s * 1e3 for name, s in interleaved_medians(fns, warmup=2, reps=reps, inner=inner).items()}
        peer_ms = None
        if peer is not None:
            peer_ms = median_time(lambda m0=m0: peer(m0), warmup=1, reps=max(3, reps // 4)) * 1e3
        rows.append({"shape": list(shape), "lean_ms": ms["lean"], "phase_sampler_ms": ms["ours"],
                     "ratio": ms["ours"] / ms["lean"], "corrector_ms": ms["corrector"],
                     "corrector_ratio": ms["corrector"] / ms["lean"], "peer_ms": peer_ms})
    return rows


# ----------------------------------------------------------------------------- the variants


def variant_table(nfe: int, reps: int) -> list[dict]:
    """Per m0 shape: median ms per evaluation of sample() with the zero model, per variant
    (VARIANT_SETTING, backend "cpu"), timed in turn (`interleaved_medians`)."""
    bridge = PhaseBridge()
    samplers = {v: PhaseSampler(bridge, nfe, VARIANT_SETTING.replace(variant=v), backend="cpu")
                for v in variants.VARIANTS}
    rows = []
    for shape in VARIANT_SHAPES:
        m0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        fns = {v: (lambda s=s, m0=m0: s.sample(zero_model, m0)) for v, s in samplers.items()}
        inner = max(1, round(2e-3 / median_time(fns["multistep"], warmup=2, reps=3)))
        ms = interleaved_medians(fns, warmup=2, reps=reps, inner=inner)
        rows.append({"shape": list(shape), **{v: ms[v] * 1e3 / nfe for v in samplers}})
    return rows


def build_times(reps: int, nfe: int = 20) -> dict[str, float]:
    """Median ms to build a fresh sampler at `nfe` (the step-table cache emptied first; the bridge
    and the defaults file read once): the default setting, and the published one."""
    bridge = PhaseBridge()
    PhaseSampler(bridge, nfe)  # reads the defaults file once

    def fresh(setting):
        def build():
            variants._CACHE.clear()
            PhaseSampler(bridge, nfe, setting)
        return build

    out = interleaved_medians({"default": fresh(None), "published": fresh(published_setting(nfe))},
                              warmup=1, reps=reps)
    return {k: v * 1e3 for k, v in out.items()}


def print_variants(nfe: int, reps: int) -> None:
    print(f"\nThe variants side by side: sample() with a zero model, NFE {nfe}, {VARIANT_SETTING.label}, "
          f"ms per evaluation (median of {reps} interleaved runs); "
          "ratio = data-corrector / multistep-corrector")
    print("| m0 shape | " + " | ".join(variants.VARIANTS) + " | ratio |")
    print("|---|" + "---|" * (len(variants.VARIANTS) + 1))
    for row in variant_table(nfe, reps):
        shape = f"{row['shape'][0]} x {row['shape'][1:]}"
        cells = " | ".join(f"{row[v]:.4f}" for v in variants.VARIANTS)
        print(f"| {shape} | {cells} | {row['data-corrector'] / row['multistep-corrector']:.2f}x |")
    build = build_times(reps)
    print(f"fresh sampler build, NFE 20 (median of {reps}): default setting {build['default']:.2f} ms, "
          f"published setting {build['published']:.2f} ms")


# ----------------------------------------------------------------------------- the published way


def riemann_coefficients(bridge: PhaseBridge, times: list[float], i: int, t_next: float, order: int):
    """(Cx, Cv) of step i by the official 50,000-point Riemann sum."""
    q = min(i, order)
    nodes = [times[i - k] for k in range(q + 1)]
    s = torch.linspace(times[i], t_next, RIEMANN_POINTS, dtype=torch.float64)
    ds = (t_next - times[i]) / RIEMANN_POINTS
    N = bridge.coefficients(s).normalizer
    Cx, Cv = [], []
    for j in range(q + 1):
        lj = torch.ones_like(s)
        for k, tk in enumerate(nodes):
            if k != j:
                lj = lj * (s - tk) / (nodes[j] - tk)
        Cv.append(float((N * lj).sum() * ds))
        Cx.append(float(((t_next - s) * N * lj).sum() * ds))
    return Cx, Cv


def published_loop(model, m0: torch.Tensor, bridge: PhaseBridge, nfe: int, T: float, order: int = 2):
    """The published algorithm written the published way (float64 state, per-step coefficients)."""
    times = rev_quad_grid(nfe, 1e-5, T).tolist()
    c = m0.shape[1] // 2
    x, v = m0[:, :c].double(), m0[:, c:].double()
    history = []
    for i, t in enumerate(times):
        m = torch.cat([x, v], dim=1).to(m0.dtype)
        F = model(m, torch.full((m0.shape[0],), t, dtype=m0.dtype, device=m0.device)).double()
        history = [F] + history[:order]
        if i == nfe - 1:
            co = bridge.coefficients(torch.tensor(t, dtype=torch.float64))
            f = co.normalizer * F
            den = 4 * co.tau**2 + co.P * (co.hop_aa * co.cx + co.hop_bb * co.cv)
            return ((f + co.P * (co.hop_aa * x + co.hop_bb * v)) / den).to(m0.dtype)
        Cx, Cv = riemann_coefficients(bridge, times, i, times[i + 1], order)
        x = x + (times[i + 1] - t) * v + sum(a * Fj for a, Fj in zip(Cx, history, strict=False))
        v = v + sum(a * Fj for a, Fj in zip(Cv, history, strict=False))
    raise AssertionError("unreachable")


def coefficient_build_times(bridge: PhaseBridge, reps: int, nfe: int = 20, T: float = 0.9) -> dict:
    """Median seconds to build all steps' (Cx, Cv), ours vs the published Riemann sums."""
    grid = rev_quad_grid(nfe, 1e-5, T)
    times = grid.tolist()

    def riemann_all():
        return [riemann_coefficients(bridge, times, i, times[i + 1], 2) for i in range(nfe - 1)]

    return interleaved_medians(
        {"Gauss-Legendre": lambda: multistep_coefficients(bridge, grid, 2), "Riemann sum": riemann_all},
        warmup=1, reps=reps,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--reps", type=int, default=21, help="interleaved timed runs per case")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-published", action="store_true", help="skip part 3 (minutes: the Riemann sums)")
    parser.add_argument("--variants", action="store_true", help="run part 2 (the variants, the build) only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.variants:
        print_variants(args.nfe, args.reps)
        return
    print(f"sample() with a zero model, NFE {args.nfe}, {torch.get_num_threads()} torch threads, "
          f"median of {args.reps} interleaved runs")
    print("| m0 shape | lean loop (ms) | PhaseSampler (ms) | ratio | PhaseSampler, multistep-corrector "
          "(ms) | ratio | peer loop (ms): diffusers DPM-Solver++(2M) |")
    print("|---|---|---|---|---|---|---|")
    for row in overhead_table(args.nfe, args.reps):
        peer = "-" if row["peer_ms"] is None else f"{row['peer_ms']:.2f}"
        shape = f"{row['shape'][0]} x {row['shape'][1:]}"
        print(f"| {shape} | {row['lean_ms']:.3f} | {row['phase_sampler_ms']:.3f} | {row['ratio']:.2f}x "
              f"| {row['corrector_ms']:.3f} | {row['corrector_ratio']:.2f}x | {peer} |")
    print_variants(args.nfe, args.reps)
    if args.no_published:
        return

    bridge = PhaseBridge()
    sampler = PhaseSampler(bridge, args.nfe, Setting(T_HOP, 2.0, ORDER), backend="cpu")
    reps = max(3, args.reps // 3)
    print(f"\nPhaseSampler vs the published-way loop (median of {reps}):")
    for shape in SHAPES:
        m0 = bridge.sample_prior(shape, generator=torch.Generator().manual_seed(0))
        out_pub = published_loop(zero_model, m0, bridge, args.nfe, T_HOP)
        assert torch.allclose(sampler.sample(zero_model, m0), out_pub, atol=1e-4), "the two loops disagree"
        medians = interleaved_medians(
            {"PhaseSampler": lambda m0=m0: sampler.sample(zero_model, m0),
             "published loop": lambda m0=m0: published_loop(zero_model, m0, bridge, args.nfe, T_HOP)},
            warmup=1, reps=reps,
        )
        ours, pub = medians["PhaseSampler"], medians["published loop"]
        print(f"  x {list(shape)}: PhaseSampler {ours * 1e3:8.2f} ms   published loop {pub * 1e3:8.2f} ms"
              f"   ratio {pub / ours:5.1f}x")
    build = coefficient_build_times(bridge, reps)
    print(f"coefficient build, NFE 20, order 2: Gauss-Legendre {build['Gauss-Legendre'] * 1e3:.2f} ms, "
          f"Riemann sum {build['Riemann sum'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
