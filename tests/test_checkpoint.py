"""Checkpoint files: atomic writes, the kept previous file, code-free and corruption-proof loading."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from psb_fast import checkpoint
from psb_fast.checkpoint import load_checkpoint, previous_path, save_checkpoint


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"step": step, "weights": torch.randn(4, 3, generator=g), "config": {"lr": 1e-3, "nfes": [5, 10]},
            "rng": {"data": [g.get_state()], "cuda": [None]}}


def _assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["config"] == b["config"]
    assert torch.equal(a["weights"], b["weights"])
    assert torch.equal(a["rng"]["data"][0], b["rng"]["data"][0])


def test_round_trip_and_previous_file_kept(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    assert not previous_path(path).exists()
    save_checkpoint(path, _state(2))
    _assert_same(load_checkpoint(path), _state(2))
    _assert_same(load_checkpoint(previous_path(path)), _state(1))
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt", "checkpoint.pt.prev"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_clear_error_and_previous_good_used(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 50,
                      "empty": b""}[damage])
    with pytest.raises(ValueError, match="checkpoint.pt' is unreadable"):
        load_checkpoint(path, fallback=False)
    with pytest.warns(RuntimeWarning, match="previous good checkpoint"):
        state = load_checkpoint(path)
    _assert_same(state, _state(1))


def test_missing_latest_falls_back_to_previous(tmp_path):
    """The window between the two renames of a save: only <path>.prev exists."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    path.unlink()
    with pytest.warns(RuntimeWarning):
        _assert_same(load_checkpoint(path), _state(1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(path, fallback=False)


def test_no_good_file_raises(tmp_path):
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(FileNotFoundError):
        load_checkpoint(path)
    path.write_bytes(b"broken")
    previous_path(path).write_bytes(b"broken too")
    with pytest.raises(ValueError, match="previous checkpoint is unreadable too"):
        load_checkpoint(path)


def test_foreign_file_rejected(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"step": 3}, path)
    with pytest.raises(ValueError, match="is not a psb_fast.checkpoint"):
        load_checkpoint(path)


class _Payload:
    """Pickles as a call that creates a file: loading must never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_cannot_run_code(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    torch.save({"format": checkpoint.FORMAT, "step": 1, "payload": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(path, fallback=False)
    assert not marker.exists()


def test_failed_write_keeps_last_good(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))

    def failing_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(2))
    monkeypatch.undo()
    _assert_same(load_checkpoint(path, fallback=False), _state(1))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_state_must_be_a_dict(tmp_path):
    with pytest.raises(TypeError, match="state must be a dict"):
        save_checkpoint(tmp_path / "c.pt", [1, 2])


def test_check_failure_falls_back_and_mismatch_does_not(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, {k: v for k, v in _state(2).items() if k != "rng"})

    def needs_rng(state):
        if "rng" not in state:
            raise ValueError("entry 'rng' is missing")

    with pytest.warns(RuntimeWarning, match="checkpoint.pt' cannot be used: entry 'rng' is missing; "
                      "loaded the previous good checkpoint"):
        state, used = checkpoint.read_checkpoint(path, check=needs_rng)
    _assert_same(state, _state(1))
    assert used == previous_path(path)

    def other_config(state):
        raise checkpoint.CheckpointMismatch("config key(s) ['seed'] differ")

    with pytest.raises(checkpoint.CheckpointMismatch, match="seed"):
        load_checkpoint(path, check=other_config)
    save_checkpoint(path, {k: v for k, v in _state(3).items() if k != "rng"})  # now both lack "rng"
    with pytest.raises(ValueError, match="the previous checkpoint is unusable too: .*'rng' is missing"):
        load_checkpoint(path, check=needs_rng)


def test_stale_temporaries_of_gone_processes_are_removed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    gone, alive = proc.pid, os.getppid()
    names = [f"checkpoint.pt.tmp-{gone}", f"checkpoint.pt.tmp-{os.getpid()}", f"metrics.jsonl.tmp-{gone}",
             f"checkpoint.pt.tmp-{alive}", "checkpoint.pt.tmp-x1", "checkpoint.pt.prev", "notes.tmp-1"]
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
    removed = checkpoint.remove_stale_temporaries(tmp_path, ["checkpoint.pt", "metrics.jsonl"])
    assert sorted(p.name for p in removed) == sorted(names[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])


def test_failed_write_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"

    def full(obj, f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OSError, match=rf"\[Errno 28\] .*: '{tmp_path}/checkpoint.pt'$"):
        save_checkpoint(path, _state(1))
    assert list(tmp_path.iterdir()) == []
