"""Training data sources: generated 2-D toy sets and finite sets (digits, tensors, image folders, CIFAR-10).

`load_data(spec, split=, seed=)` validates everything first and returns a `DataSource`:

    source.name, source.x_shape, source.num_classes, source.size
    x, y = source.sample(batch_size, generator)    # CPU generator -> x float32 [B, *x_shape] in data
                                                   # units (~[-1, 1]), y long [B] or None; on the CPU
    source.shard(rank, world_size)                 # the per-rank part of a finite set
    x, y = source.all()                            # the whole split (toy sets: all(n=...))

Specs:
- "gmm-grid", "spiral", "checkerboard", "rings": 2-D toy sets drawn on the fly, within about
  [-1.5, 1.5]; "gmm-grid" (3 x 3 modes, `psb_fast.oracles.mixture_2d_grid`) labels each point
  with its mode index (9 classes), the others are unlabelled.
- "digits": scikit-learn's bundled 8 x 8 digits (0..16 scaled to [-1, 1]), [1, 8, 8], 10 classes,
  a fixed stratified 80/20 train/test split.
- "tensor:PATH": a .npy float array [N, ...] or a .pt file holding a float tensor [N, ...] or a dict
  {"x": float tensor [N, ...], "y": integer labels [N]}.
- "images:DIR": every .png/.jpg/.jpeg in DIR (not recursive), all the same size, grayscale (1 channel)
  when every file is grayscale, else RGB; [C, H, W] scaled from 0..255 to [-1, 1].
- "cifar10:DIR": the python-pickle CIFAR-10 layout under DIR/cifar-10-batches-py (data_batch_1..5 for
  "train", test_batch for "test"), read without torchvision and never downloaded; [3, 32, 32],
  10 classes. The pickles are trusted input (pickle can run code).

Tensor and image-folder sources have no held-out part: both splits are the whole set. Finite sets
draw indices uniformly with replacement from the generator, so a run is reproducible from the
generator's state; uint8 sets stay uint8 in memory and are converted per batch.
"""

from __future__ import annotations

import math
import pickle
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from .oracles import mixture_2d_grid

TOY_SETS = ("gmm-grid", "spiral", "checkerboard", "rings")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_SPLIT_STREAM = {"train": 0, "test": 1}
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class DataSource(ABC):
    """A source of training data points x (float32, data units) with optional class labels.

    Attributes: name (the spec), x_shape (shape of one point), num_classes (None: unlabelled),
    size (number of points; None for generated sets).
    """

    name: str
    x_shape: tuple[int, ...]
    num_classes: int | None
    size: int | None

    @abstractmethod
    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch: x float32 [batch_size, *x_shape] and labels long [batch_size] (or None), on the CPU."""

    @abstractmethod
    def shard(self, rank: int, world_size: int) -> DataSource:
        """The part of the source that rank `rank` of `world_size` trains on."""

    @abstractmethod
    def all(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Evaluation data: x float32 [N, *x_shape] and labels long [N] (or None), on the CPU."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, x_shape={self.x_shape}, "
                f"num_classes={self.num_classes}, size={self.size})")


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (data are drawn on the CPU), "
                         f"got one on {generator.device}")
    return generator


def _check_shard(rank: object, world_size: object) -> tuple[int, int]:
    world_size = _check_positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return rank, world_size


class ToyData(DataSource):
    """A 2-D toy distribution drawn on the fly (x_shape (2,), size None); see the module docstring."""

    def __init__(self, name: str, split: str, seed: int) -> None:
        self.name, self.x_shape, self.size = name, (2,), None
        self.num_classes = 9 if name == "gmm-grid" else None
        self._eval_seed = 2 * seed + _SPLIT_STREAM[split]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size = _check_positive_int("batch_size", batch_size)
        return _TOY_DRAW[self.name](batch_size, _check_generator(generator))

    def shard(self, rank: int, world_size: int) -> DataSource:
        """Generated sets are the same on every rank (the caller seeds each rank's generator)."""
        _check_shard(rank, world_size)
        return self

    def all(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """n points from this split's own seed stream (train and test streams differ)."""
        if n is None:
            raise ValueError(f"{self.name} is generated on the fly: all() needs n, the number of points")
        n = _check_positive_int("n", n)
        return _TOY_DRAW[self.name](n, torch.Generator().manual_seed(self._eval_seed))


def _uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _draw_gmm_grid(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    mixture = mixture_2d_grid()
    y = torch.multinomial(mixture.weights, n, replacement=True, generator=generator)
    z = torch.randn((n, 2), generator=generator, dtype=torch.float64)
    x = mixture.means[y] + mixture.stds[y, None] * z
    return x.float(), y


def _draw_spiral(n: int, generator: torch.Generator) -> tuple[torch.Tensor, None]:
    """Two interleaved arms of 1.5 turns each, radius up to 1.4, noise std 0.04."""
    turn = torch.sqrt(_uniform(n, generator)) * 3 * math.pi
    arm = torch.where(_uniform(n, generator) < 0.5, 1.0, -1.0)
    radius = 1.4 * turn / (3 * math.pi)
    x = arm[:, None] * radius[:, None] * torch.stack([torch.cos(turn), torch.sin(turn)], dim=1)
    x = x + 0.04 * torch.randn((n, 2), generator=generator, dtype=torch.float64)
    return x.float(), None


def _draw_checkerboard(n: int, generator: torch.Generator) -> tuple[torch.Tensor, None]:
    """Uniform on the 8 black cells of a 4 x 4 board of 0.75-wide cells covering [-1.5, 1.5]^2."""
    col = 4 * _uniform(n, generator) - 2
    row = _uniform(n, generator) - 2 * (_uniform(n, generator) < 0.5).double()
    row = row + torch.floor(col).remainder(2)
    return (0.75 * torch.stack([col, row], dim=1)).float(), None


def _draw_rings(n: int, generator: torch.Generator) -> tuple[torch.Tensor, None]:
    """Four concentric circles of radii 0.375, 0.75, 1.125, 1.5 (equal mass), radial noise std 0.03."""
    ring = torch.randint(1, 5, (n,), generator=generator).double()
    angle = 2 * math.pi * _uniform(n, generator)
    radius = 0.375 * ring + 0.03 * torch.randn(n, generator=generator, dtype=torch.float64)
    return (radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)).float(), None


_TOY_DRAW = {
    "gmm-grid": _draw_gmm_grid, "spiral": _draw_spiral, "checkerboard": _draw_checkerboard,
    "rings": _draw_rings,
}


class TensorData(DataSource):
    """A finite set held in memory: x [N, *x_shape] float (data units) or uint8 (0..255, mapped to
    [-1, 1] per batch), labels long [N] or None.
    """

    def __init__(self, name: str, x: torch.Tensor, y: torch.Tensor | None, num_classes: int | None) -> None:
        self.name, self._x, self._y, self.num_classes = name, x, y, num_classes
        self.x_shape, self.size = tuple(x.shape[1:]), x.shape[0]

    def _take(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self._x[index]
        x = x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x.float()
        return x, None if self._y is None else self._y[index]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size = _check_positive_int("batch_size", batch_size)
        generator = _check_generator(generator)
        return self._take(torch.randint(self.size, (batch_size,), generator=generator))

    def shard(self, rank: int, world_size: int) -> DataSource:
        """Points rank, rank + world_size, ... (at least one point per rank)."""
        rank, world_size = _check_shard(rank, world_size)
        if world_size > self.size:
            raise ValueError(f"world_size must be <= the set's size {self.size}, got {world_size}")
        y = None if self._y is None else self._y[rank::world_size]
        return TensorData(self.name, self._x[rank::world_size], y, self.num_classes)

    def all(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole set, or its first n points."""
        if n is None:
            return self._take(slice(None))
        n = _check_positive_int("n", n)
        if n > self.size:
            raise ValueError(f"n must be <= the set's size {self.size}, got {n}")
        return self._take(slice(0, n))


def load_data(spec: str, *, split: str = "train", seed: int = 0) -> DataSource:
    """The data source named by `spec` (module docstring), `split` "train" or "test".

    seed: the toy sets' evaluation stream (`all(n)`); the finite sets' splits are fixed.
    Raises ValueError/TypeError for an unknown spec, a missing path or malformed data.
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str, got {type(spec).__name__}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if spec in TOY_SETS:
        return ToyData(spec, split, seed)
    if spec == "digits":
        return _load_digits(split)
    kind, sep, location = spec.partition(":")
    loaders = {"tensor": _load_tensor, "images": _load_images, "cifar10": _load_cifar10}
    if not sep or kind not in loaders or not location:
        raise ValueError(
            f"spec must be one of {TOY_SETS + ('digits',)} or 'tensor:PATH', 'images:DIR', 'cifar10:DIR', "
            f"got {spec!r}"
        )
    return loaders[kind](spec, Path(location), split)


def _load_digits(split: str) -> TensorData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.data).float().div_(8.0).sub_(1.0).view(-1, 1, 8, 8)
    y = torch.from_numpy(digits.target).long()
    generator = torch.Generator().manual_seed(_DIGITS_SPLIT_SEED)
    parts = {"train": [], "test": []}
    for label in range(10):
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        n_test = round(_DIGITS_TEST_FRACTION * members.numel())
        parts["test"].append(members[:n_test])
        parts["train"].append(members[n_test:])
    index = torch.cat(parts[split]).sort().values
    return TensorData("digits", x[index], y[index], 10)


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise ValueError(f"{what}: no such file {str(path)!r}")


def _load_tensor(spec: str, path: Path, split: str) -> TensorData:
    _require_file(path, "tensor spec")
    y = None
    if path.suffix == ".npy":
        try:
            x = torch.from_numpy(np.load(path, allow_pickle=False))
        except (ValueError, OSError) as err:
            raise ValueError(f"tensor spec: {str(path)!r} is not a readable .npy array ({err})") from err
    elif path.suffix == ".pt":
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"tensor spec: {str(path)!r} is not a readable .pt tensor file ({err})") from err
        if isinstance(content, dict):
            if "x" not in content:
                raise ValueError(f"tensor spec: the dict in {str(path)!r} needs key 'x', "
                                 f"got keys {sorted(content)}")
            x, y = content["x"], content.get("y")
        else:
            x = content
    else:
        raise ValueError(f"tensor spec: PATH must end in .npy or .pt, got {str(path)!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"tensor spec: x in {str(path)!r} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"tensor spec: x in {str(path)!r} must be a float tensor, got dtype {x.dtype}")
    if x.dim() < 2 or x.shape[0] < 1 or x[0].numel() < 1:
        raise ValueError(f"tensor spec: x in {str(path)!r} must have shape [N, ...] with N >= 1 and at least "
                         f"one value per point, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"tensor spec: x in {str(path)!r} has non-finite values")
    num_classes = None
    if y is not None:
        y, num_classes = _check_labels(y, x.shape[0], str(path))
    return TensorData(spec, x.float().contiguous(), y, num_classes)


def _check_labels(y: object, n: int, where: str) -> tuple[torch.Tensor, int]:
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"tensor spec: y in {where!r} must be an integer tensor, got "
                        f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__}")
    if tuple(y.shape) != (n,):
        raise ValueError(f"tensor spec: y in {where!r} must have shape [{n}] (one label per point), "
                         f"got {tuple(y.shape)}")
    if int(y.min()) < 0:
        raise ValueError(f"tensor spec: y in {where!r} must be >= 0, got {int(y.min())}")
    return y.long(), int(y.max()) + 1


def _load_images(spec: str, folder: Path, split: str) -> TensorData:
    from PIL import Image

    if not folder.is_dir():
        raise ValueError(f"images spec: no such folder {str(folder)!r}")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"images spec: no {'/'.join(IMAGE_SUFFIXES)} files in {str(folder)!r}")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
                images.append(image.copy())
        except OSError as err:
            raise ValueError(f"images spec: cannot read image {str(file)!r} ({err})") from err
        if images[-1].size != images[0].size:
            raise ValueError(f"images spec: all images must have the same size; {str(files[0])!r} is "
                             f"{images[0].size} (W, H), {str(file)!r} is {images[-1].size}")
    mode = "L" if all(image.mode in _GRAY_MODES for image in images) else "RGB"
    arrays = [np.asarray(image.convert(mode), dtype=np.uint8) for image in images]
    x = torch.from_numpy(np.stack(arrays))
    x = x[:, None] if mode == "L" else x.permute(0, 3, 1, 2)
    return TensorData(spec, x.contiguous(), None, None)


def _load_cifar10(spec: str, root: Path, split: str) -> TensorData:
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    for name in names:
        _require_file(folder / name, "cifar10 spec (expected torchvision's python CIFAR-10 layout)")
    xs, ys = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            try:
                batch = pickle.load(f, encoding="bytes")
            except Exception as err:
                raise ValueError(f"cifar10 spec: {str(folder / name)!r} is not a CIFAR-10 pickle "
                                 f"({err})") from err
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        if "data" not in batch or "labels" not in batch:
            raise ValueError(f"cifar10 spec: {str(folder / name)!r} needs keys 'data' and 'labels', "
                             f"got {sorted(batch)}")
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
            raise ValueError(f"cifar10 spec: {str(folder / name)!r} must hold data [N, 3072] and N labels, "
                             f"got {data.shape} and {labels.shape}")
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        ys.append(torch.from_numpy(labels))
    y = torch.cat(ys)
    if int(y.min()) < 0 or int(y.max()) > 9:
        raise ValueError(f"cifar10 spec: labels must be in 0..9, got {int(y.min())}..{int(y.max())}")
    return TensorData(spec, torch.cat(xs).contiguous(), y, 10)
