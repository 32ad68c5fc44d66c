"""Training loop: config parsing, bit-exact resume, signals, non-finite losses, bad input, EMA, loss."""

import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from psb_fast import PhaseBridge
from psb_fast.checkpoint import load_checkpoint, previous_path
from psb_fast.config import TrainConfig, apply_overrides, config_to_dict, load_config
from psb_fast.locks import FolderLocked
from psb_fast.models import make_model
from psb_fast.train import lr_factor, train, training_loss

torch.set_num_threads(1)


def tiny(out_dir: Path, **changes) -> TrainConfig:
    base = dict(data="gmm-grid", model="mlp", model_kwargs={"hidden": 16, "depth": 1, "time_dim": 8},
                batch_size=32, steps=12, warmup_steps=3, lr=3e-3, ema_decay=0.9, log_every=4,
                ckpt_every=0, eval_samples=0, device="cpu", out_dir=str(out_dir))
    return TrainConfig(**{**base, **changes})


def weights(module: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- config -------------------------------------------------------------------------------------

def test_overrides_are_typed():
    cfg = apply_overrides(TrainConfig(), ["steps=100", "lr=3e-4", "eval_nfes=5,10", "compile=true",
                                          "model_kwargs.hidden=64", "data=spiral", "steps=1e3"])
    assert cfg.steps == 1000 and cfg.lr == 3e-4 and cfg.eval_nfes == (5, 10)
    assert cfg.compile is True and cfg.model_kwargs == {"hidden": 64} and cfg.data == "spiral"


@pytest.mark.parametrize("override, message", [
    (["stpes=10"], r"unknown config key\(s\) \['stpes'\]; valid keys: data, model"),
    (["steps=1.5"], "steps must be an integer, got '1.5'"),
    (["lr=fast"], "lr must be a number, got 'fast'"),
    (["compile=maybe"], "compile must be a boolean"),
    (["eval_nfes=5,x"], "eval_nfes must be comma-separated integers"),
    (["T=0.5", "t0=0.6"], "T must be in"),
    (["mode=ODE"], "mode must be one of"),
    (["device=tpu"], "device must be one of"),
    (["lr=-1"], r"lr must be in \(0, 1e\+06\], got -1.0"),
    (["steps"], "override must look like 'key=value'"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(TrainConfig(), override)


def test_load_config_toml_and_json(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('data = "rings"\nsteps = 50\nlr = 1\neval_nfes = [5, 20]\n[model_kwargs]\nhidden = 32\n')
    cfg = load_config(toml)
    assert (cfg.data, cfg.steps, cfg.lr, cfg.eval_nfes, cfg.model_kwargs) == ("rings", 50, 1.0, (5, 20),
                                                                              {"hidden": 32})
    js = tmp_path / "run.json"
    js.write_text(json.dumps(config_to_dict(cfg)))
    assert load_config(js) == cfg
    js.write_text(json.dumps({"steps": 5, "learning_rate": 1e-3}))
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        load_config(js)
    js.write_text(json.dumps({"steps": "5"}))
    with pytest.raises(TypeError, match="steps must be an int, got str '5'"):
        load_config(js)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match=r"must end in \.toml or \.json"):
        load_config(tmp_path / "run.yaml")


# --- resume ---------------------------------------------------------------------------------------

def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = train(tiny(tmp_path / "full"), progress=False)
    assert len(full["losses"]) == 12 and full["stopped"] is None
    cfg = tiny(tmp_path / "split")
    first = train(cfg, progress=False, stop_after=5)
    assert (first["step"], first["stopped"]) == (5, "stop_after")
    assert load_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")["step"] == 5
    rest = train(cfg, resume=True, progress=False)
    assert rest["start_step"] == 5 and rest["step"] == 12
    assert first["losses"] + rest["losses"] == full["losses"]
    assert_same_weights(weights(rest["model"]), weights(full["model"]))
    assert_same_weights(weights(rest["ema"]), weights(full["ema"]))


def test_resume_from_previous_when_latest_is_corrupt(tmp_path):
    full = train(tiny(tmp_path / "full"), progress=False)
    cfg = tiny(tmp_path / "run", ckpt_every=4)
    train(cfg, progress=False, stop_after=9)  # checkpoints at 4, 8 and 9 (the stop)
    path = Path(cfg.out_dir) / "checkpoint.pt"
    assert load_checkpoint(previous_path(path))["step"] == 8
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.warns(RuntimeWarning, match="unreadable"):
        rest = train(cfg, resume=True, progress=False)
    assert rest["start_step"] == 8
    assert rest["losses"] == full["losses"][8:]
    assert_same_weights(weights(rest["model"]), weights(full["model"]))


def test_resume_refuses_changed_model_and_fresh_run_refuses_overwrite(tmp_path):
    cfg = tiny(tmp_path / "run")
    train(cfg, progress=False, stop_after=2)
    with pytest.raises(ValueError, match="already holds a checkpoint; pass resume=True"):
        train(cfg, progress=False)
    other = dataclasses.replace(cfg, model_kwargs={"hidden": 8, "depth": 1, "time_dim": 8})
    with pytest.raises(ValueError, match=r"config key\(s\) \['model_kwargs'\] differ"):
        train(other, resume=True, progress=False)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        train(tiny(tmp_path / "empty"), resume=True, progress=False)


# --- signals and non-finite losses ------------------------------------------------------------------

def test_sigint_checkpoints_and_returns(tmp_path):
    def interrupt(info):
        if info["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = tiny(tmp_path / "run", steps=1000)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under nohup
    summary = train(cfg, progress=False, callback=interrupt)
    assert (summary["step"], summary["stopped"]) == (3, "SIGINT")
    assert load_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back


def _train_until_signalled(cfg: TrainConfig, ready: Path, result: Path) -> None:
    """Child process: train (marking `ready` at step 2) and write the summary's step and stop reason."""
    torch.set_num_threads(1)

    def mark(info):
        if info["step"] == 2:
            ready.touch()

    summary = train(cfg, progress=False, callback=mark)
    result.write_text(json.dumps({"step": summary["step"], "stopped": summary["stopped"]}))


def _wait_for_step_2(proc, ready: Path) -> None:
    """Wait (at most 120 s) until the forked trainer marks `ready` at step 2."""
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), f"training did not reach step 2 (exit code {proc.exitcode})"


@pytest.mark.skipif(sys.platform != "linux", reason="forks the training process (Linux)")
@pytest.mark.slow
def test_sigterm_from_outside_in_a_subprocess(tmp_path):
    ready, result = tmp_path / "ready", tmp_path / "result.json"
    cfg = tiny(tmp_path / "run", steps=10**6)
    ctx = multiprocessing.get_context("fork")  # no re-import of torch in the child
    proc = ctx.Process(target=_train_until_signalled, args=(cfg, ready, result))
    proc.start()
    try:
        _wait_for_step_2(proc, ready)
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(timeout=120)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert proc.exitcode == 0
    summary = json.loads(result.read_text())
    assert summary["stopped"] == "SIGTERM" and summary["step"] >= 2
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt", fallback=False)
    assert state["step"] == summary["step"]


def _train_and_stall(cfg: TrainConfig, ready: Path) -> None:
    """Child process: train, and at step 2 mark `ready` and hang (until killed)."""
    torch.set_num_threads(1)

    def stall(info):
        if info["step"] == 2:
            ready.touch()
            time.sleep(600)

    train(cfg, progress=False, callback=stall)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="forks the training process (Linux)")
def test_a_second_trainer_on_the_same_out_dir_is_refused_until_the_first_dies(tmp_path):
    """D6: two trainers on one out_dir: the second is refused at once, before writing anything; after
    kill -9 of the first, its lock is gone and a resume of its checkpoint works."""
    ready = tmp_path / "ready"
    cfg = tiny(tmp_path / "run", steps=10**6, ckpt_every=1)
    proc = multiprocessing.get_context("fork").Process(target=_train_and_stall, args=(cfg, ready))
    proc.start()
    try:
        _wait_for_step_2(proc, ready)
        files = {p.name: p.read_bytes() for p in Path(cfg.out_dir).iterdir() if p.is_file()}
        for resume in (False, True):
            steps = []
            message = r"'.*run' is in use: another process holds its training run lock"
            with pytest.raises(FolderLocked, match=message):
                train(dataclasses.replace(cfg, steps=4), resume=resume, progress=False, callback=steps.append)
            assert steps == []
            assert {p.name: p.read_bytes() for p in Path(cfg.out_dir).iterdir() if p.is_file()} == files
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=60)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    summary = train(dataclasses.replace(cfg, steps=4), resume=True, progress=False)
    assert (summary["start_step"], summary["step"]) == (1, 4)


class NaNAfter(torch.nn.Module):
    """Wraps a model; its training-mode forward passes after the first `good` return NaN."""

    def __init__(self, inner: torch.nn.Module, good: int) -> None:
        super().__init__()
        self.inner, self.good, self.calls = inner, good, 0

    def forward(self, m, t, cond=None):
        F = self.inner(m, t, cond)
        if self.training:
            self.calls += 1
            if self.calls > self.good:
                return F * float("nan")
        return F


def test_nonfinite_loss_names_step_and_keeps_checkpoint(tmp_path):
    cfg = tiny(tmp_path / "run", ckpt_every=3, log_every=100)
    model = NaNAfter(make_model("mlp", (2,), hidden=16, depth=1, time_dim=8), good=4)
    with pytest.raises(FloatingPointError,
                       match=r"loss is nan at step 5: .*last good checkpoint .* \(step 3\) is kept"):
        train(cfg, progress=False, model=model)
    assert load_checkpoint(Path(cfg.out_dir) / "checkpoint.pt", fallback=False)["step"] == 3
    events = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "nonfinite", "step": 5} in [{k: e.get(k) for k in ("event", "step")} for e in events]


# --- bad input -----------------------------------------------------------------------------------

class WrongShape(torch.nn.Module):
    def forward(self, m, t, cond=None):
        return m


@pytest.mark.parametrize("changes, model, error, message", [
    ({"data": "no-such-set"}, None, ValueError, "spec must be one of"),
    ({"model": "transformer"}, None, ValueError, "transformer"),
    ({"model": "unet"}, None, ValueError, r"model 'unet' needs x_shape \(C, H, W\)"),
    ({"data": "tensor:/nonexistent/x.pt"}, None, ValueError, "nonexistent"),
    ({"data": "spiral", "conditional": True}, None, ValueError, "conditional=True needs a labelled dataset"),
    ({"batch_size": 32}, WrongShape(), ValueError, r"model must map m .* got \(2, 4\)"),
])
def test_bad_input_fails_before_any_step(tmp_path, changes, model, error, message):
    cfg = tiny(tmp_path / "run", **changes)
    steps = []
    with pytest.raises(error, match=message):
        train(cfg, progress=False, model=model, callback=steps.append)
    assert steps == [] and not (tmp_path / "run").exists()


def test_wrong_dtype_data_rejected(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(torch.zeros(16, 2, dtype=torch.complex64), path)
    with pytest.raises((TypeError, ValueError), match="x.pt"):
        train(tiny(tmp_path / "run", data=f"tensor:{path}"), progress=False)
    assert not (tmp_path / "run").exists()


# --- schedule, EMA, loss, records --------------------------------------------------------------------

def test_lr_schedule_and_logged_lr(tmp_path):
    assert [lr_factor(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    tail = [lr_factor(s, 4, 20) for s in range(4, 21)]
    assert all(a > b for a, b in zip(tail, tail[1:], strict=False)) and tail[-1] == 0.0
    assert abs(lr_factor(12, 4, 20) - 0.5) < 1e-12
    cfg = tiny(tmp_path / "run", steps=8, warmup_steps=2, log_every=1)
    train(cfg, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [e["lr"] for e in logged if "lr" in e]
    assert len(lrs) == 8
    assert lrs == pytest.approx([cfg.lr * lr_factor(s, 2, 8) for s in range(1, 9)], rel=1e-12, abs=1e-15)


def test_ema_follows_the_weights(tmp_path):
    decay = 0.3  # below the warmup (1 + n) / (10 + n) from n = 3 on: both regimes are exercised
    model = make_model("mlp", (2,), hidden=16, depth=1, time_dim=8)
    history = []
    train(tiny(tmp_path / "run", steps=6, ema_decay=decay), progress=False, model=model,
          callback=lambda info: history.append(weights(model)))
    expected = history[0]
    for n, w in enumerate(history[1:], start=1):
        d = min(decay, (1 + n) / (10 + n))
        expected = {k: d * expected[k] + (1 - d) * w[k] for k in w}
    summary_ema = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["ema"]
    for key, value in expected.items():
        torch.testing.assert_close(summary_ema[f"module.{key}"], value, rtol=1e-6, atol=1e-7)
    assert not torch.equal(expected["out.weight"], history[-1]["out.weight"])


def test_training_loss_weighting_and_backends():
    bridge = PhaseBridge()
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    t = torch.full((64,), 0.75)

    def model(m, t):
        return m[:, :2] * 0.3

    none = training_loss(model, bridge, x1, t, seed=3, weighting="none", backend="cpu")
    reciprocal = training_loss(model, bridge, x1, t, seed=3, weighting="reciprocal", backend="cpu")
    torch.testing.assert_close(reciprocal, none / 0.25)
    ref = training_loss(model, bridge, x1, t, seed=3, weighting="reciprocal", backend="reference")
    assert ref.dtype == torch.float64 and torch.isfinite(ref)
    with pytest.raises(ValueError, match="weighting must be"):
        training_loss(model, bridge, x1, t, weighting="uniform")


@pytest.mark.slow
def test_evaluation_writes_images(tmp_path):
    pytest.importorskip("psb_fast.plots")
    cfg = tiny(tmp_path / "run", steps=4, eval_samples=64, eval_nfes=(2, 3))
    summary = train(cfg, progress=False)
    assert summary["images"] and all(Path(p).is_file() for p in summary["images"])
    assert set(summary["eval"]) == {"energy_nfe2", "energy_nfe3"}
    assert all(v >= 0 for v in summary["eval"].values())
