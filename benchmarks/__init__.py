"""Benchmark scripts, run as ``python benchmarks/<name>.py``; :mod:`benchmarks.harness` holds
what they share (timing, tables, the result JSON, MLflow logging). Results land in
``benchmarks/results/`` and are discussed in ``docs/benchmarks.md``."""
