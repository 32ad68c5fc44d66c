"""The psb-fast CLI on tiny configs: train -> sample -> tune -> sample --tuned, demo, and bad input."""

import json

import numpy as np
import pytest
import torch

from psb_fast import PhaseSampler
from psb_fast.cli import main
from psb_fast.demo import run_demo
from psb_fast.pretrained import load_trained

torch.set_num_threads(1)
TINY = ["--set", "steps=4", "--set", "batch_size=32", "--set", "model=mlp", "--set", "eval_samples=0",
        "--set", "ckpt_every=0", "--set", "device=cpu", "--set", "warmup_steps=1", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--set", f"out_dir={out}", *TINY]) == 0
    return out


def test_train_writes_a_loadable_checkpoint(run_dir):
    trained = load_trained(run_dir)
    assert trained.step == 4 and trained.x_shape == (2,) and trained.num_classes is None
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "config.json").exists()
    assert not trained.model.training


def test_sample_writes_npz_and_png(run_dir, tmp_path, capsys):
    assert main(["sample", str(run_dir), "--nfe", "3", "-n", "16", "--out", str(tmp_path)]) == 0
    x1 = np.load(tmp_path / "samples.npz")["x1"]
    assert x1.shape == (16, 2) and np.isfinite(x1).all()
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PhaseSampler(nfe=3" in capsys.readouterr().err  # run messages: the psb_fast logger, stderr
    argv = ["sample", str(run_dir), "--nfe", "5", "-n", "16", "--T", "0.6", "--variant", "data-corrector",
            "--out", str(tmp_path / "v")]
    assert main(argv) == 0 and "variant='data-corrector'" in capsys.readouterr().err


@pytest.mark.slow
def test_tune_then_sample_with_the_tuned_settings(run_dir, tmp_path):
    path = tmp_path / "tuned.json"
    assert main(["tune", str(run_dir), "--nfe", "3", "4", "-n", "64", "--reference-nfe", "20",
                 "--T-values", "0.5", "0.7", "0.9", "--q-values", "1.5", "2", "--orders", "2", "3",
                 "--out", str(path)]) == 0
    trained = load_trained(run_dir)
    sampler = PhaseSampler.from_tuned(path, trained.bridge, 4)
    entry = json.loads(path.read_text())["settings"]["4"]
    assert sampler.nfe == 4 and 0 < sampler.T < 1 and sampler.variant == entry.get("variant", "multistep")
    out = tmp_path / "s"
    argv = ["sample", str(run_dir), "--nfe", "4", "-n", "8", "--tuned", str(path), "--out", str(out)]
    assert main(argv) == 0
    assert np.load(out / "samples.npz")["x1"].shape == (8, 2)


def test_stroke_guided_sampling_from_the_cli(run_dir, tmp_path):
    stroke = tmp_path / "stroke.npy"
    np.save(stroke, np.array([1.2, -1.0], dtype=np.float32))
    assert main(["sample", str(run_dir), "--nfe", "3", "-n", "8", "--stroke", str(stroke),
                 "--stroke-mode", "inpaint", "--out", str(tmp_path / "g")]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--set", "no_such_key=1"], "no_such_key"),
        (["train", "--set", "steps=-3"], "steps"),
        (["train", "--set", "data=mnist-please"], "mnist-please"),
        (["sample", "does/not/exist"], "does/not/exist"),
        (["sample", "RUN", "--label", "3"], "conditional"),
        (["sample", "RUN", "--stroke", "missing.npy"], "missing.npy"),
        (["tune", "RUN", "--nfe", "0"], "--nfe"),
    ],
)
def test_bad_input_exits_2_with_a_message(run_dir, tmp_path, capsys, argv, message):
    argv = [str(run_dir) if a == "RUN" else a for a in argv]
    if argv[0] == "train":
        argv += ["--set", f"out_dir={tmp_path / 'bad'}", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"psb-fast {argv[0]}: error:") and message in err
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_demo_trains_samples_and_reports(tmp_path):  # the grid search alone (learned: tests/test_demo.py)
    metrics = run_demo(tmp_path, steps=30, progress=False, samples=64, learn=False)
    assert {(r["nfe"], r["settings"]) for r in metrics["rows"]} == {
        (n, s) for n in (5, 10, 20) for s in ("defaults", "tuned", "published")}
    tuned = json.loads((tmp_path / "tuned.json").read_text())["settings"]
    assert sorted(tuned) == ["10", "20", "5"] and metrics["tune_seconds"] > 0
    for entry in tuned.values():  # the tune never picks worse than the published or default setting
        assert entry["rmse"] <= entry["published_rmse"] and entry["rmse"] <= entry["default_rmse"]
    for r in metrics["rows"]:
        assert r["rmse_vs_reference"] >= 0 and r["energy_distance_to_data"] >= 0 and r["sample_seconds"] > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["rows"] == metrics["rows"]
    for name in ("samples.png", "trajectories.png"):
        assert (tmp_path / name).stat().st_size > 1000
    again = run_demo(tmp_path, steps=30, progress=False, samples=64, learn=False)  # finished: no retraining
    assert again["train_seconds_this_call"] == 0.0 and again["rows"][0]["rmse_vs_reference"] == pytest.approx(
        metrics["rows"][0]["rmse_vs_reference"])
    with pytest.raises(ValueError, match="steps"):
        run_demo(tmp_path, steps=0)


def test_sample_in_shards_resumes_and_accepts_power_grids(run_dir, tmp_path, capsys):
    out = tmp_path / "big"
    argv = ["sample", str(run_dir), "--nfe", "3", "-n", "25", "--chunk", "10", "--grid", "power-1.5",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    first = np.load(out / "samples.npz")["x1"]
    assert first.shape == (25, 2) and sorted(p.name for p in (out / "shards").glob("chunk-*.npz")) == [
        "chunk-000000.npz", "chunk-000001.npz", "chunk-000002.npz"]
    (out / "shards" / "chunk-000001.npz").unlink()  # as if stopped before chunk 1 was written
    assert main(argv) == 0
    assert np.array_equal(np.load(out / "samples.npz")["x1"], first)
    # other settings into the same folder are refused, naming what differs
    assert main([*argv[:-2], "--seed", "3", "--out", str(out)]) == 2
    assert "seed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["sample", str(run_dir), "--grid", "power-x", "--out", str(tmp_path / "p")])
    assert stop.value.code == 2 and "power-<q>" in capsys.readouterr().err


def _cli_rank(rank: int, port: int, argv: list[str], errors) -> None:
    import os
    import traceback

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        code = main(argv)
    except BaseException:
        errors.write_text(traceback.format_exc())
        raise
    os._exit(code)


@pytest.mark.slow
def test_sample_under_two_gloo_ranks_equals_one_process(run_dir, tmp_path):
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["sample", str(run_dir), "--nfe", "3", "-n", "35", "--chunk", "10", "--no-progress", "--out"]
    ctx = multiprocessing.get_context("fork")
    ranks = [ctx.Process(target=_cli_rank, args=(r, port, [*argv, str(tmp_path / "two")], tmp_path / f"e{r}"))
             for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=120)
    errors = "".join(f.read_text() for f in tmp_path.glob("e*"))
    assert [p.exitcode for p in ranks] == [0, 0], errors
    assert main([*argv, str(tmp_path / "one")]) == 0
    two, one = (np.load(tmp_path / name / "samples.npz")["x1"] for name in ("two", "one"))
    assert two.shape == (35, 2) and np.array_equal(two, one)


def test_tune_without_refinement_runs_only_the_search_grid(run_dir, tmp_path):
    path = tmp_path / "coarse.json"
    assert main(["tune", str(run_dir), "--nfe", "3", "-n", "32", "--reference-nfe", "20", "--T-values", "0.5",
                 "0.7", "--q-values", "2", "--orders", "2", "--no-refine", "--out", str(path)]) == 0
    from psb_fast.tuning import load_tuned

    (entry,) = load_tuned(path).values()
    assert entry["T"] in (0.4, 0.5, 0.7) and entry["q"] == 2.0 and entry["order"] == 2  # 0.4: published


def test_help_shows_the_defaults_of_threads_label_and_stroke(capsys):
    for command in ("sample", "tune"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "else torch's default (default: 0)" in text and "--no-progress" in text
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: none, unconditional" in text and "default: none, no stroke guidance" in text
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    from psb_fast.demo import TUNE_SEED

    assert f"(default: {TUNE_SEED})" in " ".join(capsys.readouterr().out.split())


def test_sigterm_stop_says_so_on_stderr(tmp_path, capsys, monkeypatch):
    import os
    import signal

    import psb_fast.train

    real = psb_fast.train.train

    def train_then_term(cfg, **kwargs):
        def callback(info):
            if info["step"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(cfg, callback=callback, **kwargs)

    monkeypatch.setattr(psb_fast.train, "train", train_then_term)
    argv = ["train", "--set", f"out_dir={tmp_path}", *TINY]
    assert main(argv) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped by SIGTERM at step" in err[0] and "checkpoint.pt" in err[0], err


@pytest.mark.parametrize("command", ["train", "sample"])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(run_dir, tmp_path, capsys, monkeypatch, command):
    import psb_fast.pretrained
    import psb_fast.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(psb_fast.train, "load_data", interrupted)  # train's data load
    monkeypatch.setattr(psb_fast.pretrained, "load_checkpoint", interrupted)  # sample's model load
    argv = (["train", "--set", f"out_dir={tmp_path / 'out'}", *TINY] if command == "train"
            else ["sample", str(run_dir), "--nfe", "3", "-n", "4", "--out", str(tmp_path / "s")])
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"psb-fast {command}: interrupted (SIGINT)"), err


def test_train_warns_in_one_line_when_warmup_outlasts_the_run(tmp_path, capsys):
    argv = ["train", "--set", f"out_dir={tmp_path}", *TINY, "--set", "warmup_steps=10"]
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warmup_steps" in line]
    assert lines == ["warmup_steps 10 >= steps 4: the learning rate never reaches lr (it warms up linearly "
                     "over warmup_steps); set warmup_steps below steps"]


def test_tune_accepts_no_progress(run_dir, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["tune", str(run_dir), "--nfe", "3", "-n", "16", "--reference-nfe", "8", "--T-values", "0.6",
                 "--orders", "1", "--no-refine", "--no-progress", "--out", str(out)]) == 0
    assert out.exists() and "candidate" not in capsys.readouterr().err  # no bar


_BLOCKER = """
import sys
for name in {blocked!r}:  # as if not installed: import raises ModuleNotFoundError, find_spec gives None
    sys.modules[name] = None
"""


@pytest.mark.slow
def test_bench_imports_on_the_base_install_without_pytest():
    import subprocess
    import sys
    import textwrap

    blocked = ("pytest", "_pytest", "scipy", "diffusers", "k_diffusion")
    script = _BLOCKER.format(blocked=blocked) + textwrap.dedent("""
        from psb_fast.benchmarks import suite
        from psb_fast.benchmarks.suite import SuiteContext, _run_part
        suite.PARTS["quality"] = lambda ctx: __import__("scipy")
        entry = _run_part("quality", SuiteContext(True, None, "cpu", False))
        assert entry["status"] == "error" and "psb_fast[bench]" in entry["error"], entry
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
def test_demo_runs_on_the_base_install(tmp_path):
    """Nothing of the dev or bench extras (nor Triton) is needed by the demo."""
    import subprocess
    import sys

    blocked = ("pytest", "_pytest", "scipy", "diffusers", "k_diffusion", "hypothesis", "ot", "triton")
    script = _BLOCKER.format(blocked=blocked) + (
        "from pathlib import Path\nfrom psb_fast.demo import run_demo\n"
        f"run_demo(Path({str(tmp_path)!r}), steps=20, progress=False, samples=64)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "samples.png").exists() and (tmp_path / "tuned.json").exists()
