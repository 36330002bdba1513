"""Benchmarks and stand-in models, kept apart from the product: python -m bench.speed, bench.quality, bench.gpu_check."""
