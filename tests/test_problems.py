"""Generated benchmark problems (psb_fast.benchmarks.problems): splits, reproducibility, scale, drifts."""

from __future__ import annotations

import pytest
import torch

from psb_fast.benchmarks import problems as P
from psb_fast.bridge import PhaseBridge

torch.set_num_threads(1)

ALL = {split: P.problems(split) for split in P.SPLITS}


def test_default_counts_and_disjoint_splits() -> None:
    seeds = {split: {p.seed for p in probs} for split, probs in ALL.items()}
    assert {split: len(probs) for split, probs in ALL.items()} == P.DEFAULT_COUNTS
    assert not (seeds["tune"] & seeds["validate"] or seeds["tune"] & seeds["test"]
                or seeds["validate"] & seeds["test"])
    for split, probs in ALL.items():
        assert all(p.split == split and P.split_of(p.seed) == split for p in probs)
        assert len({p.name for p in probs}) == len(probs)
    assert [p.seed for p in P.problems("test", 5)] == [p.seed for p in ALL["test"][:5]]


def test_reproducible_from_seed() -> None:
    for p in ALL["validate"][:12]:
        again = P.problem(p.seed)
        assert (again.name, again.family, again.detail) == (p.name, p.family, p.detail)
        for attr in ("means", "stds", "weights"):
            assert torch.equal(getattr(again.mixture, attr), getattr(p.mixture, attr))
        assert (again.mixture.rotation is None) == (p.mixture.rotation is None)
        if p.mixture.rotation is not None:
            assert torch.equal(again.mixture.rotation, p.mixture.rotation)
    # Different seeds give different problems.
    first = ALL["tune"][0].mixture
    assert not any(
        p.mixture.means.shape == first.means.shape and torch.equal(p.mixture.means, first.means)
        for p in ALL["tune"][1:]
    )


def test_family_coverage() -> None:
    assert set(P.FAMILY_CYCLE) == set(P.FAMILIES)
    for split in P.SPLITS:
        assert {p.family for p in P.problems(split, len(P.FAMILY_CYCLE))} == set(P.FAMILIES)
    probs = [p for split in ALL.values() for p in split]
    assert any(not p.mixture.isotropic and p.mixture.rotation is not None for p in probs)
    assert any(p.mixture.dim >= 32 for p in probs) and any(p.mixture.n_components >= 40 for p in probs)
    planar = ("rings", "spiral", "checkerboard", "curve", "grid")
    assert {p.mixture.dim for p in probs if p.family in planar} == {2}
    assert all(p.mixture.dim >= 3 for p in probs if p.family == "embedded")
    assert any("clusters" in p.detail for p in probs) and any("spread" in p.detail for p in probs)


def test_shapes_and_scale() -> None:
    for probs in ALL.values():
        for p in probs:
            mix = p.mixture
            k, d = mix.n_components, mix.dim
            assert 2 <= d <= 64 and k >= 2 and k * d <= P.MAX_SIZE
            assert mix.stds.shape in ((k,), (k, d)) and mix.weights.shape == (k,)
            assert 0.5 <= P.overall_std(mix) <= 1.5, p.label
            assert abs(mix.weights @ mix.means).max() < 1e-12
            assert p.label.startswith(p.name)
    # overall_std against draws, on a few problems.
    for p in ALL["test"][:10]:
        x = p.mixture.sample(20_000, torch.Generator().manual_seed(p.seed))
        empirical = x.var(0).mean().sqrt().item()
        assert empirical == pytest.approx(P.overall_std(p.mixture), rel=0.1), p.label


@pytest.mark.parametrize("mode, splits", [("probODE", tuple(P.SPLITS)), ("SDE", ("validate",))])
@pytest.mark.slow
def test_drift_finite(mode: str, splits: tuple[str, ...]) -> None:
    bridge = PhaseBridge(mode=mode)
    coefs = {t: bridge.coefficients(torch.tensor(t, dtype=torch.float64)) for t in (0.5, 0.999)}
    for split in splits:
        for p in ALL[split]:
            gen = torch.Generator().manual_seed(p.seed)
            d = p.mixture.dim
            prior = bridge.sample_prior((8, d), generator=gen).to(torch.float64)
            assert bool(torch.isfinite(p.mixture.drift(bridge, prior, 0.0)).all()), p.label
            x1 = p.mixture.sample(8, gen)
            for t, co in coefs.items():  # a state near the data's bridge at t
                x = co.cx * x1 + co.lxx * torch.randn(8, d, generator=gen, dtype=torch.float64)
                v = co.cv * x1 + co.lxv * torch.randn(8, d, generator=gen, dtype=torch.float64)
                drift = p.mixture.drift(bridge, torch.cat([x, v], 1), t)
                assert bool(torch.isfinite(drift).all()), (p.label, t)


def test_errors() -> None:
    with pytest.raises(ValueError, match="split"):
        P.problems("train")
    with pytest.raises(ValueError, match="count"):
        P.problems("test", 0)
    with pytest.raises(ValueError, match="seed"):
        P.problem(-1)
