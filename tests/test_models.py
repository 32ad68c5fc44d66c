"""Networks: shapes, time/cond handling, gradients, zero-init output, make_model and bad arguments."""

import pytest
import torch

from psb_fast.models import ResMLP, UNet, make_model, timestep_embedding

torch.set_num_threads(1)


def _perturb_output(model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    torch.nn.init.normal_(model.out.weight, std=0.1)


def _small(name: str, x_shape: tuple, num_classes=None) -> torch.nn.Module:
    kwargs = {"hidden": 16, "depth": 2, "time_dim": 8} if name == "mlp" else {"base": 8}
    torch.manual_seed(0)
    return make_model(name, x_shape, num_classes, **kwargs)


CASES = [("mlp", (3,)), ("unet", (1, 8, 8)), ("unet", (3, 16, 12))]


@pytest.mark.parametrize("name,x_shape", CASES)
def test_shapes_zero_init_and_grad(name, x_shape):
    model = _small(name, x_shape)
    m = torch.randn(5, 2 * x_shape[0], *x_shape[1:])
    out = model(m, torch.rand(5))
    assert out.shape == (5, *x_shape) and out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    assert model.out.weight.grad.abs().sum() > 0
    _perturb_output(model)
    model.zero_grad()
    out = model(m, torch.rand(5))
    assert out.abs().min() > 0
    out.square().sum().backward()
    first = next(p for n, p in model.named_parameters() if n.startswith("inp."))
    assert first.grad.abs().sum() > 0


@pytest.mark.parametrize("name,x_shape", CASES[:2])
def test_time_is_used_and_scalar_t_broadcasts(name, x_shape):
    model = _small(name, x_shape)
    _perturb_output(model)
    m = torch.randn(4, 2 * x_shape[0], *x_shape[1:])
    a = model(m, torch.full((4,), 0.3))
    assert torch.allclose(a, model(m, torch.tensor(0.3)))
    assert torch.allclose(a, model(m, 0.3))
    assert torch.allclose(a, model(m, torch.full((4,), 0.3, dtype=torch.float64)))
    assert (a - model(m, torch.full((4,), 0.31))).abs().max() > 1e-4


@pytest.mark.parametrize("name,x_shape", CASES[:2])
def test_class_conditioning(name, x_shape):
    model = _small(name, x_shape, num_classes=4)
    _perturb_output(model)
    m = torch.randn(3, 2 * x_shape[0], *x_shape[1:]).repeat(2, *[1] * len(x_shape))
    t = torch.full((6,), 0.5)
    out = model(m, t, torch.tensor([0, 1, 2, 3, 3, 3]))
    assert (out[0] - out[1]).abs().max() > 1e-4
    null = model(m, t)
    assert torch.allclose(null, model(m, t, torch.full((6,), 4)))
    assert (null - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"cond must have shape \[6\]"):
        model(m, t, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(m, t, torch.zeros(6))
    unconditional = _small(name, x_shape)
    with pytest.raises(ValueError, match="without num_classes"):
        unconditional(m, t, torch.zeros(6, dtype=torch.long))


def test_autocast_bfloat16():
    for name, x_shape in CASES[:2]:
        model = _small(name, x_shape, num_classes=2)
        _perturb_output(model)
        m = torch.randn(2, 2 * x_shape[0], *x_shape[1:])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(m, torch.rand(2), torch.tensor([0, 1]))
        assert out.shape == (2, *x_shape) and torch.isfinite(out.float()).all()
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0.0, 0.5]), 7)
    assert emb.shape == (2, 7) and torch.all(emb[:, -1] == 0)
    assert torch.allclose(emb[0, :3], torch.ones(3)) and torch.allclose(emb[0, 3:6], torch.zeros(3))
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(500.0)))


def test_make_model_auto_and_defaults():
    assert isinstance(make_model("auto", (2,)), ResMLP)
    digits = make_model("auto", (1, 8, 8), 10, base=8)
    assert isinstance(digits, UNet) and digits.mults == (1, 2) and digits.num_classes == 10
    assert make_model("auto", (3, 32, 32), base=8).mults == (1, 2, 2)
    out = make_model("unet", (3, 32, 32), base=8)(torch.randn(1, 6, 32, 32), torch.rand(1))
    assert out.shape == (1, 3, 32, 32)


def test_bad_arguments():
    bad_make = [("gan", (2,)), ("mlp", (1, 8, 8)), ("unet", (2,)), ("auto", (2, 3)), ("mlp", ()),
                ("mlp", (0,)), ("unet", (1, 6, 6), {"mults": (1, 2, 2)})]
    for name, shape, *kwargs in bad_make:
        with pytest.raises(ValueError):
            make_model(name, shape, **(kwargs[0] if kwargs else {}))
    with pytest.raises(TypeError):
        make_model("mlp", (2,), base=8)
    for kwargs in ({"dim": 0}, {"dim": 2, "hidden": 0}, {"dim": 2, "num_classes": 0},
                   {"dim": 2, "time_dim": 1}):
        with pytest.raises(ValueError):
            ResMLP(**kwargs)
    for kwargs in ({"mults": ()}, {"mults": (1, 0)}, {"dropout": 1.0}, {"num_res": 0}, {"base": 2.5}):
        with pytest.raises(ValueError):
            UNet(1, **kwargs)
    mlp, unet = ResMLP(2, hidden=8, depth=1, time_dim=4), UNet(1, base=8)
    with pytest.raises(ValueError, match=r"m must have shape \[B, 4\]"):
        mlp(torch.randn(3, 2), torch.rand(3))
    with pytest.raises(ValueError, match=r"t must have shape \[3\]"):
        mlp(torch.randn(3, 4), torch.rand(2))
    with pytest.raises(TypeError, match="float"):
        mlp(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 2, H, W\]"):
        unet(torch.randn(3, 1, 8, 8), torch.rand(3))
    with pytest.raises(ValueError, match="divisible by 2"):
        unet(torch.randn(3, 2, 7, 8), torch.rand(3))
