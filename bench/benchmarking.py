"""Benchmark helpers: machine description, one process per measured arm, metered training, matmul peaks, report sections.

Imports transformers when TrainMeter is first used (it is a TrainerCallback); import this module lazily.
"""
from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from personakit.files import write_text_atomic

FLOPS_FORMULA = "4 × (N_linear × T + N_head × T_sup)"


def machine_info() -> dict[str, str]:
    """CPU model, cores, RAM, GPU and library versions, as strings for a report header."""
    import psutil
    import torch

    from personakit.versions import library_versions

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": f"{psutil.cpu_count(logical=False)} physical / {os.cpu_count()} logical, torch uses {torch.get_num_threads()} threads",
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    return {**info, **library_versions()}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _measured_call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[Any, int]:
    return fn(*args, **kwargs), peak_rss_bytes()


def run_isolated(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run `fn` in a fresh process; returns its result and that process's peak RSS in bytes.

    A spawned (not forked) child starts without the parent's loaded models, so each arm's peak
    memory is its own; `fn` must be a module-level function and its result picklable.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measured_call, fn, args, kwargs).result()


class TrainMeter(TrainerCallback):
    """Wall time of one training loop and the tokens of the batches its optimizer steps consumed.

    Pass it in a trainer's `callbacks`. Supervised tokens are looked up per row in `supervised`
    (row ids up to the last end-of-turn token -> reply + end-of-turn count), so trainers that
    tokenize the same rows with a different trailing token or loss mask are credited the same useful work.
    """

    def __init__(self, supervised: dict[tuple[int, ...], int], eot_id: int | None):
        self.supervised, self.eot_id = supervised, eot_id
        self.seconds = 0.0
        self.batches: list[tuple[int, int, int, int]] = []  # rows, tokens, supervised, unmatched
        self._started = 0.0

    def count(self, examples: list[dict[str, Any]]) -> None:
        tokens = supervised = unmatched = 0
        for example in examples:
            ids = list(example["input_ids"])
            tokens += len(ids)
            cut = len(ids) - ids[::-1].index(self.eot_id) if self.eot_id in ids else len(ids)
            n = self.supervised.get(tuple(ids[:cut]))
            if n is None:
                unmatched += 1
            else:
                supervised += n
        self.batches.append((len(examples), tokens, supervised, unmatched))

    def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None, **kwargs: Any) -> None:
        # The loader this run iterates collates each batch's rows: count them on their way through.
        # (accelerate wraps the torch DataLoader, which holds the collate function, in `base_dataloader`.)
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
        collate = loader.collate_fn

        def counting(examples: list[dict[str, Any]]) -> Any:
            self.count(examples)
            return collate(examples)

        loader.collate_fn = counting
        self._started = time.perf_counter()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds = time.perf_counter() - self._started
        # The data loader collates one batch ahead; keep the batches the optimizer steps consumed.
        del self.batches[state.global_step * args.gradient_accumulation_steps:]

    def as_dict(self) -> dict[str, Any]:
        rows, tokens, supervised, unmatched = (sum(column) for column in zip(*self.batches)) if self.batches else (0, 0, 0, 0)
        per_second = 1 / self.seconds if self.seconds else 0.0
        return {"seconds": self.seconds, "rows": rows, "tokens": tokens, "supervised": supervised, "unmatched": unmatched,
                "tokens_s": tokens * per_second, "supervised_s": supervised * per_second}


def supervised_table(examples: list[Any]) -> dict[tuple[int, ...], int]:
    """Encoded rows -> their supervised (label != IGNORE_INDEX) token count, keyed by the row's ids."""
    from personakit.template import IGNORE_INDEX

    return {tuple(e.input_ids): sum(1 for t in e.labels if t != IGNORE_INDEX) for e in examples}


def linear_weights(model: Any) -> tuple[int, int]:
    """(weights of every linear layer but the output head, weights of the head), 4-bit layers included."""
    import torch

    head = model.get_output_embeddings()
    body = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return body, head.in_features * head.out_features


def lora_train_flops(body: int, head: int, tokens: int, supervised: int) -> float:
    """Model FLOPs of LoRA training: forward 2·N·T plus backward through activations 2·N·T.

    Frozen weights need no weight gradients; LoRA's own matmuls (<1%) and attention scores are
    left out; the head counts at supervised positions only, the only ones the loss needs.
    """
    return 4.0 * (body * tokens + head * supervised)


def matmul_rates(dtype: Any, sizes: tuple[int, ...], device: str = "cpu", min_seconds: float = 1.0,
                 max_call_seconds: float = 5.0) -> list[tuple[int, float]]:
    """FLOP/s of repeated n×n matmuls (2·n³ each) per size, after one warm-up call.

    Larger sizes are skipped once one call would exceed `max_call_seconds` (bf16 on CPUs without
    AMX runs at ~1 GFLOP/s, where a 2048² matmul takes 20 s and shows nothing new).
    """
    import torch

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    rates: list[tuple[int, float]] = []
    for n in sorted(sizes):
        if rates and 2 * n**3 / rates[-1][1] > max_call_seconds:
            break
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
        sync()
        calls, start = 0, time.perf_counter()
        while True:
            a @ b
            sync()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        rates.append((n, 2 * n**3 * calls / elapsed))
    return rates


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with the block between `<!-- name:start -->` and `<!-- name:end -->` set to `body` (appended if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    head, found, rest = text.partition(start)
    if found and end in rest:
        return head + block + rest.split(end, 1)[1]
    return (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"


def write_section(path: str | Path, name: str, body: str, new_file: str = "# Benchmarks\n") -> None:
    """Replace one marked section of a markdown file atomically; the rest of the file stays as it was."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else new_file
    write_text_atomic(path, replace_section(text, name, body))


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
