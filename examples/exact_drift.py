"""Sample a 2-D Gaussian mixture with its exact probability-flow drift and print the error.

The drift is what a perfectly trained AGM network would output (psb_fast.oracles), so the
only error left is the sampler's: pathwise RMSE of the output against a high-accuracy
scipy solve of the same ODE from the same m0. Usage:

    python examples/exact_drift.py [--batch 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch

from psb_fast import PhaseBridge, PhaseSampler
from psb_fast.oracles import mixture_2d_grid, ode_solution
from psb_fast.settings import T_END, published_setting


def exact_output(mix, bridge: PhaseBridge, m0: torch.Tensor, T: float, hop: bool) -> torch.Tensor:
    """The exact-ODE counterpart of a sampler's output: x1_hat at T (hop) or x(0.999)."""
    if hop:
        mT = ode_solution(mix, bridge, m0, 1e-5, T)
        return bridge.estimate_x1(mT, mix.drift(bridge, mT, T), T)
    return ode_solution(mix, bridge, m0, 1e-5, T_END)[:, : m0.shape[1] // 2]


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bridge, mix = PhaseBridge(), mixture_2d_grid()
    model = mix.as_model(bridge)
    m0 = bridge.sample_prior((args.batch, 2), generator=torch.Generator().manual_seed(args.seed),
                             dtype=torch.float64)
    print(f"exact-drift 3x3 Gaussian mixture, B={args.batch}, pathwise RMSE vs scipy DOP853 (rtol 1e-11)")
    print("\npublished settings (order 2, rev-quad, hop):")
    print(f"{'NFE':>4} {'T':>5} {'RMSE':>10} {'sample ms':>10}")
    for nfe in (5, 10, 20):
        published = published_setting(nfe)  # T 0.4, 0.7, 0.9
        T = published.T
        ref = exact_output(mix, bridge, m0, T, hop=True)
        sampler = PhaseSampler(bridge, nfe, published, backend="cpu")
        start = time.perf_counter()
        out = sampler.sample(model, m0.float())
        ms = 1e3 * (time.perf_counter() - start)
        print(f"{nfe:>4} {T:>5} {rmse(out, ref):>10.2e} {ms:>10.1f}")
    print("\nconvergence, no hop (grid to T=0.99, last step to 0.999), RMSE by solver order:")
    ref = exact_output(mix, bridge, m0, 0.99, hop=False)
    nfes = (5, 10, 20, 40, 80)
    print(f"{'order':>5} " + " ".join(f"{'NFE ' + str(n):>9}" for n in nfes))
    for order in range(4):
        errs = [
            rmse(PhaseSampler(bridge, n, published_setting(n).replace(T=0.99, order=order), hop=False,
                              backend="float64")
                 .sample(model, m0), ref)
            for n in nfes
        ]
        print(f"{order:>5} " + " ".join(f"{e:>9.2e}" for e in errs))


if __name__ == "__main__":
    main()
