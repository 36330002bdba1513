"""Benchmarks and stand-in models (not part of the product)."""
