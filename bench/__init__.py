"""Benchmarks (not tests): measured ratios against reference implementations; results go to BENCHMARKS.md."""
