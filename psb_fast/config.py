"""TrainConfig: every setting of a training run, loadable from TOML / JSON and overridable by strings.

    cfg = load_config("run.toml")                                  # or TrainConfig(...)
    cfg = apply_overrides(cfg, ["steps=100", "lr=3e-4", "eval_nfes=5,10", "model_kwargs.hidden=256"])

Values are checked when a TrainConfig is made (TypeError / ValueError naming the field, the value
and what was expected), so a bad config fails before any training step. Dataset and model names
are checked by `psb_fast.data.load_data` and `psb_fast.models.make_model`, also before the first step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .backends import BACKENDS
from .bridge import MODES

WEIGHTINGS = ("reciprocal", "none")
DEVICES = ("auto", "cpu", "cuda")
MAX_SEED = 2**62


@dataclass(frozen=True)
class TrainConfig:
    """A training run (SPEC §2 target). Times are in [0, 1); lr in optimizer units; counts in steps.

    data / model: names for psb_fast.data.load_data and psb_fast.models.make_model (model_kwargs
    are passed to make_model). conditional: feed class labels to the model. p, k, varx, varv, mode:
    the PhaseBridge. t0, T: t ~ U[t0, T]. weighting: loss weight w(t) = 1/sqrt(1 - t)
    ("reciprocal") or 1 ("none"). batch_size: global batch (split evenly over torchrun ranks).
    steps: total optimizer steps; min(warmup_steps, steps) of linear warmup, then cosine decay to 0.
    grad_clip: max global grad norm (0 = off). ema_decay: EMA decay per step (warmed up:
    min(ema_decay, (1 + n) / (10 + n)) after n updates).
    ckpt_every / log_every / eval_every: periods in steps (ckpt and eval: 0 = only at the end).
    eval_nfes, eval_samples: PhaseSampler NFEs and sample count of each evaluation (0 samples = off).
    compile: torch.compile the model. bf16: bfloat16 autocast (CUDA only). device: "auto", "cpu",
    "cuda" or "cuda:N". backend: bridge_sample / PhaseSampler backend ("reference" = the plain
    PyTorch data path and loss, for the throughput comparison).
    """

    data: str = "gmm-grid"
    model: str = "auto"
    model_kwargs: dict = field(default_factory=dict)
    conditional: bool = False
    p: float = 3.0
    k: float = 0.2
    varx: float = 1.0
    varv: float = 1.0
    mode: str = "probODE"
    t0: float = 1e-5
    T: float = 0.999
    weighting: str = "reciprocal"
    batch_size: int = 256
    steps: int = 10000
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    out_dir: str = "runs/psb"
    ckpt_every: int = 1000
    log_every: int = 50
    eval_every: int = 0
    eval_nfes: tuple[int, ...] = (5, 10, 20)
    eval_samples: int = 1000
    compile: bool = False
    bf16: bool = True
    device: str = "auto"
    backend: str = "auto"

    def __post_init__(self) -> None:
        types = _field_types()
        for name in field_names():
            object.__setattr__(self, name, _coerce(name, getattr(self, name), types[name]))
        _validate(self)


def field_names() -> list[str]:
    """The valid config keys, in declaration order."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def config_to_dict(cfg: TrainConfig) -> dict:
    """A plain dict of str / int / float / bool / list / dict (JSON and torch.load(weights_only) safe)."""
    out = {}
    for name in field_names():
        value = getattr(cfg, name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        out[name] = value
    return out


def config_from_dict(values: dict, source: str = "config") -> TrainConfig:
    """A TrainConfig from a mapping of field -> value; unknown keys raise ValueError naming them."""
    if not isinstance(values, dict):
        raise TypeError(f"{source} must be a mapping of config keys to values, got {type(values).__name__}")
    _check_keys(values.keys(), source)
    return TrainConfig(**values)


def load_config(path: str | Path) -> TrainConfig:
    """Load a TrainConfig from a .toml or .json file (a flat table of config keys).

    Raises FileNotFoundError for a missing file, ValueError for another suffix, a parse error, an
    unknown key or a bad value.
    """
    path = Path(path)
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"config file must end in .toml or .json, got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError as exc:  # Python 3.10
            raise ValueError(f"reading {path} needs Python >= 3.11 (tomllib); use a .json config") from exc
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {path} is not valid TOML: {exc}") from exc
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from exc
    return config_from_dict(values, source=f"config file {path}")


def apply_overrides(cfg: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """A copy of cfg with "key=value" strings applied (all at once, then validated).

    Values are parsed from the field's type: int, float, bool (true/false/1/0/yes/no), str,
    tuple of ints ("5,10,20"), dict (JSON, e.g. model_kwargs={"hidden": 256}). "model_kwargs.NAME=VALUE"
    sets one entry of model_kwargs (VALUE read as JSON when it parses, else as a string).
    """
    if isinstance(overrides, str) or not isinstance(overrides, (list, tuple)):
        raise TypeError(f"overrides must be a list of 'key=value' strings, got {type(overrides).__name__}")
    types = _field_types()
    changes: dict = {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override must look like 'key=value', got {item!r}")
        key, text = (s.strip() for s in item.split("=", 1))
        if key.startswith("model_kwargs."):
            name = key[len("model_kwargs."):]
            if not name:
                raise ValueError(f"override {item!r}: expected model_kwargs.NAME=VALUE")
            kwargs = dict(changes.get("model_kwargs", cfg.model_kwargs))
            kwargs[name] = _json_or_str(text)
            changes["model_kwargs"] = kwargs
            continue
        _check_keys([key], "override")
        changes[key] = _parse(key, text, types[key])
    return dataclasses.replace(cfg, **changes)


@functools.cache
def _field_types() -> dict[str, object]:
    return typing.get_type_hints(TrainConfig)


def _check_keys(keys, source: str) -> None:
    valid = field_names()
    unknown = [k for k in keys if k not in valid]
    if unknown:
        raise ValueError(f"{source}: unknown config key(s) {unknown}; valid keys: {', '.join(valid)}")


def _parse(key: str, text: str, kind: object) -> object:
    """A field's value from its override string."""
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key} must be a boolean (true/false), got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            value = _float(key, text, "an integer")
            if not value.is_integer():
                raise ValueError(f"{key} must be an integer, got {text!r}") from None
            return int(value)
    if kind is float:
        return _float(key, text, "a number")
    if kind is dict:
        value = _json_or_str(text)
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a JSON object like {{\"name\": 1}}, got {text!r}")
        return value
    if typing.get_origin(kind) is tuple:
        parts = [s.strip() for s in text.strip("()[] ").split(",") if s.strip()]
        try:
            return tuple(int(s) for s in parts)
        except ValueError:
            raise ValueError(f"{key} must be comma-separated integers like 5,10,20, got {text!r}") from None
    return text


def _float(key: str, text: str, expected: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{key} must be {expected}, got {text!r}") from None


def _json_or_str(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _coerce(name: str, value: object, kind: object) -> object:
    """value checked against the field type (ints accepted for floats, lists for tuples)."""
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty string, got {type(value).__name__} {value!r}")
        return value
    if kind is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise TypeError(f"{name} must be a dict with string keys, got {value!r}")
        return dict(value)
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise TypeError(f"{name} must be a list of ints, got {value!r}")
    return tuple(value)


def _validate(cfg: TrainConfig) -> None:
    """Range and choice checks (ValueError naming the field, the value and what was expected)."""

    def need(ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"{name} must be {expected}, got {getattr(cfg, name)!r}")

    need(cfg.p > 0, "p", "> 0")
    need(abs(cfg.k) < 1, "k", "in (-1, 1)")
    need(cfg.varx > 0, "varx", "> 0")
    need(cfg.varv > 0, "varv", "> 0")
    need(cfg.mode in MODES, "mode", f"one of {MODES}")
    need(0 <= cfg.t0 < 1, "t0", "in [0, 1)")
    need(cfg.t0 < cfg.T < 1, "T", f"in (t0, 1) = ({cfg.t0}, 1)")
    need(cfg.weighting in WEIGHTINGS, "weighting", f"one of {WEIGHTINGS}")
    need(cfg.batch_size >= 1, "batch_size", ">= 1")
    need(cfg.steps >= 1, "steps", ">= 1")
    need(cfg.lr > 0, "lr", "> 0")
    need(cfg.weight_decay >= 0, "weight_decay", ">= 0")
    need(cfg.warmup_steps >= 0, "warmup_steps", ">= 0")
    need(cfg.grad_clip >= 0, "grad_clip", ">= 0 (0 = no clipping)")
    need(0 <= cfg.ema_decay < 1, "ema_decay", "in [0, 1)")
    need(0 <= cfg.seed < MAX_SEED, "seed", "in [0, 2**62)")
    need(cfg.ckpt_every >= 0, "ckpt_every", ">= 0 (0 = only at the end)")
    need(cfg.log_every >= 1, "log_every", ">= 1")
    need(cfg.eval_every >= 0, "eval_every", ">= 0 (0 = only at the end)")
    nfes_ok = len(cfg.eval_nfes) > 0 and all(n >= 1 for n in cfg.eval_nfes)
    need(nfes_ok, "eval_nfes", "a non-empty list of ints >= 1")
    need(cfg.eval_samples >= 0, "eval_samples", ">= 0 (0 = no evaluation)")
    device_ok = cfg.device in DEVICES or (cfg.device.startswith("cuda:") and cfg.device[5:].isdigit())
    need(device_ok, "device", f"one of {DEVICES} or 'cuda:N'")
    need(cfg.backend in BACKENDS, "backend", f"one of {BACKENDS}")
