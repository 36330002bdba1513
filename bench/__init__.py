"""Benchmarks and stand-in models, kept apart from the product: python -m bench.speed, bench.quality, bench.gpu_check."""
from personakit.loading import quiet_libraries

quiet_libraries()  # before anything imports peft (and with it bitsandbytes): the benchmarks' logs stay readable
