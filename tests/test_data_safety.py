"""Untrusted data files: CIFAR pickles that try to run code, bit depths, ranges, dtypes, decompression
bombs and malformed files all end in one ValueError/TypeError naming the file (nothing runs)."""

import os
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from psb_fast import data
from psb_fast.data import MAX_IMAGE_PIXELS, load_data

torch.set_num_threads(1)


def _cifar_folder(root, batches: dict, protocol: int = pickle.DEFAULT_PROTOCOL):
    """Write `batches` {file name: object} as pickles under root/cifar-10-batches-py."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, batch in batches.items():
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return folder


def _batch(n: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


class _Payload:
    """Unpickles as a call of `function(argument)`."""

    def __init__(self, function, argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("function", [os.system, exec], ids=["os.system", "exec"])
def test_cifar_pickle_with_code_is_refused_and_not_run(tmp_path, function):
    marker = tmp_path / "marker"
    argument = f"touch {marker}" if function is os.system else f"open({str(marker)!r}, 'w').close()"
    batch = {**_batch(), b"extra": _Payload(function, argument)}
    _cifar_folder(tmp_path, {"test_batch": batch})
    with pytest.raises(ValueError, match=r"test_batch.*(system|exec).*refusing") as info:
        load_data(f"cifar10:{tmp_path}", split="test")
    assert "cifar10 spec" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_of_every_protocol_still_load(tmp_path, protocol):
    batch = _batch(5)
    batch[b"labels"] = np.asarray(batch[b"labels"], dtype=np.int32) if protocol == 4 else batch[b"labels"]
    _cifar_folder(tmp_path, {"test_batch": batch}, protocol=protocol)
    x, y = load_data(f"cifar10:{tmp_path}", split="test").all()
    assert torch.equal(x, torch.from_numpy(batch[b"data"]).view(5, 3, 32, 32).float() / 127.5 - 1)
    assert y.tolist() == list(np.asarray(batch[b"labels"]))


NUMPY1_CORE, NUMPY2_CORE = b"numpy.core.multiarray", b"numpy._core.multiarray"


def _cifar_pickle_naming(tmp_path, core: bytes) -> dict:
    """A protocol-2 CIFAR pickle whose array rebuilder is `core`._reconstruct, whichever numpy runs.

    numpy 1 pickles arrays as numpy.core.multiarray._reconstruct, numpy 2 as
    numpy._core.multiarray._reconstruct (protocol 2 writes the global as the text "MODULE\nNAME\n"):
    the path the running numpy wrote is found and replaced by `core`. Returns the batch written.
    """
    batch = _batch(2)
    folder = _cifar_folder(tmp_path, {"test_batch": batch}, protocol=2)
    raw = (folder / "test_batch").read_bytes()
    written = [path for path in (NUMPY1_CORE, NUMPY2_CORE) if path + b"\n_reconstruct\n" in raw]
    assert len(written) == 1, raw  # exactly one of the two paths, the running numpy's
    raw = raw.replace(written[0] + b"\n", core + b"\n")
    assert core + b"\n_reconstruct\n" in raw and raw.count(b"multiarray") == 1, raw
    (folder / "test_batch").write_bytes(raw)
    return batch


def test_cifar_pickle_with_numpy1_module_paths_loads(tmp_path):
    """The published files (Python 2, numpy 1) name numpy.core.multiarray._reconstruct."""
    batch = _cifar_pickle_naming(tmp_path, NUMPY1_CORE)
    x, y = load_data(f"cifar10:{tmp_path}", split="test").all()
    assert torch.equal(x, torch.from_numpy(batch[b"data"]).view(2, 3, 32, 32).float() / 127.5 - 1)
    assert y.tolist() == batch[b"labels"]


def test_cifar_pickle_with_numpy2_module_paths_loads(tmp_path):
    """A batch re-pickled under numpy 2 names numpy._core.multiarray._reconstruct (loads on numpy 1 too)."""
    batch = _cifar_pickle_naming(tmp_path, NUMPY2_CORE)
    x, y = load_data(f"cifar10:{tmp_path}", split="test").all()
    assert torch.equal(x, torch.from_numpy(batch[b"data"]).view(2, 3, 32, 32).float() / 127.5 - 1)
    assert y.tolist() == batch[b"labels"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({b"data": np.full((2, 3072), 300, dtype=np.int64)}, r"0\.\.255, got 300\.\.300"),
        ({b"data": np.full((2, 3072), -1, dtype=np.int16)}, r"0\.\.255, got -1"),
        ({b"data": np.zeros((2, 3072), dtype=np.float32)}, r"integer array \[N, 3072\].*float32"),
        ({b"data": np.zeros((2, 3, 32, 32), dtype=np.uint8)}, r"\[N, 3072\].*\(2, 3, 32, 32\)"),
        ({b"data": np.zeros((0, 3072), dtype=np.uint8), b"labels": []}, r"N >= 1"),
        ({b"data": [[0] * 3072] * 2}, r"integer array.*got list"),
        ({b"labels": [0, 1, 2]}, r"one label per image \(2\)"),
        ({b"labels": [0, 10]}, r"0\.\.9, got 0\.\.10"),
        ({b"labels": ["cat", "dog"]}, r"list of ints.*str"),
        ({b"labels": [0.0, 1.5]}, r"list of ints.*float"),
        ({b"labels": np.array([0.0, 1.0])}, r"list of ints.*float64 array"),
    ],
)
def test_cifar_batch_of_wrong_content_is_refused_naming_the_file(tmp_path, change, message):
    batch = {**_batch(2), **change}
    _cifar_folder(tmp_path, {"test_batch": batch})
    with pytest.raises(ValueError, match=message) as info:
        load_data(f"cifar10:{tmp_path}", split="test")
    assert "test_batch" in str(info.value)


@pytest.mark.parametrize(
    ("batch", "message"),
    [([1, 2, 3], "must hold a dict, got list"), ({b"data": np.zeros((2, 3072), np.uint8)}, "needs keys"),
     ({1: 2, b"x": 3}, "needs keys"), (np.zeros(3), "must hold a dict, got ndarray")],
)
def test_cifar_batch_of_wrong_structure_is_refused(tmp_path, batch, message):
    _cifar_folder(tmp_path, {"test_batch": batch})
    with pytest.raises(ValueError, match=message) as info:
        load_data(f"cifar10:{tmp_path}", split="test")
    assert "test_batch" in str(info.value)


def test_cifar_object_arrays_are_refused(tmp_path):
    _cifar_folder(tmp_path, {"test_batch": {**_batch(2), b"extra": np.array([{}, []], dtype=object)}})
    with pytest.raises(ValueError, match="test_batch.*object dtype"):
        load_data(f"cifar10:{tmp_path}", split="test")


def test_16bit_png_is_scaled_by_its_bit_depth(tmp_path):
    ramp = np.linspace(0, 65535, 128 * 128).round().astype(np.uint16).reshape(128, 128)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I")
    x, _ = load_data(f"images:{tmp_path}").all()
    assert x.shape == (1, 1, 128, 128) and x.dtype == torch.float32
    expected = torch.from_numpy(ramp.astype(np.float64) / 65535 * 2 - 1).float()
    assert torch.allclose(x[0, 0], expected, atol=1e-6)
    assert (x == 1).float().mean() < 0.001 and x.min() == -1


def test_16bit_gray_next_to_rgb_keeps_both_depths(tmp_path):
    Image.fromarray(np.full((4, 4), 65535 // 2, dtype=np.uint16)).save(tmp_path / "a.png")
    Image.fromarray(np.full((4, 4, 3), 255, dtype=np.uint8)).save(tmp_path / "b.png")
    x, _ = load_data(f"images:{tmp_path}").all()
    assert x.shape == (2, 3, 4, 4)
    assert torch.allclose(x[0], torch.full((3, 4, 4), 32767 / 65535 * 2 - 1)) and bool((x[1] == 1).all())


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG that declares width x height 8-bit gray pixels and holds almost no data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(100_000, 100_000), (MAX_IMAGE_PIXELS // 1000 + 1, 1000)])
def test_decompression_bomb_png_is_refused_naming_the_file(tmp_path, size):
    _png_header_only(tmp_path / "bomb.png", *size)
    with pytest.raises(ValueError, match=r"bomb\.png.*too large.*pixels per image"):
        load_data(f"images:{tmp_path}")


def test_float_mode_image_is_refused(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((4, 4), dtype=np.float32)).save(tmp_path / "f.tiff")
    (tmp_path / "f.tiff").rename(tmp_path / "f.png")  # PIL reads the content, whatever the name
    with pytest.raises(ValueError, match=r"f\.png.*mode F"):
        load_data(f"images:{tmp_path}")


@pytest.mark.parametrize("name", ["empty.npy", "empty.pt"])
def test_zero_byte_tensor_files_are_refused_naming_the_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{name}.*empty"):
        load_data(f"tensor:{tmp_path / name}")


def test_truncated_npy_is_refused_naming_the_file(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 4)))
    (tmp_path / "a.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:20])
    with pytest.raises(ValueError, match=r"a\.npy.*readable"):
        load_data(f"tensor:{tmp_path / 'a.npy'}")


def test_float64_beyond_float32_range_is_refused(tmp_path):
    np.save(tmp_path / "big.npy", np.array([[1e300], [0.0]]))
    torch.save({"x": torch.tensor([[0.0], [-1e39]], dtype=torch.float64)}, tmp_path / "big.pt")
    for name in ("big.npy", "big.pt"):
        with pytest.raises(ValueError, match=rf"{name}.*non-finite.*float32"):
            load_data(f"tensor:{tmp_path / name}")
    np.save(tmp_path / "ok.npy", np.array([[3e38], [-1.0]]))
    assert bool(torch.isfinite(load_data(f"tensor:{tmp_path / 'ok.npy'}").all()[0]).all())


def test_string_and_record_arrays_are_refused_naming_the_file(tmp_path):
    np.save(tmp_path / "str.npy", np.array([["a"], ["b"]]))
    np.save(tmp_path / "rec.npy", np.zeros((2, 2), dtype=[("a", "f4")]))
    np.savez(tmp_path / "arch.npz", x=np.zeros((2, 2)))
    (tmp_path / "arch.npz").rename(tmp_path / "arch.npy")
    torch.save({"x": torch.zeros(3, 2), "y": ["a", "b", "c"]}, tmp_path / "labels.pt")
    for name, error, message in [("str.npy", TypeError, "float array, got dtype <U1"),
                                 ("rec.npy", TypeError, "float array"), ("arch.npy", ValueError, ".npz"),
                                 ("labels.pt", TypeError, "integer tensor, got list")]:
        with pytest.raises(error, match=message) as info:
            load_data(f"tensor:{tmp_path / name}")
        assert name in str(info.value)


def test_big_endian_npy_loads(tmp_path):
    np.save(tmp_path / "be.npy", np.arange(6, dtype=">f4").reshape(3, 2))
    assert load_data(f"tensor:{tmp_path / 'be.npy'}").all()[0].flatten().tolist() == list(range(6))


def test_huge_labels_are_refused(tmp_path):
    torch.save({"x": torch.zeros(2, 2), "y": torch.tensor([0, data.MAX_CLASSES])}, tmp_path / "y.pt")
    with pytest.raises(ValueError, match=r"y\.pt.*must be <"):
        load_data(f"tensor:{tmp_path / 'y.pt'}")
