"""Benchmarks of galore-optax, run from the repository root: python -m benchmarks.<name>."""
