"""Benchmarks: what each surgery costs against the plain-training baseline, measured in the same process.

`python -m benchmarks` runs them all; results in benchmarks/RESULTS.md.
Modules: measure (interleaved timing, peak memory, machine facts, profiles), removal_cost, export_cost,
mixer_cost, report (tables, JSON, PNG).
"""
