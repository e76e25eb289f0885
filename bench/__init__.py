"""Benchmark suite: pytest-benchmark cases, results files and the report (see bench/results/README.md)."""
