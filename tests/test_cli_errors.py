"""Bad input to `psb-fast sample` / `tune` (and bad data files given to `train`) exits with status 2
and one line on stderr naming the option or file, before any sampling or training."""

import os
import pickle

import numpy as np
import pytest
import torch

from psb_fast.cli import main
from psb_fast.distributed import resolve_device

torch.set_num_threads(1)
TINY = ["--set", "steps=4", "--set", "batch_size=32", "--set", "model=mlp", "--set", "eval_samples=0",
        "--set", "ckpt_every=0", "--set", "device=cpu", "--set", "warmup_steps=1", "--no-progress"]
# a CUDA device this machine does not have: plain "cuda" without CUDA, else one index past the last
NO_SUCH_CUDA = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--set", f"out_dir={out}", *TINY]) == 0
    return out


@pytest.fixture
def files(tmp_path):
    """Placeholders of the argv lists below -> paths under tmp_path."""
    np.save(tmp_path / "stroke.npy", np.array([1.0, -1.0], dtype=np.float32))
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "words.npy", np.array(["up", "left"]))
    (tmp_path / "a_file").write_text("not a folder")
    return {"STROKE": tmp_path / "stroke.npy", "EMPTY": tmp_path / "empty.npy",
            "WORDS": tmp_path / "words.npy", "FILE": tmp_path / "a_file", "DIR": tmp_path,
            "FILE_BELOW": tmp_path / "a_file" / "out", "MISSING": tmp_path / "missing.json"}


def _expect_one_line_error(argv: list[str], capsys, *messages: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"psb-fast {argv[0]}: error:") and len(err.strip().splitlines()) == 1, err
    for message in messages:
        assert message in err, err
    return err


@pytest.mark.parametrize(
    ("argv", "messages"),
    [
        (["sample", "RUN", "-n", "0"], ["-n", "got 0"]),
        (["tune", "RUN", "-n", "-5"], ["-n", "got -5"]),
        (["sample", "RUN", "--device", NO_SUCH_CUDA], ["--device", NO_SUCH_CUDA]),
        (["tune", "RUN", "--device", NO_SUCH_CUDA], ["--device", NO_SUCH_CUDA]),
        (["sample", "RUN", "--device", "gpu"], ["--device", "'gpu'", "'cuda:N'"]),
        (["sample", "RUN", "--out", "FILE"], ["--out", "a_file", "existing file"]),
        (["sample", "RUN", "--out", "FILE_BELOW"], ["--out", "a file is in the way"]),
        (["tune", "RUN", "--out", "DIR"], ["--out", "is a folder"]),
        (["tune", "RUN", "--out", "FILE_BELOW"], ["--out", "does not exist"]),
        (["sample", "RUN", "--strength", "2"], ["--strength 2.0", "needs --stroke"]),
        (["sample", "RUN", "--strength", "0.5"], ["--strength 0.5", "needs --stroke"]),
        (["sample", "RUN", "--stroke-mode", "inpaint"], ["--stroke-mode inpaint", "needs --stroke"]),
        (["sample", "RUN", "--stroke", "STROKE", "--strength", "2"], ["--strength", "[0, 1]", "2.0"]),
        (["sample", "RUN", "--stroke", "STROKE", "--strength", "-0.1"], ["--strength", "[0, 1]"]),
        (["sample", "RUN", "--stroke", "STROKE", "--strength", "nan"], ["--strength", "[0, 1]"]),
        (["sample", "RUN", "--stroke", "STROKE", "--stroke-mode", "init-v", "--strength", "0.5"],
         ["--strength", "init-v"]),
        (["sample", "RUN", "--stroke", "EMPTY"], ["--stroke", "empty.npy", "readable"]),
        (["sample", "RUN", "--stroke", "WORDS"], ["--stroke", "words.npy", "numeric"]),
        (["sample", "RUN", "--tuned", "MISSING"], ["--tuned", "missing.json"]),
        (["tune", "RUN", "--nfe", "5", "20000"], ["--nfe", "[1, 10000]", "20000"]),
        (["tune", "RUN", "--reference-nfe", "0"], ["--reference-nfe", "got 0"]),
        (["sample", "RUN", "--nfe", "10001"], ["--nfe", "[1, 10000]", "10001"]),
        (["sample", "RUN", "--threads", "-1"], ["--threads", "got -1"]),
    ],
)
def test_bad_sample_and_tune_options_exit_2_naming_the_option(run_dir, files, capsys, argv, messages):
    argv = [str(run_dir) if a == "RUN" else str(files.get(a, a)) for a in argv]
    _expect_one_line_error(argv, capsys, *messages)
    assert not (files["DIR"] / "samples.npz").exists()


def test_stroke_options_with_a_stroke_still_sample(run_dir, files, tmp_path):
    base = ["sample", str(run_dir), "--nfe", "3", "-n", "4", "--stroke", str(files["STROKE"])]
    assert main([*base, "--strength", "0.5", "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--stroke-mode", "init-v", "--out", str(tmp_path / "b")]) == 0
    assert main([*base, "--device", "auto", "--out", str(tmp_path / "c")]) == 0
    assert np.load(tmp_path / "c" / "samples.npz")["x1"].shape == (4, 2)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device must be"):
        resolve_device("tpu", "--device")
    with pytest.raises(TypeError, match="device"):
        resolve_device(0)
    with pytest.raises(ValueError, match=NO_SUCH_CUDA):
        resolve_device(NO_SUCH_CUDA)


class _Payload:
    """Unpickles as os.system(command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_train_on_a_cifar_pickle_with_code_exits_2_and_runs_nothing(tmp_path, capsys):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    marker = tmp_path / "marker"
    for i in range(1, 6):
        batch = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1],
                 b"extra": _Payload(f"touch {marker}")}
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f)
    argv = ["train", "--set", f"data=cifar10:{tmp_path / 'cifar'}", "--set", f"out_dir={tmp_path / 'out'}",
            *TINY]
    _expect_one_line_error(argv, capsys, "data_batch_1", "system")
    assert not marker.exists()


def test_train_on_an_empty_npy_exits_2_naming_the_file(tmp_path, capsys):
    (tmp_path / "x.npy").write_bytes(b"")
    argv = ["train", "--set", f"data=tensor:{tmp_path / 'x.npy'}", "--set", f"out_dir={tmp_path / 'out'}",
            *TINY]
    _expect_one_line_error(argv, capsys, "x.npy", "empty")


def _tampered_checkpoint(run_dir, tmp_path, change) -> str:
    """A copy of run_dir's checkpoint.pt with `change(state)` applied (saved in the checkpoint format)."""
    from psb_fast.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(run_dir / "checkpoint.pt")
    change(state)
    save_checkpoint(tmp_path / "bad" / "checkpoint.pt", {"format": "psb_fast.checkpoint/1", **state})
    return str(tmp_path / "bad")


def _reshape_first(weights: dict) -> None:
    key = next(k for k, v in weights.items() if isinstance(v, torch.Tensor) and v.dim() == 2)
    weights[key] = torch.zeros(weights[key].shape[0] + 1, weights[key].shape[1])


@pytest.mark.parametrize(("change", "messages"), [
    (lambda s: _reshape_first(s["ema"]), ["entry 'ema'", "must have shape"]),
    (lambda s: s.update(ema={k.removeprefix("module."): v for k, v in s["ema"].items()}),
     ["entry 'ema'", "missing ['module."]),
    (lambda s: s.update(ema=[1, 2]), ["entry 'ema' must be a dict", "list"]),
    (lambda s: s.update(x_shape=[3]), ["entry 'ema'", "must have shape"]),
    (lambda s: s.update(x_shape="2"), ["entry 'x_shape'", "'2'"]),
    (lambda s: s.update(x_shape=[0]), ["entry 'x_shape'", "[0]"]),
    (lambda s: s.update(num_classes=-1), ["entry 'num_classes'", "-1"]),
    (lambda s: s["ema"].update({k: torch.full_like(v, float("nan")) for k, v in s["ema"].items()
                                if v.is_floating_point()}), ["non-finite"]),
    (lambda s: s.update(config=[1]), ["entry 'config'"]),
    (lambda s: s.pop("ema"), ["no 'ema' entry"]),
])
def test_sample_and_tune_refuse_a_checkpoint_whose_weights_do_not_fit_its_config(
        run_dir, tmp_path, capsys, change, messages):
    bad = _tampered_checkpoint(run_dir, tmp_path, change)
    for command in ("sample", "tune"):
        argv = [command, bad, "--nfe", "3", "-n", "4", "--out", str(tmp_path / f"o-{command}")]
        _expect_one_line_error(argv, capsys, "checkpoint.pt", *messages)
    assert not (tmp_path / "o-sample").exists() and not (tmp_path / "o-tune").exists()


@pytest.mark.parametrize("content", [torch.randn(8, 2).to_sparse(), torch.empty(8, 2, device="meta")])
def test_train_on_a_sparse_or_meta_pt_file_exits_2_naming_the_file(tmp_path, capsys, content):
    torch.save(content, tmp_path / "x.pt")
    argv = ["train", "--set", f"data=tensor:{tmp_path / 'x.pt'}", "--set", f"out_dir={tmp_path / 'out'}",
            *TINY]
    _expect_one_line_error(argv, capsys, "x.pt", "dense tensor")
