"""PhaseSampler outputs equal the recorded golden outputs (tests/golden_sampler.py) to 1e-6."""

import pytest
import torch
from golden_sampler import PATH, cases, run_case

GOLDEN = torch.load(PATH, weights_only=True)


@pytest.mark.parametrize("backend", ["float64", "cpu"])
@pytest.mark.parametrize("name", sorted(cases()))
def test_sampler_output_is_unchanged(name, backend):
    torch.set_num_threads(1)
    out = run_case(cases()[name], backend)
    expected = GOLDEN[f"{name}/{backend}"]
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= 1e-6 * max(1.0, expected.abs().max().item())
