"""TrainConfig: every setting of a training run, loadable from TOML / JSON and overridable by strings.

    cfg = load_config("run.toml")                                  # or TrainConfig(...)
    cfg = apply_overrides(cfg, ["steps=100", "lr=3e-4", "eval_nfes=5,10", "model_kwargs.hidden=256"])

Values are checked when a TrainConfig is made (TypeError / ValueError naming the field, the value
and what was expected), so a bad config fails before any training step. Dataset and model names
are checked by `psb_fast.data.load_data` and `psb_fast.models.make_model`, also before the first step.

Resuming (train(..., resume=True), `psb-fast train --resume`) may change only the keys in
RESUME_CHANGEABLE, and each change takes effect from the checkpoint's step on:

    steps, warmup_steps, lr, weight_decay   the lr schedule and the optimizer's lr / weight decay are
                                            recomputed at the checkpoint's step (the next step uses
                                            lr * lr_factor(step, warmup_steps, steps))
    grad_clip, ema_decay                    used from the next step
    ckpt_every, log_every, eval_every,      the periods and evaluations from the next step
    eval_nfes, eval_samples
    compile, bf16, device, backend,         how the steps run (the losses then match an
    threads                                 uninterrupted run only up to rounding)
    out_dir                                 where the run lives (e.g. a moved folder)

Every other key (data, model, model_kwargs, conditional, p, k, varx, varv, mode, t0, T, weighting,
batch_size, seed) defines the training problem and the data / noise streams: a resume that changes
one fails with a ValueError naming it. With no key changed, a resumed run on the CPU repeats the
losses of an uninterrupted run bit for bit. config.json and the checkpoint always record the values
in use.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .backends import BACKENDS, OLD_BACKENDS
from .bridge import MODES
from .files import read_json, read_toml

WEIGHTINGS = ("reciprocal", "none")
DEVICES = ("auto", "cpu", "cuda")
MAX_SEED = 2**62
# AdamW's lr and weight decay: far above any useful value (1e-5 .. 1e-2), below where the update
# lr * m / sqrt(v) (|m| / sqrt(v) <= ~1) or the decay factor 1 - lr * weight_decay overflow float32.
MAX_LR = 1e6
MAX_WEIGHT_DECAY = 1e6
# The largest int a model_kwargs entry may hold (a width, depth, channel count): a network that
# needs more cannot be allocated on any machine (an MLP of width 65536 already holds ~8.6e9 weights
# per block pair). train() also checks the parameters' memory before the model is built.
MAX_MODEL_INT = 2**16
# Keys a resumed run may change (module docstring); the others must equal the checkpoint's.
RESUME_CHANGEABLE = ("steps", "warmup_steps", "lr", "weight_decay", "grad_clip", "ema_decay", "ckpt_every",
                     "log_every", "eval_every", "eval_nfes", "eval_samples", "compile", "bf16", "device",
                     "backend", "threads", "out_dir")


@dataclass(frozen=True)
class TrainConfig:
    """A training run (docs/math.md §5). Times are in [0, 1); lr in optimizer units; counts in steps.

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
    "cuda" or "cuda:N". backend: bridge_sample / PhaseSampler backend ("float64" = the plain
    PyTorch data path and loss, for the throughput comparison). threads: CPU threads of torch in
    this process (0 = auto, psb_fast.threads: one thread when a batch holds fewer than
    psb_fast.threads.SMALL_WORK elements of x, torch's default otherwise). FIELD_HELP holds a
    line per key.
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
    threads: int = 0

    def __post_init__(self) -> None:
        types = _field_types()
        for name in field_names():
            object.__setattr__(self, name, _coerce(name, getattr(self, name), types[name]))
        _validate(self)


# One line per key: what it means (psb-fast config, psb-fast train --help).
FIELD_HELP = {
    "data": "dataset: gmm-grid | spiral | checkerboard | rings | digits | tensor:PATH | images:DIR | "
            "cifar10:DIR",
    "model": "network: mlp (1-D data) | unet (images) | auto",
    "model_kwargs": "keyword arguments of the network, e.g. { hidden = 256, depth = 3 } or { base = 64 }",
    "conditional": "feed class labels to the model (data with labels only)",
    "p": "bridge: diffusion scale, g(t) = p (1 - t), > 0",
    "k": "bridge: the prior's x-v correlation is -k, |k| < 1",
    "varx": "bridge: prior variance of x, > 0",
    "varv": "bridge: prior variance of v, > 0",
    "mode": "bridge: probODE (probability-flow sampling) | SDE",
    "t0": "training times t ~ U[t0, T]: lower end, in [0, 1)",
    "T": "training times t ~ U[t0, T]: upper end, in (t0, 1)",
    "weighting": "loss weight: reciprocal (1 / sqrt(1 - t)) | none",
    "batch_size": "global batch (split evenly over torchrun ranks); checked against memory before step 1",
    "steps": "total optimizer steps",
    "lr": "AdamW learning rate (peak, after warmup; cosine decay to 0)",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "steps of linear lr warmup",
    "grad_clip": "max global gradient norm (0 = no clipping)",
    "ema_decay": "EMA decay per step (warmed up), in [0, 1)",
    "seed": "seed of the data, time and noise streams",
    "out_dir": "run folder: checkpoint.pt, config.json, metrics.jsonl, eval/",
    "ckpt_every": "checkpoint period in steps (0 = only at the end)",
    "log_every": "log period in steps (metrics.jsonl, progress bar)",
    "eval_every": "evaluation period in steps (0 = only at the end)",
    "eval_nfes": "sampler NFEs of each evaluation",
    "eval_samples": "samples per evaluation (0 = no evaluation)",
    "compile": "torch.compile the model",
    "bf16": "bfloat16 autocast (CUDA only)",
    "device": "auto | cpu | cuda | cuda:N",
    "backend": "fused-op backend: auto | triton | cpu | float64",
    "threads": "CPU threads of torch (0 = auto: 1 when a batch holds fewer than psb_fast.threads.SMALL_WORK "
               "elements of x, else torch's default)",
}


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
    read = read_toml if path.suffix == ".toml" else read_json
    values = read(path, "config file")
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


def resume_fixed() -> list[str]:
    """The config keys a resume must keep (all but RESUME_CHANGEABLE), in declaration order."""
    return [name for name in field_names() if name not in RESUME_CHANGEABLE]


def resume_changes(saved: dict, cfg: TrainConfig, source: str = "checkpoint") -> dict[str, tuple]:
    """{key: (saved value, cfg's value)} for the keys where cfg differs from a checkpoint's config.

    saved: the checkpoint's config dict (config_to_dict; a key it lacks counts as its default).
    Raises ValueError naming the keys outside RESUME_CHANGEABLE that differ (`source` names the
    checkpoint in the message).
    """
    defaults = config_to_dict(TrainConfig())
    current = config_to_dict(cfg)
    changes = {}
    for name in field_names():
        before = saved.get(name, defaults[name])
        if isinstance(before, tuple):
            before = list(before)
        if before != current[name]:
            changes[name] = (before, current[name])
    fixed = [name for name in changes if name not in RESUME_CHANGEABLE]
    if fixed:
        values = ", ".join(f"{name}={changes[name][0]!r}" for name in fixed)
        raise ValueError(f"cannot resume {source}: config key(s) {fixed} differ from the checkpoint's "
                         f"({values}); a resume may change only {', '.join(RESUME_CHANGEABLE)}")
    return changes


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
    except RecursionError:
        raise ValueError(f"override value {text[:40]!r}... nests deeper than Python can parse") from None


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
    need(0 < cfg.lr <= MAX_LR, "lr", f"in (0, {MAX_LR:g}]")
    need(0 <= cfg.weight_decay <= MAX_WEIGHT_DECAY, "weight_decay", f"in [0, {MAX_WEIGHT_DECAY:g}]")
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
    need(cfg.backend in BACKENDS or cfg.backend in OLD_BACKENDS, "backend", f"one of {BACKENDS}")
    need(cfg.threads >= 0, "threads", ">= 0 (0 = auto)")
    _check_model_kwargs(cfg.model_kwargs)


def _check_model_kwargs(kwargs: dict) -> None:
    """ValueError naming the entry when a number in model_kwargs (nested lists and dicts included)
    is not finite or an int is outside [-MAX_MODEL_INT, MAX_MODEL_INT] (a network that size cannot
    be allocated); make_model checks the names and the rest."""
    todo: list[tuple[str, object]] = [("model_kwargs", kwargs)]
    while todo:  # a loop, not recursion: the nesting depth is the user's
        where, value = todo.pop()
        if isinstance(value, dict):
            todo += [(f"{where}.{k}", v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            todo += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where} must be finite, got {value!r}")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_MODEL_INT:
            raise ValueError(f"{where} must be at most {MAX_MODEL_INT} in size (a network that size "
                             f"cannot be allocated), got {value!r}")


def default_config_toml() -> str:
    """Every key with its default value and meaning, as a TOML config that load_config reads back
    to TrainConfig() (`psb-fast config`)."""
    lines = ["# psb_fast training config: every key with its default. Copy, edit, then",
             "#   psb-fast train --config run.toml [--set KEY=VALUE ...]", ""]
    for name, value in config_to_dict(TrainConfig()).items():
        lines += [f"# {FIELD_HELP[name]}", f"{name} = {_toml_value(value)}"]
    return "\n".join(lines) + "\n"


def keys_help() -> str:
    """One line per key: name, default and meaning (psb-fast train --help)."""
    width = max(map(len, field_names()))
    return "\n".join(f"  {name:<{width}}  {_toml_value(value):<12} {FIELD_HELP[name]}"
                     for name, value in config_to_dict(TrainConfig()).items())


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
