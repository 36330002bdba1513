"""Replay rows: the base model's own answers to some of the training prompts, mixed into training.

A persona fine-tune on a small dataset learns the voice quickly and can stop answering the
question; rows in which the base answers the same prompts (under the persona's system prompt and
chat template) keep the adapter close to the base's answering while the persona rows teach the voice.
"""
from __future__ import annotations

import random
from typing import Any

from .data import Row
from .options import Decoding


def replay_count(train_rows: int, fraction: float) -> int:
    """Replay rows for `train_rows` persona rows: `fraction` of them, each prompt used at most once."""
    return min(round(train_rows * fraction), train_rows)


def replay_decoding(seed: int) -> Decoding:
    """The default decoding, greedy, so the replay rows are the base's most likely answers."""
    return Decoding(seed=seed)


def make_replay_rows(model: Any, tokenizer: Any, rows: list[Row], system: str, fraction: float, seed: int,
                     batch_size: int = 16) -> list[Row]:
    """The base's greedy replies to a seeded sample of `rows`' prompts; a reply cut off by the token limit is left out."""
    from .generation import generate_replies
    from .template import build_messages

    n = replay_count(len(rows), fraction)
    if not n:
        return []
    picked = random.Random(seed).sample(rows, n)
    was_training = model.training
    model.eval()
    try:
        replies = generate_replies(model, tokenizer, [build_messages(r, system) for r in picked], replay_decoding(seed), batch_size)
    finally:
        model.train(was_training)
    return [{**row, "output": reply.text} for row, reply in zip(picked, replies) if reply.text and not reply.hit_limit]
