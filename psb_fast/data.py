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
  when every file is grayscale, else RGB; [C, H, W] scaled by each file's bit depth (0..255, or
  0..65535 for 16-bit grayscale PNGs; PIL reads 16-bit colour PNGs as 8-bit) to [-1, 1]. Images
  over MAX_IMAGE_PIXELS pixels are refused from their header, before they are decoded.
- "cifar10:DIR": the python-pickle CIFAR-10 batches (data_batch_1..5 for "train", test_batch for
  "test") in DIR, the archive's cifar-10-batches-py folder, or in DIR/cifar-10-batches-py (DIR its
  parent, as torchvision lays it out), read without torchvision and never downloaded; [3, 32, 32],
  10 classes. The pickles are not trusted: they are read with a restricted unpickler that builds
  only what a CIFAR-10 batch holds (dicts, lists, str, bytes, ints, numpy arrays and dtypes) and
  refuses any other global (so no code in the file runs).

Everything is validated once, at load, and errors (ValueError / TypeError) name the file: no file
may be empty; .npy files are read without pickles and must hold a float array; .pt files are read
with torch.load(weights_only=True) and must hold dense tensors (not sparse, meta, quantized or
nested); float data must be finite once cast to float32 (float64 beyond ~3.4e38 is refused); labels
must be non-negative integers below MAX_CLASSES; CIFAR data must be integer arrays [N, 3072] of
values in 0..255 with N labels in 0..9.

Tensor and image-folder sources have no held-out part: both splits are the whole set. Finite sets
draw indices uniformly with replacement from the generator, so a run is reproducible from the
generator's state; uint8 sets stay uint8 in memory and are converted per batch.
"""

from __future__ import annotations

import math
import pickle
import struct
import warnings
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from . import checks
from .oracles import mixture_2d_grid

TOY_SETS = ("gmm-grid", "spiral", "checkerboard", "rings")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_SPLIT_STREAM = {"train": 0, "test": 1}
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_DEEP_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grayscale (PNG)
MAX_IMAGE_PIXELS = 4096 * 4096  # per image; larger files are refused before decoding
MAX_CLASSES = 1_000_000  # labels must be < this (a larger label is a corrupt file, not a class)
CIFAR_FOLDER = "cifar-10-batches-py"  # the folder of the python CIFAR-10 archive


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


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (data are drawn on the CPU), "
                         f"got one on {generator.device}")
    return generator


def _check_shard(rank: object, world_size: object) -> tuple[int, int]:
    world_size = checks.count("world_size", world_size, 1)
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
        batch_size = checks.count("batch_size", batch_size, 1)
        return _TOY_DRAW[self.name](batch_size, _check_generator(generator))

    def shard(self, rank: int, world_size: int) -> DataSource:
        """Generated sets are the same on every rank (the caller seeds each rank's generator)."""
        _check_shard(rank, world_size)
        return self

    def all(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """n points from this split's own seed stream (train and test streams differ)."""
        if n is None:
            raise ValueError(f"{self.name} is generated on the fly: all() needs n, the number of points")
        n = checks.count("n", n, 1)
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
        batch_size = checks.count("batch_size", batch_size, 1)
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
        n = checks.count("n", n, 1)
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


def has_held_out(spec: str) -> bool:
    """Whether the source `spec` has a held-out "test" split apart from its training data (toy
    sets, digits, CIFAR-10); tensor files and image folders do not (both splits are the whole set)."""
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str, got {type(spec).__name__}")
    return spec in TOY_SETS or spec == "digits" or spec.partition(":")[0] == "cifar10"


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
    if path.stat().st_size == 0:
        raise ValueError(f"{what}: {str(path)!r} is empty (0 bytes)")


def _load_tensor(spec: str, path: Path, split: str) -> TensorData:
    _require_file(path, "tensor spec")
    y = None
    if path.suffix == ".npy":
        x = torch.from_numpy(_read_npy(path))
    elif path.suffix == ".pt":
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"tensor spec: {str(path)!r} is not a readable .pt tensor file "
                             f"({err or type(err).__name__})") from err
        if isinstance(content, dict):
            if "x" not in content:
                raise ValueError(f"tensor spec: the dict in {str(path)!r} needs key 'x', "
                                 f"got keys {sorted(map(str, content))}")
            x, y = content["x"], content.get("y")
        else:
            x = content
    else:
        raise ValueError(f"tensor spec: PATH must end in .npy or .pt, got {str(path)!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"tensor spec: x in {str(path)!r} must be a tensor, got {type(x).__name__}")
    _check_plain("x", x, path)
    if y is not None and isinstance(y, torch.Tensor):
        _check_plain("y", y, path)
    if not x.is_floating_point():
        raise TypeError(f"tensor spec: x in {str(path)!r} must be a float tensor, got dtype {x.dtype}")
    if x.dim() < 2 or x.shape[0] < 1 or x[0].numel() < 1:
        raise ValueError(f"tensor spec: x in {str(path)!r} must have shape [N, ...] with N >= 1 and at least "
                         f"one value per point, got {tuple(x.shape)}")
    x = _finite_float32(x, str(path))
    num_classes = None
    if y is not None:
        y, num_classes = _check_labels(y, x.shape[0], str(path))
    return TensorData(spec, x.contiguous(), y, num_classes)


def _check_plain(name: str, tensor: torch.Tensor, path: Path) -> None:
    """TypeError unless `tensor` is a dense (strided) tensor with data (not sparse, not meta)."""
    if tensor.layout != torch.strided or tensor.is_meta or tensor.is_quantized or tensor.is_nested:
        kind = "meta" if tensor.is_meta else "quantized" if tensor.is_quantized else \
            "nested" if tensor.is_nested else str(tensor.layout).removeprefix("torch.")
        raise TypeError(f"tensor spec: {name} in {str(path)!r} must be a dense tensor holding its values, "
                        f"got a {kind} tensor")


def _read_npy(path: Path) -> np.ndarray:
    """A .npy file's float array in native byte order (no pickles; TypeError unless float)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"tensor spec: {str(path)!r} is not a readable .npy array "
                         f"({err or type(err).__name__})") from err
    if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
        array.close()
        raise ValueError(f"tensor spec: {str(path)!r} is an .npz archive, expected one .npy array")
    if array.dtype.kind != "f":
        raise TypeError(f"tensor spec: x in {str(path)!r} must be a float array, got dtype {array.dtype}")
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _finite_float32(x: torch.Tensor, where: str) -> torch.Tensor:
    """x cast to float32, checked finite after the cast (float64 beyond ~3.4e38 becomes inf)."""
    x32 = x.float()
    finite = torch.isfinite(x32)
    if not bool(finite.all()):
        bad = x[~finite].flatten()[0].item()
        detail = "" if not math.isfinite(bad) else f" beyond the float32 range (e.g. {bad:.3g})"
        raise ValueError(f"tensor spec: x in {where!r} has non-finite values{detail}; expected finite "
                         f"float32 data (|x| <= {torch.finfo(torch.float32).max:.3g})")
    return x32


def _check_labels(y: object, n: int, where: str) -> tuple[torch.Tensor, int]:
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"tensor spec: y in {where!r} must be an integer tensor, got "
                        f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__}")
    if tuple(y.shape) != (n,):
        raise ValueError(f"tensor spec: y in {where!r} must have shape [{n}] (one label per point), "
                         f"got {tuple(y.shape)}")
    if int(y.min()) < 0:
        raise ValueError(f"tensor spec: y in {where!r} must be >= 0, got {int(y.min())}")
    if int(y.max()) >= MAX_CLASSES:
        raise ValueError(f"tensor spec: y in {where!r} must be < {MAX_CLASSES} (class indices), "
                         f"got {int(y.max())}")
    return y.long(), int(y.max()) + 1


def _load_images(spec: str, folder: Path, split: str) -> TensorData:
    if not folder.is_dir():
        raise ValueError(f"images spec: no such folder {str(folder)!r}")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"images spec: no {'/'.join(IMAGE_SUFFIXES)} files in {str(folder)!r}")
    images = [_read_image(file) for file in files]
    for file, image in zip(files, images, strict=True):
        if image.size != images[0].size:
            raise ValueError(f"images spec: all images must have the same size; {str(files[0])!r} is "
                             f"{images[0].size} (W, H), {str(file)!r} is {image.size}")
    mode = "L" if all(image.mode in _GRAY_MODES for image in images) else "RGB"
    arrays = [_image_array(image, file, mode) for file, image in zip(files, images, strict=True)]
    if all(a.dtype == np.uint8 for a in arrays):
        x = torch.from_numpy(np.stack(arrays))  # uint8, mapped to [-1, 1] per batch
    else:  # some 16-bit files: each scaled by its own depth, kept as float32
        x = torch.from_numpy(np.stack([a / np.float32(np.iinfo(a.dtype).max) for a in arrays]))
        x = x.float().mul_(2.0).sub_(1.0)
    x = x[:, None] if mode == "L" else x.permute(0, 3, 1, 2)
    return TensorData(spec, x.contiguous(), None, None)


def _read_image(file: Path):
    """The decoded PIL image in `file`; ValueError naming the file if it is unreadable or has more than
    MAX_IMAGE_PIXELS pixels (checked from the header, before decoding)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{width} x {height} = {width * height} pixels")
                image.load()
                return image.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"images spec: {str(file)!r} is too large to decode ({err}); expected at most "
                         f"{MAX_IMAGE_PIXELS} pixels per image") from err
    except (OSError, ValueError, EOFError, SyntaxError, IndexError, struct.error) as err:
        raise ValueError(f"images spec: cannot read image {str(file)!r} ({err})") from err


def _image_array(image, file: Path, mode: str) -> np.ndarray:
    """[H, W] ("L") or [H, W, 3] ("RGB") pixels: uint8, or uint16 for a 16-bit grayscale image."""
    if image.mode not in _DEEP_MODES:
        if image.mode == "F":
            raise ValueError(f"images spec: {str(file)!r} holds float pixels (mode F) of unknown range; "
                             f"expected 8- or 16-bit integer pixels")
        return np.asarray(image.convert(mode), dtype=np.uint8)
    pixels = np.asarray(image)
    if pixels.size and (int(pixels.min()) < 0 or int(pixels.max()) > 65535):
        raise ValueError(f"images spec: {str(file)!r} has {image.mode} pixels in {int(pixels.min())}.."
                         f"{int(pixels.max())}; expected 16-bit values in 0..65535")
    pixels = pixels.astype(np.uint16)
    return pixels if mode == "L" else np.repeat(pixels[..., None], 3, axis=2)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes at protocol <= 2, and nothing more."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is admitted only as (str, 'latin1'), got "
                                     f"({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _plain_dtype(*args: object) -> np.dtype:
    """`numpy.dtype` for unpickling, refusing object dtypes."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"object dtype {dtype} is not admitted")
    return dtype


def _admitted_globals() -> dict[tuple[str, str], object]:
    """The globals a CIFAR-10 pickle may name: numpy's array/dtype/scalar rebuilders (under numpy 1's
    and numpy 2's module paths) and the latin-1 bytes codec of protocol <= 2 pickles."""
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.int64(0).__reduce__()[0]
    admitted = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _plain_dtype,
                ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        admitted[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        admitted[(f"{core}.multiarray", "scalar")] = scalar
        admitted[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return admitted


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 batch holds (dict, list, str, bytes, int, numpy arrays); any other
    global (a class or function, e.g. os.system) raises UnpicklingError instead of being called."""

    _ADMITTED = _admitted_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ADMITTED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never holds; "
                                         f"refusing to unpickle it (pickles can run code)") from None


def _read_cifar_batch(file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 batch file -> (uint8 [N, 3, 32, 32], long [N] in 0..9), validated."""
    where = str(file)
    with open(file, "rb") as f:
        try:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        except Exception as err:
            raise ValueError(f"cifar10 spec: {where!r} is not a CIFAR-10 pickle "
                             f"({err or type(err).__name__})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"cifar10 spec: {where!r} must hold a dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"cifar10 spec: {where!r} needs keys 'data' and 'labels', "
                         f"got {sorted(map(str, batch))}")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "ui" or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32 or data.shape[0] < 1:
        got = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"cifar10 spec: data in {where!r} must be an integer array [N, 3072] with N >= 1, "
                         f"got {got}")
    if int(data.min()) < 0 or int(data.max()) > 255:
        raise ValueError(f"cifar10 spec: data in {where!r} must be pixel values in 0..255, got "
                         f"{int(data.min())}..{int(data.max())}")
    labels = _cifar_labels(labels, data.shape[0], where)
    return torch.from_numpy(data.astype(np.uint8).reshape(-1, 3, 32, 32)), torch.from_numpy(labels)


def _cifar_labels(labels: object, n: int, where: str) -> np.ndarray:
    """CIFAR labels (a list of ints or an integer array) as int64 [n] in 0..9."""
    ints = isinstance(labels, list) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                            for v in labels)
    if not (ints or (isinstance(labels, np.ndarray) and labels.dtype.kind in "ui")):
        got = f"{labels.dtype} array" if isinstance(labels, np.ndarray) else type(labels).__name__
        if isinstance(labels, list):
            got = f"a list holding {sorted({type(v).__name__ for v in labels})}"
        raise ValueError(f"cifar10 spec: labels in {where!r} must be a list of ints or an integer array, "
                         f"got {got}")
    array = np.asarray(labels)
    if array.shape != (n,):
        raise ValueError(f"cifar10 spec: {where!r} must hold one label per image ({n}), got labels of "
                         f"shape {array.shape}")
    if int(array.min()) < 0 or int(array.max()) > 9:
        raise ValueError(f"cifar10 spec: labels in {where!r} must be in 0..9, got "
                         f"{int(array.min())}..{int(array.max())}")
    return array.astype(np.int64)


def _cifar_folder(root: Path, names: list[str]) -> Path:
    """The folder holding the CIFAR-10 batch files `names`: `root` itself (the cifar-10-batches-py
    folder) or root/cifar-10-batches-py (its parent, torchvision's download root); ValueError naming
    both paths tried when neither holds the first file."""
    tried = [root, root / CIFAR_FOLDER] if root.name != CIFAR_FOLDER else [root]
    for folder in tried:
        if (folder / names[0]).exists():
            return folder
    raise ValueError(f"cifar10 spec: no CIFAR-10 batches found: tried "
                     f"{' and '.join(repr(str(folder / names[0])) for folder in tried)}; expected DIR to be "
                     f"the {CIFAR_FOLDER} folder of the python CIFAR-10 archive, or the folder holding it")


def _load_cifar10(spec: str, root: Path, split: str) -> TensorData:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    folder = _cifar_folder(root, names)
    for name in names:
        _require_file(folder / name, "cifar10 spec (expected the python CIFAR-10 layout)")
    batches = [_read_cifar_batch(folder / name) for name in names]
    xs, ys = [x for x, _ in batches], [y for _, y in batches]
    return TensorData(spec, torch.cat(xs).contiguous(), torch.cat(ys), 10)
