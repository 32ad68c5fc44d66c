"""Benchmark workloads (installed as psb_fast.benchmarks): kernel suites, sampler and training
throughput, NFE-vs-quality against peer samplers; `psb-fast bench` runs them."""
