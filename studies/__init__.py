"""The studies behind the package defaults and the trained-model checks (not installed).

Run them from the repository root as modules, e.g. `python -m studies.defaults_study search`;
they import psb_fast, the benchmark suite's problems (`benchmarks.problems`) and each other
(`from studies import trained_models`). `python -m studies.make_defaults` writes
psb_fast/defaults.json from the defaults study's results (benchmarks/results/defaults_study/).
"""
