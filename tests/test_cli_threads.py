"""psb_fast.threads: one thread for small network calls in train, sample, tune and the Python API,
a count the caller set is kept, and the previous count is restored after every call."""

import pytest
import torch

import psb_fast
from psb_fast import threads
from psb_fast.cli import main
from psb_fast.models import make_model


@pytest.fixture
def two_threads_by_default(monkeypatch):
    """torch's count 2 as if it were the default psb_fast found at import (no OMP/MKL variables)."""
    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "_AT_IMPORT", 2)
    yield
    torch.set_num_threads(before)


class _Recording(torch.nn.Module):
    """A small MLP that records torch's thread count at each call."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.seen = make_model("mlp", (2,), hidden=16, depth=1), []

    def forward(self, m, t):
        self.seen.append(torch.get_num_threads())
        return self.net(m, t)


def test_choice_by_work_size():
    cpu = torch.device("cpu")
    assert threads.auto_threads(threads.SMALL_WORK - 1, cpu) == 1
    assert threads.auto_threads(threads.SMALL_WORK, cpu) == torch.get_num_threads()
    assert threads.work_elements(64, (3, 32, 32)) == 64 * 3072
    assert threads.choose_threads(3, 10, cpu) == 3 and threads.choose_threads(0, 10, cpu) == 1
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be an int >= 0"):
            threads.choose_threads(bad, 10, cpu)


def test_intra_op_threads_restores_the_previous_count():
    before = torch.get_num_threads()
    with threads.intra_op_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), threads.intra_op_threads(before + 1):
        raise RuntimeError
    assert torch.get_num_threads() == before


def test_sampler_uses_one_thread_for_small_calls_and_restores_the_count(two_threads_by_default):
    bridge = psb_fast.PhaseBridge()
    model = _Recording()
    m0 = bridge.sample_prior((64, 2))
    psb_fast.PhaseSampler(bridge, 4).sample(model, m0)
    assert set(model.seen) == {1} and torch.get_num_threads() == 2


def test_sampler_keeps_a_count_the_caller_set(two_threads_by_default):
    bridge = psb_fast.PhaseBridge()
    model = _Recording()
    torch.set_num_threads(3)  # the caller's choice, made after psb_fast was imported
    psb_fast.PhaseSampler(bridge, 4).sample(model, bridge.sample_prior((64, 2)))
    assert set(model.seen) == {3}
    torch.set_num_threads(2)
    threads.set_auto(False)
    try:
        model.seen.clear()
        psb_fast.PhaseSampler(bridge, 4).sample(model, bridge.sample_prior((64, 2)))
        assert set(model.seen) == {2}
    finally:
        threads.set_auto(True)


def test_tune_uses_one_thread_for_small_calls(two_threads_by_default):
    bridge = psb_fast.PhaseBridge()
    model = _Recording()
    psb_fast.tune(model, bridge, [3], bridge.sample_prior((32, 2)), reference_nfe=8, progress=False)
    assert set(model.seen) == {1} and torch.get_num_threads() == 2


@pytest.mark.slow
def test_cli_sample_and_tune_report_the_automatic_count(tmp_path, capsys, two_threads_by_default):
    run = tmp_path / "run"
    assert main(["train", "--set", f"out_dir={run}", "--set", "steps=2", "--set", "batch_size=16",
                 "--set", "warmup_steps=1", "--set", "eval_samples=0", "--set", "device=cpu",
                 "--no-progress"]) == 0
    argv = ["sample", str(run), "--nfe", "3", "-n", "8", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 0
    assert "1 thread(s)" in capsys.readouterr().err
    assert main(["sample", str(run), "--nfe", "3", "-n", "8", "--threads", "2", "--no-progress",
                 "--out", str(tmp_path / "s2")]) == 0
    assert "2 thread(s)" in capsys.readouterr().err and torch.get_num_threads() == 2
    assert main(["tune", str(run), "--nfe", "3", "-n", "16", "--reference-nfe", "8", "--no-progress",
                 "--out", str(tmp_path / "tuned.json")]) == 0
    assert "1 thread(s)" in capsys.readouterr().err and torch.get_num_threads() == 2
