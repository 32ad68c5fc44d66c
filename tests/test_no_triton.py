"""Without Triton: `import psb_fast` and every CPU feature work, and the triton backend says why not.

A fresh interpreter has `triton` and `psb_fast.kernels` blocked before torch is imported (as if
Triton were not installed), then runs the CPU paths: PhaseBridge,
bridge_sample / phase_step / phase_hop / sde_step on the "cpu" and "float64" backends, a
PhaseSampler sample (ODE and SDE), a 2-step training run, and the CLI's --help. Finally
backend="triton" (under TRITON_INTERPRET=1, where it would otherwise run on CPU tensors) must
raise an ImportError naming the backend, and nothing may have imported triton or the kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    '''
    import contextlib, importlib.util, io, sys

    BLOCKED = ("triton", "psb_fast.kernels")

    # None in sys.modules is Python's own "not importable" mark: `import triton` (and of any
    # submodule) raises ModuleNotFoundError and importlib.util.find_spec("triton") returns None,
    # the two ways torch probes for Triton; a meta-path finder that raises would break the
    # find_spec probe instead of answering it.
    for name in BLOCKED:
        sys.modules[name] = None

    import torch

    assert importlib.util.find_spec("triton") is None
    try:  # torch's own probe (private; where this torch has it), run before psb_fast
        from torch.utils._triton import has_triton, has_triton_package
    except ImportError:
        pass
    else:
        assert not has_triton_package() and not has_triton()
    import psb_fast
    from psb_fast import PhaseBridge, PhaseSampler, bridge_sample, phase_hop, phase_step, sde_step
    from psb_fast.config import TrainConfig
    from psb_fast.oracles import mixture_2d_grid
    from psb_fast.train import train

    torch.manual_seed(0)
    for mode in ("probODE", "SDE"):
        bridge = PhaseBridge(mode=mode)
        x1 = torch.randn(4, 3, 5)
        t = torch.rand(4, dtype=torch.float64) * 0.9
        m = bridge.sample_prior((4, 3, 5), dtype=torch.float32)
        F = torch.randn(4, 3, 5)
        for backend in ("cpu", "float64", "auto"):
            m_t, label = bridge_sample(bridge, x1, t, seed=1, backend=backend)
            assert m_t.shape == (4, 6, 5) and torch.isfinite(label).all()
            phase_step(m.clone(), [F, F], 0.01, [0.001, 0.0005], [0.1, 0.05], backend=backend)
            assert torch.isfinite(phase_hop(bridge, m, F, 0.7, backend=backend)).all()
            for kind in ("exact", "em"):
                sde_step(kind, m.clone(), F, bridge, 0.3, 0.05, seed=2, backend=backend)
            sde_step("sscs_half", m.clone(), None, bridge, 0.3, 0.05, seed=2, backend=backend)

    mix = mixture_2d_grid()
    for mode, solver in (("probODE", "ode"), ("SDE", "sde")):
        bridge = PhaseBridge(mode=mode)
        m0 = bridge.sample_prior((16, 2), generator=torch.Generator().manual_seed(0))
        for backend in ("cpu", "float64"):
            x = PhaseSampler(bridge, nfe=5, solver=solver, backend=backend).sample(
                mix.as_model(bridge), m0, seed=3)
            assert x.shape == (16, 2) and torch.isfinite(x).all()

    cfg = TrainConfig(data="gmm-grid", model="mlp", model_kwargs={"hidden": 16, "depth": 1, "time_dim": 8},
                      batch_size=32, steps=2, warmup_steps=1, log_every=1, ckpt_every=0, eval_samples=0,
                      device="cpu", out_dir=sys.argv[1])
    train(cfg, progress=False)

    from psb_fast.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["--help"])
    assert "usage" in out.getvalue().lower(), out.getvalue()

    try:
        bridge_sample(PhaseBridge(), torch.randn(2, 3), torch.zeros(2, dtype=torch.float64), backend="triton")
    except ImportError as exc:
        assert "backend='triton'" in str(exc) and "triton" in str(exc), exc
    else:
        raise AssertionError("backend='triton' without Triton did not raise")
    from psb_fast.backends import require_triton
    try:
        require_triton("auto")
    except ImportError as exc:
        assert "backend='auto'" in str(exc), exc
    else:
        raise AssertionError("backend='auto' on CUDA without Triton would not raise")

    loaded = sorted(n for n, module in sys.modules.items()
                    if module is not None and any(n == b or n.startswith(b + ".") for b in BLOCKED))
    assert not loaded, loaded
    print("NO-TRITON OK")
    '''
)


@pytest.mark.slow
def test_cpu_features_work_without_triton(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "NO-TRITON OK" in result.stdout
