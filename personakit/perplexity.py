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


def reply_nll(model: Any, examples: list[Encoded], pad_id: int, batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each example's supervised tokens under `model`, in input order."""
    import torch

    device = next(model.parameters()).device
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    # Sorting by length keeps padding (wasted compute) small; the result does not depend on order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = pad_batch([examples[i] for i in idx], pad_id)
            labels = batch.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none",
            )
            for i, row_nll, row_labels in zip(idx, nll.sum(1).tolist(), (shift_labels != IGNORE_INDEX).sum(1).tolist()):
                out[i] = (row_nll, int(row_labels))
    model.train(was_training)
    return out


def mean_loss(per_row: list[tuple[float, int]]) -> float:
    """Token-weighted mean NLL: the log of the perplexity."""
    return sum(s for s, _ in per_row) / max(sum(t for _, t in per_row), 1)


def loss_standard_error(per_row: list[tuple[float, int]]) -> float | None:
    """Standard error of the token-weighted mean loss with rows as the sampled unit (ratio estimator).

    Tokens of one reply are not independent, so the noise of a held-out estimate is set by how
    many replies it has, not by how many tokens; None with fewer than two rows.
    """
    n, tokens = len(per_row), sum(t for _, t in per_row)
    if n < 2 or not tokens:
        return None
    loss = mean_loss(per_row)
    spread = sum((s - loss * t) ** 2 for s, t in per_row)
    return math.sqrt(n / (n - 1) * spread) / tokens


def perplexity(model: Any, examples: list[Encoded], pad_id: int, batch_size: int = 8) -> float | None:
    """Perplexity of the supervised tokens (reply + end-of-turn) under `model`; None without examples."""
    if not examples:
        return None
    return math.exp(mean_loss(reply_nll(model, examples, pad_id, batch_size)))
