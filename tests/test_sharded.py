"""Sampling at scale: chunks with per-sample seeds, resumable shards, two gloo ranks = one process;
what pins a run (model weights, sampler setting, guide, label, seed), the folder lock, atomic
samples.npz, finite shards, one stroke row per sample."""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import psb_fast
from psb_fast.guidance import StrokeGuide
from psb_fast.locks import FolderLocked
from psb_fast.oracles import mixture_2d_grid
from psb_fast.sharded import ShardPlan, merge_shards, prior_rows, sample_sharded, save_samples, shard_path

torch.set_num_threads(1)
BRIDGE = psb_fast.PhaseBridge()
CPU = torch.device("cpu")
ORACLE = "mixture_2d_grid"  # model_id of the closed-form model (a callable without weights)


def _setup(n: int = 25, chunk: int = 10, solver: str = "ode"):
    sampler = psb_fast.PhaseSampler(BRIDGE, 5, solver=solver, backend="cpu")
    plan = ShardPlan(n=n, chunk=chunk, seed=7, x_shape=(2,))
    return mixture_2d_grid().as_model(BRIDGE), sampler, plan


def _run(model, sampler, plan, out, **kwargs):
    kwargs.setdefault("model_id", None if isinstance(model, nn.Module) else ORACLE)
    return sample_sharded(model, sampler, plan, out, device=CPU, progress=False, **kwargs)[0]


class Counting:
    def __init__(self, model):
        self.model, self.rows = model, 0

    def __call__(self, m, t):
        self.rows += m.shape[0]
        return self.model(m, t)


class Tiny(nn.Module):
    """A network on 2-D points: F = W x (an nn.Module, so its weights identify it)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(2, 2)

    def forward(self, m, t):
        return self.lin(m[:, :2])


def test_prior_rows_do_not_depend_on_the_batch():
    whole = prior_rows(BRIDGE, (2,), 3, range(0, 12))
    assert torch.equal(torch.cat([prior_rows(BRIDGE, (2,), 3, range(0, 5)),
                                  prior_rows(BRIDGE, (2,), 3, range(5, 12))]), whole)
    assert not torch.equal(prior_rows(BRIDGE, (2,), 4, range(0, 12)), whole)


def test_one_process_run_matches_direct_sampling_and_resumes(tmp_path):
    model, sampler, plan = _setup()
    x1 = _run(model, sampler, plan, tmp_path)
    assert x1.shape == (25, 2) and x1.dtype == np.float32 and np.isfinite(x1).all()
    direct = sampler.sample(model, prior_rows(BRIDGE, (2,), 7, range(10, 20)))
    assert np.array_equal(x1[10:20], direct.numpy())
    # an interrupted run: chunk 1 lost, a stale temporary file left; only chunk 1 is sampled again
    shard_path(tmp_path, 1).unlink()
    (tmp_path / "shards" / "chunk-000001.npz.tmp-123").write_bytes(b"partial")
    counting = Counting(model)
    again = _run(counting, sampler, plan, tmp_path)
    assert np.array_equal(again, x1) and counting.rows == 10 * sampler.nfe
    assert not list((tmp_path / "shards").glob("*.tmp-*"))
    # a truncated shard counts as missing
    shard_path(tmp_path, 2).write_bytes(b"PK\x03\x04 truncated")
    again = _run(model, sampler, plan, tmp_path)
    assert np.array_equal(again, x1)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir())[-1] == "plan.json"  # lock released


def test_a_shard_holding_nan_is_sampled_again_not_merged(tmp_path):
    model, sampler, plan = _setup()
    x1 = _run(model, sampler, plan, tmp_path)
    bad = x1[10:20].copy()
    bad[3, 1] = np.nan
    np.savez(shard_path(tmp_path, 1), x1=bad, chunk=np.int64(1))
    message = r"lacks 1 of 3 chunks \(first: 1; missing, unreadable or non-finite"
    with pytest.raises(ValueError, match=message):
        merge_shards(tmp_path, plan)
    counting = Counting(model)
    again = _run(counting, sampler, plan, tmp_path)
    assert np.array_equal(again, x1) and counting.rows == 10 * sampler.nfe


def test_another_seed_into_the_same_folder_is_refused(tmp_path):
    model, sampler, plan = _setup()
    _run(model, sampler, plan, tmp_path)
    plan_json = (tmp_path / "shards" / "plan.json").read_text()
    other = ShardPlan(n=25, chunk=10, seed=8, x_shape=(2,))
    with pytest.raises(ValueError, match=r"holds shards of another run \(differs in seed\)"):
        _run(model, sampler, other, tmp_path)
    assert (tmp_path / "shards" / "plan.json").read_text() == plan_json
    assert json.loads(plan_json)["n"] == 25


def _guide(stroke, mode="dyn-v", strength=None):
    return StrokeGuide(torch.as_tensor(stroke, dtype=torch.float32), mode=mode, strength=strength)


@pytest.mark.parametrize("first, second, differs", [  # D1: the guide is pinned
    ({"guide": _guide([1.0, 2.0])}, {"guide": _guide([1.0, 2.5])}, "guide.stroke"),
    ({"guide": _guide([1.0, 2.0])}, {"guide": _guide([1.0, 2.0], mode="inpaint")}, "guide.mode"),
    ({"guide": _guide([1.0, 2.0], strength=0.2)}, {"guide": _guide([1.0, 2.0], strength=0.6)},
     "guide.strength"),
    ({"guide": _guide([1.0, 2.0])}, {}, "guide"),
    ({"cond_label": None}, {"cond_label": 3, "model_id": "labelled"}, "model, label"),
])
def test_another_guide_or_label_is_refused_naming_it(tmp_path, first, second, differs):
    model, sampler, plan = _setup(n=20)
    _run(model, sampler, plan, tmp_path, **first)
    with pytest.raises(ValueError, match=rf"another run \(differs in {differs}\); use another --out"):
        _run(model, sampler, plan, tmp_path, **second)


def test_grids_that_differ_only_in_their_times_are_refused(tmp_path):  # D2: same repr, other grid
    model, _, plan = _setup(n=20)
    a = psb_fast.PhaseSampler(BRIDGE, 5, grid=[1e-5, 0.2, 0.5, 0.8, 0.99], order=2, backend="cpu")
    b = psb_fast.PhaseSampler(BRIDGE, 5, grid=[1e-5, 0.3, 0.5, 0.8, 0.99], order=2, backend="cpu")
    assert repr(a) == repr(b)
    _run(model, a, plan, tmp_path)
    with pytest.raises(ValueError, match=r"differs in sampler.grid\)"):
        _run(model, b, plan, tmp_path)
    c = psb_fast.PhaseSampler(BRIDGE, 5, grid=[1e-5, 0.2, 0.5, 0.8, 0.99], order=2, backend="cpu",
                              variant="data-corrector")
    with pytest.raises(ValueError, match=r"differs in sampler.variant\)"):
        _run(model, c, plan, tmp_path)


def test_other_weights_are_refused_and_the_same_weights_resume(tmp_path):  # D3: a model at the same step
    _, sampler, plan = _setup(n=20)
    x1 = _run(Tiny(0), sampler, plan, tmp_path)
    shard_path(tmp_path, 1).unlink()
    assert np.array_equal(_run(Tiny(0), sampler, plan, tmp_path), x1)  # equal weights: the same run
    with pytest.raises(ValueError, match=r"differs in model\)"):
        _run(Tiny(1), sampler, plan, tmp_path)
    with pytest.raises(TypeError, match="model must be an nn.Module .* or pass model_id"):
        sample_sharded(mixture_2d_grid().as_model(BRIDGE), sampler, plan, tmp_path / "x", device=CPU)


def test_a_stroke_needs_one_row_per_sample_or_one_for_all(tmp_path):  # D7
    model, sampler, plan = _setup(n=20, chunk=10)
    rows = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"stroke must have shape \[2\] .* or \[20, 2\] .*got \[10, 2\]"):
        _run(model, sampler, plan, tmp_path / "a", guide=_guide(rows))
    assert not (tmp_path / "a").exists()
    strokes = torch.randn(20, 2, generator=torch.Generator().manual_seed(1))
    x1 = _run(model, sampler, plan, tmp_path / "b", guide=_guide(strokes))
    m0 = prior_rows(BRIDGE, (2,), 7, range(10, 20))
    seed = psb_fast.seeds.derive_seed(7, "noise", 1)
    direct = sampler.sample(model, m0, seed=seed, guide=_guide(strokes[10:20]))
    assert np.array_equal(x1[10:20], direct.numpy())
    wrong = sampler.sample(model, m0, seed=seed, guide=_guide(strokes[:10]))
    assert not np.array_equal(x1[10:20], wrong.numpy())


def test_an_unreadable_plan_is_one_line(tmp_path):  # D14
    model, sampler, plan = _setup()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "plan.json").write_text("[" * 100_000 + "]" * 100_000)
    message = r"shard plan '.*plan.json' nests deeper .*; remove .* to start over"
    with pytest.raises(ValueError, match=message):
        _run(model, sampler, plan, tmp_path)


def test_old_plan_fields_warn_and_name_the_new_way():
    message = r"ShardPlan\(sampler=..., checkpoint_step=...\) is no longer used"
    with pytest.warns(DeprecationWarning, match=message):
        ShardPlan(n=4, chunk=2, seed=0, x_shape=(2,), sampler="PhaseSampler(...)", checkpoint_step=3)


def test_sde_noise_is_seeded_per_chunk(tmp_path):
    bridge = psb_fast.PhaseBridge(mode="SDE")
    sampler = psb_fast.PhaseSampler(bridge, 5, solver="sde", backend="cpu")
    plan = ShardPlan(n=20, chunk=10, seed=1, x_shape=(2,))
    model = mixture_2d_grid().as_model(bridge)
    a = _run(model, sampler, plan, tmp_path / "a")
    b = _run(model, sampler, plan, tmp_path / "b")
    assert np.array_equal(a, b) and not np.array_equal(a[:10], a[10:])


# --- D4: one run per folder, a real second process, kill -9 ------------------------------------------

class Stalling:
    """The oracle model that, after `after` rows, writes `marker` and then sleeps (to be killed)."""

    def __init__(self, marker: Path, after: int):
        self.model, self.marker, self.after, self.rows = mixture_2d_grid().as_model(BRIDGE), marker, after, 0

    def __call__(self, m, t):
        self.rows += m.shape[0]
        if self.rows > self.after:
            self.marker.write_text("stalled")
            time.sleep(600)
        return self.model(m, t)


def _stalled_run(out: Path, marker: Path) -> None:
    _, sampler, plan = _setup(n=40, chunk=10)
    _run(Stalling(marker, after=2 * 10 * sampler.nfe), sampler, plan, out)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="forks the holder (Linux)")
def test_a_second_run_is_refused_while_one_runs_and_kill_9_frees_the_folder(tmp_path):
    marker = tmp_path / "stalled"
    holder = multiprocessing.get_context("fork").Process(target=_stalled_run, args=(tmp_path / "out", marker))
    holder.start()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and holder.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the holder never reached its third chunk"
        model, sampler, plan = _setup(n=40, chunk=10)
        message = "'.*shards' is in use: another process holds its sharded sampling lock"
        with pytest.raises(FolderLocked, match=message):
            _run(model, sampler, plan, tmp_path / "out")
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=60)
        assert sorted(p.name for p in (tmp_path / "out" / "shards").glob("chunk-*")) == [
            "chunk-000000.npz", "chunk-000001.npz"]
        counting = Counting(model)
        resumed = _run(counting, sampler, plan, tmp_path / "out")  # no stale lock after kill -9
        assert counting.rows == 2 * 10 * sampler.nfe
        assert np.array_equal(resumed, _run(model, sampler, plan, tmp_path / "fresh"))
    finally:
        if holder.is_alive():
            holder.kill()
        holder.join()


# --- D5: samples.npz atomic under a real file-size limit ---------------------------------------------

FSIZE = """
import resource, signal, sys
import numpy as np
from psb_fast.sharded import save_samples
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    save_samples(sys.argv[1], x1=np.ones((100_000, 2), np.float32), nfe=10)
except OSError as err:
    print("OSError:", err)
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ (Linux)")
def test_samples_npz_survives_a_full_disk(tmp_path):
    path = tmp_path / "samples.npz"
    save_samples(path, x1=np.zeros((4, 2), np.float32), nfe=5)
    before = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(FSIZE), str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OSError: [Errno 27] File too large") and str(path) in done.stdout
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["samples.npz"]


# --- two gloo ranks -----------------------------------------------------------------------------------

def _rank_main(rank: int, port: int, out: Path) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo")
        model, sampler, plan = _setup(n=45, chunk=10)
        x1, _ = sample_sharded(model, sampler, plan, out, device=CPU, progress=rank == 0,
                               rank=rank, world_size=2, model_id=ORACLE)
        if rank == 0:
            np.save(out / "merged.npy", x1)
        torch.distributed.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.mark.skipif(sys.platform != "linux", reason="forks the two ranks (Linux)")
@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    ranks = [ctx.Process(target=_rank_main, args=(r, port, tmp_path / "ddp")) for r in (0, 1)]
    (tmp_path / "ddp").mkdir()
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=120)
    errors = "".join(f.read_text() for f in (tmp_path / "ddp").glob("rank*.err"))
    assert [p.exitcode for p in ranks] == [0, 0], errors
    model, sampler, plan = _setup(n=45, chunk=10)
    single = _run(model, sampler, plan, tmp_path / "one")
    assert np.array_equal(np.load(tmp_path / "ddp" / "merged.npy"), single)
