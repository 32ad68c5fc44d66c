"""Sampling at scale: chunks with per-sample seeds, resumable shards, two gloo ranks = one process."""

import json
import multiprocessing
import os
import socket
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

import psb_fast
from psb_fast.oracles import mixture_2d_grid
from psb_fast.sharded import ShardPlan, prior_rows, sample_sharded, shard_path

torch.set_num_threads(1)
BRIDGE = psb_fast.PhaseBridge()


def _setup(n: int = 25, chunk: int = 10, solver: str = "ode"):
    sampler = psb_fast.PhaseSampler(BRIDGE, 5, solver=solver, backend="cpu")
    plan = ShardPlan(n=n, chunk=chunk, seed=7, x_shape=(2,), sampler=repr(sampler), label=None,
                     checkpoint_step=0)
    return mixture_2d_grid().as_model(BRIDGE), sampler, plan


class Counting:
    def __init__(self, model):
        self.model, self.rows = model, 0

    def __call__(self, m, t):
        self.rows += m.shape[0]
        return self.model(m, t)


def test_prior_rows_do_not_depend_on_the_batch():
    whole = prior_rows(BRIDGE, (2,), 3, range(0, 12))
    assert torch.equal(torch.cat([prior_rows(BRIDGE, (2,), 3, range(0, 5)),
                                  prior_rows(BRIDGE, (2,), 3, range(5, 12))]), whole)
    assert not torch.equal(prior_rows(BRIDGE, (2,), 4, range(0, 12)), whole)


def test_one_process_run_matches_direct_sampling_and_resumes(tmp_path):
    model, sampler, plan = _setup()
    x1, _ = sample_sharded(model, sampler, plan, tmp_path, device=torch.device("cpu"), progress=False)
    assert x1.shape == (25, 2) and x1.dtype == np.float32 and np.isfinite(x1).all()
    direct = sampler.sample(model, prior_rows(BRIDGE, (2,), 7, range(10, 20)))
    assert np.array_equal(x1[10:20], direct.numpy())
    # an interrupted run: chunk 1 lost, a stale temporary file left; only chunk 1 is sampled again
    shard_path(tmp_path, 1).unlink()
    (tmp_path / "shards" / "chunk-000001.npz.tmp-123").write_bytes(b"partial")
    counting = Counting(model)
    again, _ = sample_sharded(counting, sampler, plan, tmp_path, device=torch.device("cpu"), progress=False)
    assert np.array_equal(again, x1) and counting.rows == 10 * sampler.nfe
    assert not list((tmp_path / "shards").glob("*.tmp-*"))
    # a truncated shard counts as missing
    shard_path(tmp_path, 2).write_bytes(b"PK\x03\x04 truncated")
    again, _ = sample_sharded(model, sampler, plan, tmp_path, device=torch.device("cpu"), progress=False)
    assert np.array_equal(again, x1)


def test_another_run_into_the_same_folder_is_refused(tmp_path):
    model, sampler, plan = _setup()
    sample_sharded(model, sampler, plan, tmp_path, device=torch.device("cpu"), progress=False)
    plan_json = (tmp_path / "shards" / "plan.json").read_text()
    other = ShardPlan(**{**plan.__dict__, "seed": 8})
    with pytest.raises(ValueError, match="seed"):
        sample_sharded(model, sampler, other, tmp_path, device=torch.device("cpu"), progress=False)
    assert (tmp_path / "shards" / "plan.json").read_text() == plan_json
    assert json.loads(plan_json)["n"] == 25


def test_sde_noise_is_seeded_per_chunk(tmp_path):
    bridge = psb_fast.PhaseBridge(mode="SDE")
    sampler = psb_fast.PhaseSampler(bridge, 5, solver="sde", backend="cpu")
    plan = ShardPlan(n=20, chunk=10, seed=1, x_shape=(2,), sampler=repr(sampler), label=None,
                     checkpoint_step=0)
    model = mixture_2d_grid().as_model(bridge)
    a, _ = sample_sharded(model, sampler, plan, tmp_path / "a", device=torch.device("cpu"), progress=False)
    b, _ = sample_sharded(model, sampler, plan, tmp_path / "b", device=torch.device("cpu"), progress=False)
    assert np.array_equal(a, b) and not np.array_equal(a[:10], a[10:])


def _rank_main(rank: int, port: int, out: Path) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo")
        model, sampler, plan = _setup(n=45, chunk=10)
        x1, _ = sample_sharded(model, sampler, plan, out, device=torch.device("cpu"), progress=rank == 0,
                               rank=rank, world_size=2)
        if rank == 0:
            np.save(out / "merged.npy", x1)
        torch.distributed.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.mark.skipif(sys.platform != "linux", reason="forks the two ranks (Linux)")
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
    single, _ = sample_sharded(model, sampler, plan, tmp_path / "one", device=torch.device("cpu"),
                               progress=False)
    assert np.array_equal(np.load(tmp_path / "ddp" / "merged.npy"), single)
