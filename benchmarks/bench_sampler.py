"""Sampler overhead: PhaseSampler.sample vs a loop written the published way, with a zero model.

The published-way loop keeps the state in float64, evaluates each step's multistep
coefficients with the official 50,000-point Riemann sum (normalizer at every point), and
builds the network input with torch.cat of x and v. The model returns zeros, so the time is
the sampler's own. Side-by-side medians in one process:

    python benchmarks/bench_sampler.py            # NFE 10: B=64 x [3,32,32] and B=4096 x [2]

It also times building the multistep coefficients (NFE 20, order 2, rev-quad to T = 0.9):
`multistep_coefficients` (Gauss-Legendre, what PhaseSampler caches) vs the Riemann sums.
"""

from __future__ import annotations

import argparse

import torch

from psb_fast import PhaseBridge, PhaseSampler
from psb_fast.benchmarks._timing import interleaved_medians
from psb_fast.multistep import multistep_coefficients
from psb_fast.reference.grids import rev_quad_grid

RIEMANN_POINTS = 50_000
SHAPES = ((64, 3, 32, 32), (4096, 2))


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


def zero_model(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(m[:, : m.shape[1] // 2])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    bridge = PhaseBridge()
    sampler = PhaseSampler(bridge, args.nfe, T=0.7, order=2, grid="rev-quad", backend="cpu")
    print(f"sample() with a zero model, NFE {args.nfe}, {torch.get_num_threads()} torch threads, "
          f"median of {args.reps} interleaved runs")
    for shape in SHAPES:
        m0 = bridge.sample_prior(shape, generator=torch.Generator().manual_seed(0))
        out_pub = published_loop(zero_model, m0, bridge, args.nfe, 0.7)
        assert torch.allclose(sampler.sample(zero_model, m0), out_pub, atol=1e-4), "the two loops disagree"
        medians = interleaved_medians(
            {"PhaseSampler": lambda m0=m0: sampler.sample(zero_model, m0),
             "published loop": lambda m0=m0: published_loop(zero_model, m0, bridge, args.nfe, 0.7)},
            warmup=1, reps=args.reps,
        )
        ours, pub = medians["PhaseSampler"], medians["published loop"]
        print(f"  x {list(shape)}: PhaseSampler {ours * 1e3:8.2f} ms   published loop {pub * 1e3:8.2f} ms"
              f"   ratio {pub / ours:5.1f}x")
    build = coefficient_build_times(bridge, args.reps)
    print(f"coefficient build, NFE 20, order 2: Gauss-Legendre {build['Gauss-Legendre'] * 1e3:.2f} ms, "
          f"Riemann sum {build['Riemann sum'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
