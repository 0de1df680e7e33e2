"""Benchmarks for smtp-dispatcher: ``python -m benchmarks`` (see benchmarks/README.md)."""
