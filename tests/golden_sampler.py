"""Golden sampler outputs: the cases, and the command that records them.

    python tests/golden_sampler.py      # rewrites tests/data/sampler_golden.pt (only on purpose)

tests/test_sampler_golden.py replays every case and compares with the recorded output (1e-6):
a restructuring of the sampler, its settings or its defaults must not change what it returns.
(Recorded again, on purpose, when the defaults study changed the defaults: only the cases that use
the defaults changed then. The cases keep the old keyword spelling of a setting on purpose: it must
keep meaning what it meant; tests/test_sampler.py covers the Setting spelling.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from psb_fast import PhaseBridge, PhaseSampler
from psb_fast.guidance import StrokeGuide
from psb_fast.oracles import mixture_2d_grid

PATH = Path(__file__).parent / "data" / "sampler_golden.pt"


def cases() -> dict[str, dict]:
    """name -> PhaseSampler kwargs and sample() kwargs (the model is the exact 3x3 mixture drift)."""
    out: dict[str, dict] = {}
    for nfe in (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 32, 50, 60):
        out[f"defaults-nfe{nfe}"] = {"sampler": {"nfe": nfe}}
    for nfe, T in ((5, 0.4), (10, 0.7), (20, 0.9)):
        out[f"published-nfe{nfe}"] = {"sampler": {"nfe": nfe, "T": T, "order": 2, "grid": "rev-quad"}}
    for order in range(4):
        for grid in ("uniform", "rev-quad", "power-1.5"):
            out[f"order{order}-{grid}"] = {"sampler": {"nfe": 8, "T": 0.8, "order": order, "grid": grid}}
    for variant in ("data", "multistep-corrector", "data-corrector"):
        out[f"variant-{variant}"] = {"sampler": {"nfe": 8, "T": 0.8, "order": 3, "grid": "power-1.5",
                                                 "variant": variant}}
    out["explicit-grid"] = {"sampler": {"nfe": 4, "grid": [1e-5, 0.2, 0.5, 0.75], "order": 2}}
    out["no-hop"] = {"sampler": {"nfe": 10, "hop": False}}
    out["no-hop-order3"] = {"sampler": {"nfe": 12, "hop": False, "order": 3, "T": 0.95}}
    for solver in ("sde", "em", "sscs"):
        out[f"sde-{solver}"] = {"sampler": {"nfe": 10, "solver": solver}, "sample": {"seed": 3}, "sde": True}
    out["inpaint"] = {"sampler": {"nfe": 10}, "guide": ("inpaint", 0.5), "sample": {"seed": 5}}
    out["dyn-v"] = {"sampler": {"nfe": 10}, "guide": ("dyn-v", None), "sample": {"seed": 5}}
    out["init-v"] = {"sampler": {"nfe": 10}, "guide": ("init-v", None)}
    return out


def run_case(case: dict, backend: str) -> torch.Tensor:
    bridge = PhaseBridge(mode="SDE" if case.get("sde") else "probODE")
    m0 = bridge.sample_prior((64, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if backend == "cpu":
        m0 = m0.float()
    model = mixture_2d_grid().as_model(bridge)
    kwargs = dict(case.get("sample", {}))
    if "guide" in case:
        mode, strength = case["guide"]
        stroke = torch.tensor([1.2, -1.0])
        kwargs["guide"] = StrokeGuide(stroke, mode=mode, strength=strength)
    sampler = PhaseSampler(bridge, backend=backend, **case["sampler"])
    return sampler.sample(model, m0, **kwargs).double()


def record() -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    return {f"{name}/{backend}": run_case(case, backend)
            for name, case in cases().items() for backend in ("float64", "cpu")}


if __name__ == "__main__":
    PATH.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record(), PATH)
    print(f"wrote {PATH}")
