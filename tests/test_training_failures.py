"""Failure behaviour of training: finite checkpoints, checked resumes, changes at resume, temporary
files, metrics after a resume, memory bound, and the exit codes of the real `psb-fast train`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import tiny  # the tiny run config, shared with test_train

from psb_fast import cli, config, resources
from psb_fast import train as train_module
from psb_fast.checkpoint import load_checkpoint, previous_path
from psb_fast.config import RESUME_CHANGEABLE, TrainConfig, field_names, resume_fixed
from psb_fast.models import make_model
from psb_fast.train import lr_factor, train

torch.set_num_threads(1)


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def logged_steps(out_dir: Path) -> list[int]:
    return [r["step"] for r in records(out_dir) if "loss" in r]


def finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for part in ("model", "ema") for v in state[part].values()
               if v.is_floating_point())


def dead_pid() -> int:
    """The pid of a process that has exited (reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- 2: only finite weights are checkpointed --------------------------------------------------------

def poison_at(model: torch.nn.Module, step: int):
    def callback(info):
        if info["step"] == step:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
    return callback


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    cfg = tiny(tmp_path / "run", ckpt_every=3, log_every=100)
    model = make_model("mlp", (2,), hidden=16, depth=1, time_dim=8)
    with pytest.raises(FloatingPointError, match=r"weights are non-finite after step 6 \(not saved\): "
                       r"training stopped; the last good checkpoint .*checkpoint.pt \(step 3\) is kept"):
        train(cfg, progress=False, model=model, callback=poison_at(model, 6))
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt", fallback=False)
    assert state["step"] == 3 and finite(state)
    event = [r for r in records(tmp_path / "run") if r.get("event") == "nonfinite"]
    assert [(e["step"], e["what"], e["good_step"]) for e in event] == [(6, "weights", 3)]


def test_nonfinite_before_any_checkpoint_says_none_exists(tmp_path):
    cfg = tiny(tmp_path / "run", ckpt_every=3, log_every=100)
    model = make_model("mlp", (2,), hidden=16, depth=1, time_dim=8)
    with pytest.raises(FloatingPointError, match="non-finite after step 3 .*no good checkpoint exists"):
        train(cfg, progress=False, model=model, callback=poison_at(model, 3))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_nonfinite_loss_names_the_good_checkpoints_step_after_a_resume(tmp_path):
    cfg = tiny(tmp_path / "run", ckpt_every=4, log_every=1)
    train(cfg, progress=False, stop_after=5)
    model = make_model("mlp", (2,), hidden=16, depth=1, time_dim=8)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 8: .*\(step 5\) is kept"):
        train(cfg, resume=True, progress=False, callback=poison_at(model, 7), model=model)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt", fallback=False)["step"] == 5


# --- 4: a checkpoint is checked before anything is restored ------------------------------------------

def _drop(key):
    def damage(state):
        del state[key]
    return damage


def _set(*path_and_value):
    *path, value = path_and_value

    def damage(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value
    return damage


def _damage_model_key(state):
    state["model"].pop("out.weight")


DAMAGES = {
    "no rng": (_drop("rng"), r"entries \['rng'\] are missing"),
    "no scheduler": (_drop("scheduler"), r"entries \['scheduler'\] are missing"),
    "model shape": (_set("model", "out.weight", torch.zeros(3, 3)), "'out.weight' must have shape"),
    "model key": (_damage_model_key, "must hold this model's tensors"),
    "ema dtype": (_set("ema", "module.out.bias", lambda v: v.double()), "dtype torch.float32"),
    "nan weights": (_set("model", "out.bias", lambda v: v * float("nan")), "non-finite weights"),
    "optimizer shape": (_set("optimizer", "state", 0, "exp_avg", torch.zeros(1)), "'exp_avg' of parameter 0"),
    "optimizer groups": (_set("optimizer", "param_groups", []), "1 parameter group"),
    "scheduler step": (_set("scheduler", "last_epoch", 3), "scheduler' must be at the checkpoint's step 9"),
    "step type": (_set("step", "8"), "'step' must be an int"),
    "rng size": (_set("rng", "data", [torch.zeros(7, dtype=torch.uint8)]), "'data' must hold uint8"),
    "rng ranks": (_set("rng", "world_size", 2), "'data' must be a list of 2"),
}


def _rewrite(path: Path, damage) -> None:
    state = torch.load(path, weights_only=True)
    damage(state)
    torch.save(state, path)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train(tiny(tmp_path_factory.mktemp("full") / "run"), progress=False)


@pytest.mark.parametrize("name", list(DAMAGES))
@pytest.mark.slow
def test_damaged_checkpoint_falls_back_to_previous(tmp_path, uninterrupted, name):
    damage, reason = DAMAGES[name]
    cfg = tiny(tmp_path / "run", ckpt_every=4)
    train(cfg, progress=False, stop_after=9)  # checkpoints at 4, 8 and 9 (the stop)
    path = tmp_path / "run" / "checkpoint.pt"
    _rewrite(path, damage)
    with pytest.warns(RuntimeWarning, match=f"checkpoint.pt' cannot be used: .*{reason}.*the previous"):
        rest = train(cfg, resume=True, progress=False)
    assert rest["start_step"] == 8 and rest["losses"] == uninterrupted["losses"][8:]
    assert not previous_path(path).exists() or load_checkpoint(previous_path(path))["step"] == 8


def test_no_good_checkpoint_fails_in_one_line(tmp_path, capsys):
    cfg = tiny(tmp_path / "run", ckpt_every=4)
    train(cfg, progress=False, stop_after=9)
    path = tmp_path / "run" / "checkpoint.pt"
    _rewrite(path, _drop("rng"))
    _rewrite(previous_path(path), _set("model", "out.weight", torch.zeros(3, 3)))
    with pytest.raises(ValueError, match=r"entries \['rng'\] are missing; the previous checkpoint is "
                       r"unusable too: .*'out.weight' must have shape"):
        train(cfg, resume=True, progress=False)
    argv = ["train", "--resume", "--no-progress"] + [a for kv in _cli_args(cfg) for a in ("--set", kv)]
    assert cli.main(argv) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("psb-fast train: error: checkpoint")


def test_fallback_makes_the_previous_file_current(tmp_path):
    cfg = tiny(tmp_path / "run", ckpt_every=4)
    train(cfg, progress=False, stop_after=9)
    path = tmp_path / "run" / "checkpoint.pt"
    _rewrite(path, _drop("rng"))
    with pytest.warns(RuntimeWarning):
        train(cfg, resume=True, progress=False, stop_after=1)  # from step 8: saves step 9
    assert load_checkpoint(path, fallback=False)["step"] == 9
    assert load_checkpoint(previous_path(path), fallback=False)["step"] == 8  # the good one, kept


# --- 5: changes at resume are applied or refused ------------------------------------------------------

def test_changed_steps_at_resume_act_from_the_resumed_step(tmp_path):
    """Steps 1..7 use lr factors 0..6 (warmup, then the cosine at progress 0): the same for 8 or 10
    planned steps. Only a schedule recomputed at the resumed step makes the run planned with 8 steps
    and resumed with 10 follow the run planned with 10 from the start."""
    planned = tiny(tmp_path / "a", steps=10, warmup_steps=6, log_every=1)
    train(planned, progress=False, stop_after=7)
    a = train(planned, resume=True, progress=False)
    train(tiny(tmp_path / "b", steps=8, warmup_steps=6, log_every=1), progress=False, stop_after=7)
    b = train(tiny(tmp_path / "b", steps=10, warmup_steps=6, log_every=1), resume=True, progress=False)
    assert b["losses"] == a["losses"]
    assert [r["lr"] for r in records(tmp_path / "b") if "lr" in r][7:] == [
        r["lr"] for r in records(tmp_path / "a") if "lr" in r][7:]


def test_changed_lr_and_weight_decay_at_resume_are_used(tmp_path):
    cfg = tiny(tmp_path / "run", steps=6, warmup_steps=0, log_every=1)
    train(cfg, progress=False)
    resumed = tiny(tmp_path / "run", steps=10, warmup_steps=0, log_every=1, lr=0.5, weight_decay=0.3)
    train(resumed, resume=True, progress=False)
    lrs = [r["lr"] for r in records(tmp_path / "run") if "lr" in r]
    assert lrs[6:] == [0.5 * lr_factor(s, 0, 10) for s in range(7, 11)]
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    group = state["optimizer"]["param_groups"][0]
    assert (group["weight_decay"], group["initial_lr"], state["scheduler"]["base_lrs"]) == (0.3, 0.5, [0.5])
    assert state["config"]["lr"] == 0.5
    assert json.loads((tmp_path / "run" / "config.json").read_text())["weight_decay"] == 0.3
    resume = [r for r in records(tmp_path / "run") if r.get("event") == "resume"]
    assert resume[0]["changed"] == {"steps": [6, 10], "lr": [3e-3, 0.5], "weight_decay": [0.0, 0.3]}


def test_changing_a_fixed_key_at_resume_is_refused(tmp_path):
    cfg = tiny(tmp_path / "run")
    train(cfg, progress=False, stop_after=2)
    with pytest.raises(ValueError, match=r"config key\(s\) \['batch_size', 'seed'\] differ from the "
                       r"checkpoint's \(batch_size=32, seed=0\); a resume may change only steps, "):
        train(tiny(tmp_path / "run", seed=1, batch_size=64), resume=True, progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]["seed"] == 0


def test_resume_key_lists_are_complete_and_documented():
    assert set(RESUME_CHANGEABLE) | set(resume_fixed()) == set(field_names())
    assert not set(RESUME_CHANGEABLE) & set(resume_fixed())
    assert train_module.RESUME_FIXED == tuple(resume_fixed())
    for key in RESUME_CHANGEABLE:
        assert key in config.__doc__, key


# --- 6, 7: temporary files and metrics after a resume ---------------------------------------------------

def test_stale_temporaries_are_removed_at_start_and_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    gone = dead_pid()
    stale = [out / f"checkpoint.pt.tmp-{gone}", out / f"metrics.jsonl.tmp-{gone}",
             out / f"checkpoint.pt.tmp-{os.getpid()}"]
    kept = [out / f"checkpoint.pt.tmp-{os.getppid()}", out / "checkpoint.pt.tmp-notes", out / "other.tmp-1"]
    for p in stale + kept:
        p.write_bytes(b"partial")
    train(tiny(out), progress=False, stop_after=2)
    assert [p.exists() for p in stale + kept] == [False] * 3 + [True] * 3
    for p in stale:
        p.write_bytes(b"partial")
    train(tiny(out), resume=True, progress=False, stop_after=2)
    assert [p.exists() for p in stale + kept] == [False] * 3 + [True] * 3


def test_metrics_hold_one_record_per_step_after_a_crash(tmp_path):
    cfg = tiny(tmp_path / "run", ckpt_every=5, log_every=1)

    def crash(info):
        if info["step"] == 8:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        train(cfg, progress=False, callback=crash)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"time": 1, "step": 7, "lo')  # a record torn by a kill
    train(cfg, resume=True, progress=False)
    assert logged_steps(tmp_path / "run") == list(range(1, 13))
    resume = [r for r in records(tmp_path / "run") if r.get("event") == "resume"]
    assert resume[0]["step"] == 5 and resume[0]["dropped_records"] == 3


# --- 10, 11: out_dir, I/O failures, memory bound ---------------------------------------------------------

def test_batch_that_cannot_fit_fails_before_any_step(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda device: (10**6, "test memory"))
    steps = []
    with pytest.raises(ValueError, match=r"batch_size must be <= \d+ to fit in the 0.0 GiB of test memory "
                       r"\(~\d+ bytes per sample .*\), got 100000"):
        train(tiny(tmp_path / "run", batch_size=100_000), progress=False, callback=steps.append)
    assert steps == [] and not (tmp_path / "run").exists()
    train(tiny(tmp_path / "small", batch_size=8, steps=1), progress=False)  # 8 samples fit in 1 MB


def test_out_dir_that_is_a_file_is_bad_input(tmp_path):
    (tmp_path / "file").write_text("x")
    for out in ("file", "file/sub"):
        with pytest.raises(ValueError, match=f"out_dir must be a folder, got '{tmp_path / out}'"):
            train(tiny(tmp_path / out), progress=False)


FULL_DISK = """
import resource, signal, sys
from psb_fast import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, as on a full disk
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ (Linux)")
def test_disk_full_keeps_the_checkpoint_and_exits_4(tmp_path):
    """A real file-size limit (not a patched torch.save): torch.save reports the failed write as a
    RuntimeError ("unexpected pos"); the run exits 4 in one line naming the checkpoint and its
    errno, and the checkpoint of step 3 stays whole."""
    cfg = tiny(tmp_path / "run", steps=6)
    train(cfg, progress=False, stop_after=3)
    path = tmp_path / "run" / "checkpoint.pt"
    before = path.read_bytes()
    limit = len(before) // 2  # config.json and the metrics records stay far below it
    argv = ["train", "--resume", "--no-progress"] + [a for kv in _cli_args(cfg) for a in ("--set", kv)]
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(limit), *argv], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == cli.EXIT_IO, done.stderr
    err = done.stderr
    assert err.count("\n") == 1 and err.startswith("psb-fast train: I/O error: [Errno 27] File too large: ")
    assert f"'{path}'" in err
    assert path.read_bytes() == before and not list(path.parent.glob("*.tmp-*"))
    assert load_checkpoint(path, fallback=False)["step"] == 3


def read_only_is_enforced(folder: Path) -> bool:
    """Whether this process cannot write in a folder without write permission (not so for root)."""
    probe = folder / "probe"
    probe.mkdir()
    os.chmod(probe, 0o555)
    try:
        (probe / "file").touch()
    except PermissionError:
        return True
    finally:
        os.chmod(probe, 0o755)
    return False


def test_read_only_out_dir_exits_4_naming_the_path(tmp_path, capsys):
    if sys.platform == "win32" or not read_only_is_enforced(tmp_path):
        pytest.skip("folder permissions are not enforced for this process (root)")
    cfg = tiny(tmp_path / "run", steps=6)
    train(cfg, progress=False, stop_after=3)
    path = tmp_path / "run" / "checkpoint.pt"
    before = path.read_bytes()
    os.chmod(path.parent, 0o555)
    try:
        argv = ["train", "--resume", "--no-progress"] + [a for kv in _cli_args(cfg) for a in ("--set", kv)]
        assert cli.main(argv) == cli.EXIT_IO
    finally:
        os.chmod(path.parent, 0o755)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "I/O error" in err and str(path.parent) in err
    assert path.read_bytes() == before


def test_internal_error_propagates_with_its_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(train_module, "train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["train", "--set", "device=cpu", "--no-progress"])


def test_exit_codes():
    assert (cli.EXIT_OK, cli.EXIT_BUG, cli.EXIT_BAD_INPUT, cli.EXIT_NONFINITE, cli.EXIT_IO) == (0, 1, 2, 3, 4)
    assert cli.EXIT_SIGNAL + signal.SIGINT == 130 and cli.EXIT_SIGNAL + signal.SIGTERM == 143


# --- the real CLI in a subprocess ---------------------------------------------------------------------------

SMALL = {"data": "gmm-grid", "model": "mlp", "model_kwargs.hidden": 32, "model_kwargs.depth": 1,
         "batch_size": 64, "eval_samples": 0, "device": "cpu"}


def _cli_args(cfg: TrainConfig) -> list[str]:
    """cfg as `--set` values."""
    def text(value: object) -> str:
        if isinstance(value, dict):
            return json.dumps(value)
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    return [f"{k}={text(v)}" for k, v in config.config_to_dict(cfg).items()]


def psb_train(cwd: Path, *extra: str, **settings) -> subprocess.Popen:
    argv = [sys.executable, "-m", "psb_fast.cli", "train", "--no-progress", *extra]
    for key, value in {**SMALL, **settings}.items():
        argv += ["--set", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for_step(proc: subprocess.Popen, out_dir: Path, step: int, timeout: float = 120) -> None:
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(r.get("step", 0) >= step and "loss" in r for r in records(out_dir)):
            return
        time.sleep(0.1)
    raise AssertionError(f"training did not reach step {step} (exit code {proc.poll()})")


posix = pytest.mark.skipif(sys.platform != "linux", reason="sends POSIX signals to the CLI")


@posix
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_cli_signal_writes_the_checkpoint_and_exits_128_plus_signal(tmp_path, sig):
    proc = psb_train(tmp_path, out_dir="run", steps=10**6, log_every=1)
    try:
        wait_for_step(proc, tmp_path / "run", 2)
        proc.send_signal(sig)
        code, out, err = finish(proc)
    finally:
        proc.kill()
    assert code == 128 + sig, err
    summary = json.loads(out)
    assert summary["stopped"] == signal.Signals(sig).name
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt", fallback=False)["step"] == summary["step"]


def test_a_network_that_cannot_fit_fails_before_it_is_allocated(tmp_path):
    """D15: model_kwargs within the config bounds but for a network of ~2.8e11 parameters (about
    5 TiB with gradients, AdamW state and EMA): refused from its meta-device shapes, one line."""
    steps = []
    cfg = tiny(tmp_path / "run", model_kwargs={"hidden": 65536, "depth": 32})
    with pytest.raises(ValueError, match=r"model_kwargs make a network of \d{3},\d{3},\d{3},\d{3} parameters "
                                         r"that needs ~\d+\.\d GiB .* choose a smaller network"):
        train(cfg, progress=False, callback=steps.append)
    assert steps == [] and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_diverging_run_exits_3_and_keeps_no_nonfinite_checkpoint(tmp_path):
    code, _, err = finish(psb_train(tmp_path, out_dir="nf", seed=123, warmup_steps=10, lr=1e6, ckpt_every=3,
                                    log_every=1, steps=2000))
    assert code == cli.EXIT_NONFINITE, err
    assert err.count("\n") == 1 and err.startswith("psb-fast train: stopped: ")
    assert "no good checkpoint exists" in err or "(step " in err
    for path in (tmp_path / "nf").glob("checkpoint.pt*"):
        assert finite(load_checkpoint(path, fallback=False)), path


@pytest.mark.parametrize("settings, message", [
    ({"steps": -3}, "steps must be >= 1, got -3"),
    ({"out_dir": "afile"}, "out_dir must be a folder, got 'afile', which is an existing file"),
    ({"batch_size": 10**12}, "batch_size must be <= "),
])
@pytest.mark.slow
def test_cli_bad_input_exits_2_in_one_line(tmp_path, settings, message):
    (tmp_path / "afile").write_text("x")
    code, _, err = finish(psb_train(tmp_path, **{"out_dir": "run", **settings}), timeout=120)
    assert code == cli.EXIT_BAD_INPUT, err
    assert err.count("\n") == 1 and err.startswith("psb-fast train: error: ") and message in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_io_failure_exits_4_naming_the_path(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").mkdir()  # cannot be opened as a file
    code, _, err = finish(psb_train(tmp_path, out_dir="run", steps=3, warmup_steps=1))
    assert code == cli.EXIT_IO, err
    assert err.count("\n") == 1 and err.startswith("psb-fast train: I/O error: ") and "metrics.jsonl" in err


@posix
@pytest.mark.slow
def test_cli_kill_9_resume_repeats_the_uninterrupted_losses(tmp_path):
    """kill -9 at a random moment, resume: one record per step, every logged loss bit-identical."""
    steps = dict(steps=400, log_every=1, ckpt_every=25, warmup_steps=10)
    full = psb_train(tmp_path, out_dir="full", **steps)
    killed = psb_train(tmp_path, out_dir="run", **steps)
    try:
        wait_for_step(killed, tmp_path / "run", 60)
        time.sleep(float(torch.rand(1)) * 0.5)
        killed.kill()
        killed.wait()
    finally:
        killed.kill()
    assert finish(full)[0] == 0
    code, _, err = finish(psb_train(tmp_path, "--resume", out_dir="run", **steps))
    assert code == 0, err
    assert logged_steps(tmp_path / "run") == list(range(1, 401))
    losses = {r["step"]: r["loss"] for r in records(tmp_path / "run") if "loss" in r}
    assert losses == {r["step"]: r["loss"] for r in records(tmp_path / "full") if "loss" in r}
