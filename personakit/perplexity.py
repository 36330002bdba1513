"""Held-out perplexity of replies: exp(mean NLL over the supervised tokens only)."""
from __future__ import annotations

import math
from typing import Any

from .template import IGNORE_INDEX, Encoded


def pad_batch(examples: list[Encoded], pad_id: int, with_labels: bool = True) -> dict[str, Any]:
    """Right-pad ids (and labels with IGNORE_INDEX) to the batch's longest example."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    batch = {"input_ids": ids, "attention_mask": mask}
    if with_labels:
        batch["labels"] = labels
    return batch


def perplexity(model: Any, examples: list[Encoded], pad_id: int, batch_size: int = 8) -> float | None:
    """Perplexity of the supervised tokens (reply + end-of-turn) under `model`; None without examples."""
    import torch

    if not examples:
        return None
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    # Sorting by length keeps padding (wasted compute) small; the result does not depend on order.
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ordered), batch_size):
            batch = pad_batch(ordered[start:start + batch_size], pad_id)
            labels = batch.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            total_nll += nll.item()
            total_tokens += int((shift_labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return math.exp(total_nll / max(total_tokens, 1))
