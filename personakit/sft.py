"""TRL's SFTTrainer with a leaner loss for persona data, where most tokens are prompt, not reply.

Imported only by the training path: it pulls in trl/transformers at import time.
"""
from __future__ import annotations

import random
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback
from trl import SFTTrainer

from .template import IGNORE_INDEX


def _plain_head(model: Any) -> bool:
    """Models that scale or soft-cap logits keep the library's own loss."""
    config = model.config
    return not any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def reply_only_loss(model: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: Any = None) -> torch.Tensor:
    """Cross-entropy computed from the LM head applied to supervised positions only.

    The head is the costliest single layer of a small model (49k x 576 for SmolLM2) and most
    positions of a chat example are prompt tokens whose logits would be thrown away.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False).last_hidden_state
    labels = inputs["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    loss = torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum")
    denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return loss / torch.as_tensor(denominator, device=loss.device).clamp(min=1)


class LengthGroupedOrder(Sampler):
    """Shuffled batches of rows of near-equal length, so a batch is padded by a few tokens only.

    The library's group_by_length sorts mega-batches of 4 batches for a few hundred rows, which
    still pads much of every batch (BENCHMARKS.md, Defaults); sorting mega-batches of 16 batches and shuffling the batch
    order keeps randomness while padding almost nothing. Each pass reshuffles with seed + pass.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, mega: int = 16):
        self.lengths, self.batch_size, self.seed, self.mega, self.passes = lengths, batch_size, seed, mega, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed + self.passes)
        self.passes += 1
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        span = self.batch_size * self.mega
        batches: list[list[int]] = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return iter([i for batch in batches for i in batch])


class PersonaSFTTrainer(SFTTrainer):
    """SFTTrainer with length-grouped batches and a loss that skips the LM head on prompt tokens."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.world_size > 1:
            return super()._get_train_sampler(train_dataset)
        lengths = [len(ids) for ids in dataset["input_ids"]]
        return LengthGroupedOrder(lengths, self.args.per_device_train_batch_size, self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Several processes: the forward must go through the DDP wrapper, which syncs the gradients,
        # so the library's loss (the same token mean, with the full head) is kept there.
        if return_outputs or self.args.world_size > 1 or not _plain_head(model):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        # accelerate applies mixed precision by wrapping model.forward, which this loss bypasses
        # (it calls the backbone and the head itself), so autocast is entered here.
        with self.accelerator.autocast():
            return reply_only_loss(model, inputs, num_items_in_batch)


class EvaluateAtEnd(TrainerCallback):
    """Evaluate and checkpoint the final step too, so best-checkpoint selection sees the last weights."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = True
            control.should_save = True
        return control
