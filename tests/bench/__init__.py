"""Correctness tests of the benchmark scripts in ``bench/`` (never of their timings)."""
