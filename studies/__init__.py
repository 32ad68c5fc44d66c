"""The tuning and evaluation studies behind the package defaults (not installed with the package).

Run them from the repository root as modules, e.g. `python -m studies.tuning_study`; they import
psb_fast and each other (`from studies import tuning_study`). `python -m studies.make_defaults`
writes psb_fast/defaults.json from their results (benchmarks/results/).
"""
