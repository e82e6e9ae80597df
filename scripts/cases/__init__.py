"""Benchmark and test cases with a known right answer (data builders; not part of the package)."""
