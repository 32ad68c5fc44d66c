"""The fused ops, each checked once and dispatched by backend ("triton", "cpu", "float64", "auto").

One module per op, named like its kernel (`psb_fast.kernels.<op>`), its oracle
(`psb_fast.reference.<op>`, reference/), its tests (tests/test_<op>.py) and its benchmark
(benchmarks/bench_<op>.py):

- `bridge_sample`: the training data path, data x1 at times t -> (m_t, label) (docs/math.md §5.1);
- `phase_step`: the multistep ODE update of m = [x | v] in place (`phase_step`, §7) and the
  sampling hop (`phase_hop`, §8), with their unchecked entry points for the sampler loop;
- `sde_step`: one stochastic step of m in place (exact noise, Euler-Maruyama, compat SSCS half
  step; §9) and its float64 scalars (`SDEScalars`, noise covariances and Cholesky factors);
- `float64`: the "float64" backend, the ops' element math in plain float64 PyTorch (not the
  test oracle);
- `_common`: shared by `phase_step` and `sde_step`: argument checks, the in-place CPU path and
  the write-back into m.

The public ops are exported by `psb_fast` (`from psb_fast import bridge_sample, phase_step, ...`);
nothing is re-exported here.
"""
