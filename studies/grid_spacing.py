"""Why grids have a minimum spacing (psb_fast.grids.check_spacing, docs/math.md §10.1).

    python -m studies.grid_spacing      # about 10 s on one CPU thread

One node of the grid [1e-5, ...] is moved next to its left neighbour, leaving a step `gap`, and
the four solver variants sample the 2-D Gaussian-mixture grid problem (`psb_fast.oracles`, exact
drift, no network error) on the float64 backend from 2000 fixed prior draws. Printed: the mean
distance of the outputs to a 200-step reference solution, per variant and gap, and the ratio of
the gap's larger neighbouring step to it. Grids are built with grids.MAX_STEP_RATIO lifted, so
the refused ones are measured too (MIN_STEP_ULPS lifted as well). Last, the largest ratio of
adjacent steps in the package defaults' grids at NFE 1..200.
"""

from __future__ import annotations

import torch

import psb_fast
from psb_fast import grids
from psb_fast.defaults import default_setting
from psb_fast.oracles import mixture_2d_grid

VARIANTS = ("multistep", "data", "multistep-corrector", "data-corrector")
GRIDS = {  # None: the node placed `gap` after its left neighbour
    "middle": [1e-5, 0.1, 0.2, None, 0.6],
    "late": [1e-5, 0.05, 0.1, 0.2, 0.4, 0.6, None, 0.9],
}
GAPS = (3e-3, 1e-3, 1e-4, 1e-6, 1e-9)


def main() -> None:
    torch.set_num_threads(1)
    bridge = psb_fast.PhaseBridge()
    model = mixture_2d_grid().as_model(bridge)
    m0 = bridge.sample_prior((2000, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = psb_fast.PhaseSampler(bridge, 200, default_setting(200).replace(variant="multistep", order=2),
                                      backend="float64").sample(model, m0, seed=0)
    limits = grids.MAX_STEP_RATIO, grids.MIN_STEP_ULPS
    grids.MAX_STEP_RATIO, grids.MIN_STEP_ULPS = float("inf"), 0
    try:
        print(f"{'grid':<7} {'gap':>7} {'ratio':>8} " + " ".join(f"{v:>20}" for v in VARIANTS))
        for name, base in GRIDS.items():
            i = base.index(None)
            for gap in GAPS:
                times = list(base)
                times[i] = times[i - 1] + gap
                h = torch.tensor(times, dtype=torch.float64).diff()
                ratio = float(max(h[i - 2], h[i]) / h[i - 1])
                errors = []
                for variant in VARIANTS:
                    sampler = psb_fast.PhaseSampler(bridge, len(times), grid=times, order=2,
                                                    backend="float64", variant=variant)
                    x1 = sampler.sample(model, m0, seed=0)
                    errors.append(float((x1 - reference).norm(dim=1).mean()))
                print(f"{name:<7} {gap:>7.0e} {ratio:>8.3g} " + " ".join(f"{e:>20.3g}" for e in errors))
    finally:
        grids.MAX_STEP_RATIO, grids.MIN_STEP_ULPS = limits
    worst = 0.0
    for nfe in range(1, 201):
        h = default_setting(nfe).grid(nfe, 1e-5).diff()
        if h.numel() > 1:
            worst = max(worst, float(torch.maximum(h[1:] / h[:-1], h[:-1] / h[1:]).max()))
    print(f"largest ratio of adjacent steps in the package defaults' grids (NFE 1..200): {worst:.3g}")


if __name__ == "__main__":
    main()
