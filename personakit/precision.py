"""CPU precision: fp32 or bf16, decided per machine by measuring once.

Some CPUs run bf16 matmuls several times faster than fp32 (Intel AMX, AVX-512 BF16, Apple M2+),
others two orders of magnitude slower (AVX2 without bf16 units; figures in BENCHMARKS.md, CPU
precision): the same command is faster or unusable depending on the machine, and
`torch.backends.cpu.get_cpu_capability()` cannot tell the two apart (it says "AVX512" on an AMX
Xeon). So we time one small matmul in each precision, once per CPU model and torch version, cache
the figures, and pick bf16 where it is at least `BF16_MIN_SPEEDUP` faster.
"""
from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .files import write_text_atomic

CHOICES = ("auto", "fp32", "bf16")
BF16_MIN_SPEEDUP = 1.5
CACHE_FILE = "cpu_precision.json"
_SIZE = 384  # 2*384^3 = 113 MFLOP: ~1 ms in fp32, ~0.1 s at the 1 GFLOP/s of bf16 without hardware support
_BUDGET_S = 0.06  # per precision, over all rounds
_ROUNDS = 3
METHOD = f"fastest of alternating rounds, {_SIZE}x{_SIZE}"  # entries cached by another method are measured again


@dataclass(frozen=True)
class Probe:
    """Measured matmul throughput on this CPU (threads as torch uses them)."""

    cpu: str
    torch: str
    threads: int
    fp32_gflops: float
    bf16_gflops: float
    method: str = ""

    @property
    def speedup(self) -> float:
        return self.bf16_gflops / self.fp32_gflops if self.fp32_gflops else 0.0


@dataclass(frozen=True)
class Precision:
    """What a script runs in on the CPU, and why (printed and recorded in persona.json / report headers)."""

    dtype: str  # "fp32" or "bf16"
    requested: str
    probe: Probe | None

    @property
    def reason(self) -> str:
        if self.requested != "auto":
            return f"--cpu-dtype {self.requested}"
        p = self.probe
        verdict = "at least" if self.dtype == "bf16" else "under"
        return (f"measured bf16 {p.bf16_gflops:.1f} vs fp32 {p.fp32_gflops:.1f} GFLOP/s = {p.speedup:.2f}x, "
                f"{verdict} the {BF16_MIN_SPEEDUP}x needed")

    @property
    def generation(self) -> str:
        """Generation runs in bf16 only when asked for by name: a reply's greedy tokens then depend on
        which prompts share its batch (BENCHMARKS.md, CPU precision), which
        would break the reports' same-body guarantee and serve's batched == one-at-a-time replies."""
        return "bf16" if self.requested == "bf16" else "fp32"

    def describe(self) -> str:
        return f"cpu precision: training {self.dtype}, generation {self.generation} ({self.reason})"

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "generation": self.generation, "requested": self.requested, "reason": self.reason,
                "probe": asdict(self.probe) if self.probe else None}


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else what platform reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _fastest_matmul(a, b, budget_s: float) -> float:
    """Seconds of the fastest of the matmuls that fit in `budget_s` (at least one)."""
    import torch

    best, spent = float("inf"), 0.0
    while spent < budget_s:
        start = time.perf_counter()
        torch.mm(a, b)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return best


def measure() -> Probe:
    """Time the same matmul in fp32 and bf16 (well under a second even where bf16 is slow).

    The two precisions take turns for `_ROUNDS` rounds and each keeps its fastest single matmul:
    on a machine shared with other jobs, a run of matmuls can be descheduled halfway, and
    the fastest one is the closest to what the hardware does.
    """
    import torch

    pairs = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(_SIZE, _SIZE).to(dtype), torch.randn(_SIZE, _SIZE).to(dtype)
        torch.mm(a, b)  # warm-up: first call picks kernels
        pairs[dtype] = (a, b)
    best = {dtype: float("inf") for dtype in pairs}
    for _ in range(_ROUNDS):
        for dtype, (a, b) in pairs.items():
            best[dtype] = min(best[dtype], _fastest_matmul(a, b, _BUDGET_S / _ROUNDS))
    flop = 2 * _SIZE**3
    return Probe(cpu=cpu_model(), torch=torch.__version__, threads=torch.get_num_threads(),
                 fp32_gflops=round(flop / best[torch.float32] / 1e9, 2), bf16_gflops=round(flop / best[torch.bfloat16] / 1e9, 2),
                 method=METHOD)


def _cache_key(cpu: str, torch_version: str, threads: int) -> str:
    return f"{cpu} | torch {torch_version} | {threads} threads"


def cached_probe(cache_dir: Path, measure_fn: Callable[[], Probe] = measure) -> Probe:
    """The probe for this CPU model, torch version and thread count, measured once and cached."""
    import torch

    path = Path(cache_dir) / CACHE_FILE
    key = _cache_key(cpu_model(), torch.__version__, torch.get_num_threads())
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        try:
            probe = Probe(**cache[key])
            if probe.method == METHOD:
                return probe
        except TypeError:
            pass  # an entry from another layout: measure again
    probe = measure_fn()
    cache[key] = asdict(probe)
    write_text_atomic(path, json.dumps(cache, indent=2, sort_keys=True) + "\n")
    return probe


def decide(requested: str, probe: Callable[[], Probe]) -> Precision:
    """fp32 or bf16 for CPU work: the flag when explicit, else bf16 only where measured fast enough."""
    if requested not in CHOICES:
        raise ValueError(f"cpu dtype must be one of {', '.join(CHOICES)}, not {requested!r}")
    if requested != "auto":
        return Precision(requested, requested, None)
    p = probe()
    return Precision("bf16" if p.speedup >= BF16_MIN_SPEEDUP else "fp32", "auto", p)


def cpu_precision(requested: str, cache_dir: Path) -> Precision:
    """`--cpu-dtype` resolved on this machine (the probe runs at most once per CPU model and torch)."""
    return decide(requested, lambda: cached_probe(cache_dir))
