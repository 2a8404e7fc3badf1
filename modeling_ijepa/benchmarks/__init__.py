"""Baselines the benchmarks and tests compare against (not used by training)."""
