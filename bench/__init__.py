"""Benchmarks, kept apart from the product: python -m bench.speed, python -m bench.quality."""
