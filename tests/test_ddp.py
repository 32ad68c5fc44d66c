"""Two gloo ranks on the CPU: identical weights, different data, resume across ranks.

Each rank is a forked process given torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so train() finds and starts the process group itself, as under torchrun.
"""

import multiprocessing
import os
import socket
import sys
import traceback
from pathlib import Path

import pytest
import torch

from psb_fast.config import TrainConfig
from psb_fast.train import train


def ddp_config(out_dir: Path) -> TrainConfig:
    return TrainConfig(data="gmm-grid", model="mlp", model_kwargs={"hidden": 16, "depth": 1, "time_dim": 8},
                       batch_size=32, steps=4, warmup_steps=1, lr=3e-3, log_every=2, ckpt_every=0,
                       eval_samples=0, device="cpu", out_dir=str(out_dir))


def worker(out: Path) -> None:
    """One rank: an uninterrupted run, then the same run stopped after 2 steps and resumed."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    seen: list[torch.Tensor] = []
    full = train(ddp_config(out / "full"), progress=False,
                 callback=lambda info: seen.append(info["x1"].clone()))
    cfg = ddp_config(out / "split")
    first = train(cfg, progress=False, stop_after=2)
    rest = train(cfg, resume=True, progress=False)
    torch.save({
        "world_size": full["world_size"], "weights": full["model"].state_dict(),
        "ema": full["ema"].state_dict(),
        "resumed": rest["model"].state_dict(), "x1": torch.cat(seen), "losses": full["losses"],
        "resumed_losses": first["losses"] + rest["losses"], "resume_start": rest["start_step"],
    }, out / f"rank{rank}.pt")


def _rank_main(rank: int, port: int, out: Path) -> None:
    """A forked rank: torchrun's environment variables, then the worker; errors go to a file."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        worker(out)
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform != "linux", reason="forks the two ranks (Linux)")
@pytest.mark.slow
def test_two_gloo_ranks(tmp_path):
    ctx = multiprocessing.get_context("fork")  # no re-import of torch per rank
    port = _free_port()
    ranks = [ctx.Process(target=_rank_main, args=(r, port, tmp_path)) for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=240)
    hung = [p for p in ranks if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    errors = "".join(f.read_text() for f in tmp_path.glob("rank*.err"))
    codes = [p.exitcode for p in ranks]
    assert not hung and codes == [0, 0], errors or f"exit codes {codes}"
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    for key in ("weights", "ema", "resumed"):
        for name, value in r0[key].items():
            assert torch.equal(value, r1[key][name]), (key, name)
    for name, value in r0["weights"].items():
        assert torch.equal(value, r0["resumed"][name]), name
    assert r0["x1"].shape == (4 * 16, 2)  # 4 steps of the per-rank half of the global batch
    assert not torch.equal(r0["x1"], r1["x1"])
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 4
    assert r0["resume_start"] == 2 and r0["resumed_losses"] == r0["losses"]
    assert (tmp_path / "split" / "checkpoint.pt").is_file()
