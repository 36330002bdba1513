"""Around the trainer (train.py runs it): the seeded held-out split, rows encoded within max_length, checkpoints, bf16 on CPU."""
from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import Row
from .errors import UserError
from .template import Encoded, encode_example


@dataclass
class EncodedSplit:
    train: list[Encoded]
    val: list[Encoded]
    dropped_too_long: int


# Below 50 rows a held-out set of 10 would take a fifth of the data and still be too noisy to
# choose a checkpoint; from 50 rows on, at least 10 rows are held out (at most 20% by default).
MIN_ROWS_FOR_VALIDATION = 50
MIN_VAL_ROWS = 10


def holdout_size(n_rows: int, val_fraction: float) -> int:
    """Rows to hold out: `val_fraction` of them but at least 10; none below 50 rows or with a zero fraction."""
    if val_fraction <= 0 or n_rows < MIN_ROWS_FOR_VALIDATION:
        return 0
    return min(max(round(n_rows * val_fraction), MIN_VAL_ROWS), n_rows - 1)


def no_holdout_reason(n_rows: int, val_fraction: float) -> str:
    if val_fraction <= 0:
        return "nothing held out (--val-fraction 0)"
    if holdout_size(n_rows, val_fraction):
        return "nothing held out: every held-out row is longer than --max-length"
    return f"nothing held out: {n_rows} rows, fewer than the {MIN_ROWS_FOR_VALIDATION} a validation split needs"


def split_rows(rows: list[Row], val_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Seeded validation split of `holdout_size` rows."""
    n_val = holdout_size(len(rows), val_fraction)
    if not n_val:
        return list(rows), []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val_idx], [r for i, r in enumerate(rows) if i in val_idx]


def encode_fitting(tokenizer: Any, row: Row, system: str | None, max_length: int) -> Encoded | None:
    """Encode a row, dropping its oldest history pairs until it fits `max_length`; None if it never fits."""
    row = dict(row)
    while True:
        encoded = encode_example(tokenizer, row, system)
        if len(encoded.input_ids) <= max_length:
            return encoded
        if not row.get("history"):
            return None
        row["history"] = row["history"][1:]


def encode_split(tokenizer: Any, train: list[Row], val: list[Row], system: str | None, max_length: int) -> EncodedSplit:
    dropped = 0
    out: list[list[Encoded]] = [[], []]
    for bucket, rows in zip(out, (train, val)):
        for row in rows:
            encoded = encode_fitting(tokenizer, row, system, max_length)
            if encoded is None:
                dropped += 1
            else:
                bucket.append(encoded)
    if not out[0]:
        raise UserError(f"no training row fits --max-length {max_length}; raise --max-length or shorten the replies")
    return EncodedSplit(out[0], out[1], dropped)


def to_dataset(examples: list[Encoded]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})


def latest_checkpoint(work_dir: Path) -> Path | None:
    checkpoints = [p for p in work_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1]), default=None)


FP32_SDPA = "personakit_sdpa_fp32"


def _sdpa_in_fp32(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> tuple[Any, Any]:
    """transformers' SDPA attention computed in fp32 (autocast off), its output cast back to the query's dtype."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


@contextmanager
def cpu_bf16_training(model: Any) -> Iterator[None]:
    """What bf16 training on CPU changes beyond autocast, each measured faster and each undone on exit.

    - Attention runs in fp32: PyTorch's CPU flash-attention backward is far slower in bf16 than in
      fp32 (BENCHMARKS.md, CPU precision).
    - The frozen Linear weights are stored in bf16 instead of being cast by autocast at every
      forward (the same rounding, so the same products); the fp32 originals are put back on exit.
      A head tied to the input embedding is left alone so that the residual stream stays fp32.
    - PEFT's cast of each LoRA layer's input to the adapter's fp32 is skipped: autocast casts it
      straight back to bf16 for the product, so the two copies changed nothing but the time.
    """
    import torch
    from peft.helpers import disable_input_dtype_casting
    from transformers import AttentionInterface

    base = model.get_base_model()
    attention = base.config._attn_implementation
    if attention == "sdpa":
        AttentionInterface.register(FP32_SDPA, _sdpa_in_fp32)
        base.set_attn_implementation(FP32_SDPA)
    embeddings = {id(m.weight) for m in base.modules() if isinstance(m, torch.nn.Embedding)}
    originals = {m.weight: m.weight.data for m in base.modules()
                 if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad and m.weight.dtype == torch.float32
                 and id(m.weight) not in embeddings}
    for weight in originals:
        weight.data = weight.data.to(torch.bfloat16)
    try:
        with disable_input_dtype_casting(model):
            yield
    finally:
        for weight, data in originals.items():
            weight.data = data
        if attention == "sdpa":
            base.set_attn_implementation(attention)
