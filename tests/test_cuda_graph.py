"""PhaseSampler(cuda_graph=True): argument checks everywhere; capture and replay on CUDA only
(run natively by benchmarks/gpu_check.sh)."""

import pytest
import torch

from psb_fast import PhaseBridge, PhaseSampler
from psb_fast.guidance import StrokeGuide
from psb_fast.oracles import mixture_2d_grid

torch.set_num_threads(1)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_graph_argument_checks():
    bridge = PhaseBridge()
    with pytest.raises(TypeError, match="cuda_graph"):
        PhaseSampler(bridge, 5, cuda_graph="yes")
    sampler = PhaseSampler(bridge, 5, cuda_graph=True, backend="cpu")
    model = mixture_2d_grid().as_model(bridge)
    m0 = bridge.sample_prior((4, 2))
    with pytest.raises(ValueError, match="CUDA device"):
        sampler.sample(model, m0)
    for kwargs in ({"return_trajectory": True}, {"callback": print}, {"progress": True},
                   {"guide": StrokeGuide(torch.zeros(2))}):
        with pytest.raises(ValueError, match="cuda_graph"):
            sampler.sample(model, m0, **kwargs)


def capturable_model(seed: int = 0):
    """A small fixed network on the GPU: only device ops, so the whole loop can be captured (the
    exact-drift oracles validate t with host syncs and are not capturable)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)).cuda()

    def model(m, t):
        return net(torch.cat([m, t[:, None]], dim=1))

    return model


@cuda
@pytest.mark.parametrize("nfe", [5, 10])
def test_graph_replay_equals_eager_ode(nfe):
    bridge = PhaseBridge()
    model = capturable_model()
    eager = PhaseSampler(bridge, nfe)
    graphed = PhaseSampler(bridge, nfe, cuda_graph=True)
    for seed in (0, 1):
        m0 = bridge.sample_prior((512, 2), generator=torch.Generator().manual_seed(seed)).cuda()
        a, b = eager.sample(model, m0), graphed.sample(model, m0)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert len(graphed._graphs) == 1


@cuda
@pytest.mark.parametrize("solver", ["sde", "em", "sscs"])
def test_graph_replays_draw_fresh_noise(solver):
    bridge = PhaseBridge(mode="SDE")
    model = capturable_model()
    sampler = PhaseSampler(bridge, 20, solver=solver, cuda_graph=True)
    m0 = bridge.sample_prior((4096, 2), generator=torch.Generator().manual_seed(0)).cuda()
    a, b = sampler.sample(model, m0), sampler.sample(model, m0)
    assert not torch.equal(a, b)
    assert torch.isfinite(a).all() and (a.mean(0) - b.mean(0)).abs().max() < 0.1


@cuda
def test_graph_reports_nonfinite_model_output():
    bridge = PhaseBridge()
    sampler = PhaseSampler(bridge, 5, cuda_graph=True)
    m0 = bridge.sample_prior((8, 2)).cuda()
    with pytest.raises(ValueError, match="step 0"):
        sampler.sample(lambda m, t: torch.full_like(m[:, :2], float("nan")), m0)
