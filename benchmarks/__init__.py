"""Benchmarks: ``./dev python -m benchmarks`` (see benchmarks/README.md)."""
