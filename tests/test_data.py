"""Data sources: every spec, shapes/dtypes/ranges, determinism, sharding and bad input."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from psb_fast.data import TOY_SETS, load_data

torch.set_num_threads(1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("spec", TOY_SETS)
def test_toy_sets(spec):
    source = load_data(spec)
    assert source.x_shape == (2,) and source.size is None and source.name == spec
    x, y = source.sample(2000, _gen())
    assert x.dtype == torch.float32 and x.shape == (2000, 2)
    assert x.abs().max() < 2.0 and x.abs().max() > 1.2
    assert x.std(dim=0).min() > 0.3
    x2, _ = source.sample(2000, _gen())
    assert torch.equal(x, x2)
    x3, _ = source.sample(2000, _gen(1))
    assert not torch.equal(x, x3)
    assert source.shard(1, 4) is source
    if spec == "gmm-grid":
        assert source.num_classes == 9 and y.dtype == torch.long and y.shape == (2000,)
        assert set(y.tolist()) == set(range(9))
        means = torch.stack([x[y == k].mean(0) for k in range(9)])
        assert torch.cdist(means, means).add(torch.eye(9) * 10).min() > 1.0
    else:
        assert source.num_classes is None and y is None


def test_toy_split_streams_differ():
    train, test = load_data("spiral"), load_data("spiral", split="test")
    assert torch.equal(train.all(n=100)[0], load_data("spiral").all(n=100)[0])
    assert not torch.equal(train.all(n=100)[0], test.all(n=100)[0])
    assert not torch.equal(train.all(n=100)[0], load_data("spiral", seed=1).all(n=100)[0])
    with pytest.raises(ValueError, match="needs n"):
        train.all()


def test_digits_split():
    train, test = load_data("digits"), load_data("digits", split="test")
    assert train.x_shape == (1, 8, 8) and train.num_classes == 10
    xtr, ytr = train.all()
    xte, yte = test.all()
    assert train.size + test.size == 1797 and abs(test.size / 1797 - 0.2) < 0.01
    assert xtr.dtype == torch.float32 and xtr.min() == -1.0 and xtr.max() == 1.0
    counts = yte.bincount(minlength=10).float() / ytr.bincount(minlength=10).float()
    assert ((counts - 0.25).abs() < 0.02).all()
    flat_tr, flat_te = xtr.flatten(1), xte.flatten(1)
    assert torch.cdist(flat_te[:50], flat_tr).min(dim=1).values.max() > 0
    xb, yb = train.sample(64, _gen(3))
    assert xb.shape == (64, 1, 8, 8) and yb.dtype == torch.long
    assert torch.equal(xb, train.sample(64, _gen(3))[0])


def test_tensor_npy_and_pt(tmp_path):
    data = np.random.default_rng(0).uniform(-1, 1, size=(12, 3, 4)).astype(np.float64)
    np.save(tmp_path / "a.npy", data)
    source = load_data(f"tensor:{tmp_path / 'a.npy'}")
    assert source.x_shape == (3, 4) and source.size == 12 and source.num_classes is None
    x, y = source.all()
    assert y is None and x.dtype == torch.float32
    assert torch.allclose(x, torch.from_numpy(data).float())
    xs = torch.randn(10, 5)
    torch.save({"x": xs, "y": torch.arange(10) % 3}, tmp_path / "b.pt")
    source = load_data(f"tensor:{tmp_path / 'b.pt'}", split="test")
    assert source.num_classes == 3
    xb, yb = source.sample(32, _gen())
    index = torch.randint(10, (32,), generator=_gen())
    assert torch.equal(xb, xs[index]) and torch.equal(yb, index % 3)
    torch.save(xs, tmp_path / "c.pt")
    assert torch.equal(load_data(f"tensor:{tmp_path / 'c.pt'}").all()[0], xs)


def test_shard_disjoint_and_covering(tmp_path):
    torch.save({"x": torch.arange(11.0)[:, None], "y": torch.arange(11)}, tmp_path / "d.pt")
    source = load_data(f"tensor:{tmp_path / 'd.pt'}")
    parts = [source.shard(r, 3) for r in range(3)]
    assert [p.size for p in parts] == [4, 4, 3]
    seen = torch.cat([p.all()[1] for p in parts])
    assert sorted(seen.tolist()) == list(range(11))
    assert torch.equal(parts[1].all()[1], torch.tensor([1, 4, 7, 10]))
    x, y = parts[2].sample(50, _gen())
    assert set(y.tolist()) <= {2, 5, 8} and torch.equal(x[:, 0], y.float())
    assert source.all(n=3)[1].tolist() == [0, 1, 2]
    for rank, world in ((3, 3), (-1, 2), (0, 0), (0, 12)):
        with pytest.raises(ValueError):
            source.shard(rank, world)


def test_images_folder(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, size=(3, 6, 5, 3), dtype=np.uint8)
    for i, a in enumerate(rgb):
        Image.fromarray(a).save(tmp_path / f"im{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    source = load_data(f"images:{tmp_path}")
    assert source.x_shape == (3, 6, 5) and source.size == 3 and source.num_classes is None
    x, y = source.all()
    assert y is None and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    expected = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(x, expected)
    gray = tmp_path / "gray"
    gray.mkdir()
    for i in range(2):
        Image.fromarray(np.full((4, 4), 255 * i, dtype=np.uint8), mode="L").save(gray / f"g{i}.jpg")
    x, _ = load_data(f"images:{gray}").all()
    assert x.shape == (2, 1, 4, 4) and x[0].max() < -0.9 and x[1].min() > 0.9


def _write_cifar(root, n_per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = {b"data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
                 b"labels": [(i + j) % 10 for j in range(n_per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def test_cifar10(tmp_path):
    folder = _write_cifar(tmp_path)
    train = load_data(f"cifar10:{tmp_path}")
    test = load_data(f"cifar10:{tmp_path}", split="test")
    assert train.size == 20 and test.size == 4 and train.x_shape == (3, 32, 32) and train.num_classes == 10
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f)
    x, y = test.all()
    assert torch.allclose(x, torch.from_numpy(raw[b"data"]).view(4, 3, 32, 32).float() / 127.5 - 1)
    assert y.tolist() == raw[b"labels"]
    xb, yb = train.sample(8, _gen())
    assert xb.dtype == torch.float32 and xb.shape == (8, 3, 32, 32) and yb.dtype == torch.long
    (folder / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="data_batch_3"):
        load_data(f"cifar10:{tmp_path}")
    assert load_data(f"cifar10:{tmp_path}", split="test").size == 4


def test_cifar10_accepts_the_batches_folder_or_its_parent(tmp_path):
    folder = _write_cifar(tmp_path / "parent")
    by_folder = load_data(f"cifar10:{folder}", split="test").all()
    by_parent = load_data(f"cifar10:{folder.parent}", split="test").all()
    assert torch.equal(by_folder[0], by_parent[0]) and torch.equal(by_folder[1], by_parent[1])
    assert load_data(f"cifar10:{folder}").size == 20
    renamed = folder.rename(tmp_path / "my-cifar")  # the batches in a folder of any name
    assert load_data(f"cifar10:{renamed}", split="test").size == 4


def test_cifar10_error_names_every_path_tried(tmp_path):
    with pytest.raises(ValueError) as info:
        load_data(f"cifar10:{tmp_path}", split="test")
    message = str(info.value)
    assert repr(str(tmp_path / "test_batch")) in message
    assert repr(str(tmp_path / "cifar-10-batches-py" / "test_batch")) in message


@pytest.mark.parametrize("make, kind", [
    (lambda: torch.randn(4, 2).to_sparse(), "sparse_coo"),
    (lambda: torch.empty(4, 2, device="meta"), "meta"),
    (lambda: {"x": torch.randn(4, 2), "y": torch.tensor([0, 1, 0, 1]).to_sparse()}, "sparse_coo"),
])
def test_pt_file_with_a_sparse_or_meta_tensor_is_refused(tmp_path, make, kind):
    path = tmp_path / "data.pt"
    torch.save(make(), path)
    with pytest.raises(TypeError, match=f"dense tensor.*got a {kind} tensor") as info:
        load_data(f"tensor:{path}")
    assert str(path) in str(info.value)


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="spec must be one of"):
        load_data("mnist")
    with pytest.raises(ValueError, match="spec must be one of"):
        load_data("tensor:")
    with pytest.raises(TypeError, match="spec"):
        load_data(3)
    with pytest.raises(ValueError, match="split"):
        load_data("spiral", split="val")
    with pytest.raises(ValueError, match="seed"):
        load_data("spiral", seed=-1)
    with pytest.raises(ValueError, match="no such file"):
        load_data(f"tensor:{tmp_path / 'missing.npy'}")
    with pytest.raises(ValueError, match="no such folder"):
        load_data(f"images:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="cifar-10-batches-py"):
        load_data(f"cifar10:{tmp_path}")


def test_bad_tensors(tmp_path):
    np.save(tmp_path / "int.npy", np.zeros((4, 2), dtype=np.int64))
    np.save(tmp_path / "flat.npy", np.zeros(4, dtype=np.float32))
    np.save(tmp_path / "nan.npy", np.array([[0.0], [np.nan]]))
    torch.save({"y": torch.zeros(3)}, tmp_path / "nox.pt")
    torch.save({"x": torch.zeros(3, 2), "y": torch.zeros(3)}, tmp_path / "floaty.pt")
    torch.save({"x": torch.zeros(3, 2), "y": torch.zeros(4, dtype=torch.long)}, tmp_path / "shorty.pt")
    torch.save({"x": torch.zeros(3, 2), "y": torch.tensor([0, -1, 2])}, tmp_path / "negy.pt")
    (tmp_path / "x.csv").write_text("1,2")
    (tmp_path / "junk.npy").write_text("not an array")
    cases = [("int.npy", TypeError, "float"), ("flat.npy", ValueError, r"\[N, \.\.\.\]"),
             ("nan.npy", ValueError, "non-finite"), ("nox.pt", ValueError, "key 'x'"),
             ("floaty.pt", TypeError, "integer"), ("shorty.pt", ValueError, r"shape \[3\]"),
             ("negy.pt", ValueError, ">= 0"), ("x.csv", ValueError, ".npy or .pt"),
             ("junk.npy", ValueError, "readable")]
    for name, error, message in cases:
        with pytest.raises(error, match=message):
            load_data(f"tensor:{tmp_path / name}")


def test_bad_images(tmp_path):
    with pytest.raises(ValueError, match="no .png"):
        load_data(f"images:{tmp_path}")
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((5, 4, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="same size"):
        load_data(f"images:{tmp_path}")
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read"):
        load_data(f"images:{tmp_path}")


def test_bad_sample_args():
    for source in (load_data("rings"), load_data("digits")):
        with pytest.raises(ValueError, match="batch_size"):
            source.sample(0, _gen())
        with pytest.raises(TypeError, match="generator"):
            source.sample(4, 0)
        with pytest.raises(ValueError, match="n must"):
            source.all(n=0)
    with pytest.raises(ValueError, match="size"):
        load_data("digits", split="test").all(n=10_000)
