"""Reply generation shared by chat.py and the comparison scripts: decoding flags, batching, retry."""
from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .template import prompt_ids, stop_token_ids

_CJK = re.compile(r"[\u4e00-\u9fff]")
FULLER_HINT = {"zh": "（请多说几句，用两三句话回答。）", "en": " (Please answer in two or three full sentences.)"}


@dataclass(frozen=True)
class Decoding:
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    no_repeat_ngram_size: int
    max_new_tokens: int
    seed: int
    min_reply_chars: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Reply:
    text: str
    new_tokens: int
    hit_limit: bool
    retried: bool = False


def add_decoding_args(p: argparse.ArgumentParser, *, sample: bool) -> None:
    """The decoding flags every generating script shares; `sample` picks the script's default mode."""
    g = p.add_argument_group("decoding")
    g.add_argument("--sample", dest="do_sample", action="store_true", default=sample, help="sample with temperature/top-p/top-k")
    g.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding (deterministic)")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    g.add_argument("--repetition-penalty", type=float, default=1.1, help="penalty on tokens already generated (1 = off)")
    # 4 blocks the sign-off loops small persona fine-tunes fall into while leaving ordinary
    # repeated words alone (see BENCHMARKS.md, Quality).
    g.add_argument("--no-repeat-ngram-size", type=int, default=4, help="forbid repeating any token n-gram of this size (0 = off)")
    g.add_argument("--max-new-tokens", type=int, default=160, help="reply length limit in tokens")
    g.add_argument("--seed", type=int, default=1234, help="random seed for sampling")
    g.add_argument("--min-reply-chars", type=int, default=0, help="regenerate once, asking for more, when a reply is shorter (0 = off)")


def decoding_from_args(args: argparse.Namespace) -> Decoding:
    return Decoding(
        do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
        max_new_tokens=args.max_new_tokens, seed=args.seed, min_reply_chars=args.min_reply_chars,
    )


def generate_kwargs(tokenizer: Any, decoding: Decoding) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": decoding.max_new_tokens,
        "do_sample": decoding.do_sample,
        "repetition_penalty": decoding.repetition_penalty,
        "eos_token_id": stop_token_ids(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if decoding.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = decoding.no_repeat_ngram_size
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def fuller_request(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The same conversation with the last user turn asking for a fuller answer, in its language."""
    last = messages[-1]["content"]
    hint = FULLER_HINT["zh"] if _CJK.search(last) else FULLER_HINT["en"]
    return messages[:-1] + [{"role": "user", "content": last + hint}]


class _PollStop:
    """Stopping criterion for `model.generate`, checked after every token: stop once `should_stop()` is true."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), bool(self.should_stop()), dtype=torch.bool, device=input_ids.device)


def generate_batch(
    model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], decoding: Decoding,
    streamer: Any = None, should_stop: Callable[[], bool] | None = None,
) -> list[Reply]:
    """One left-padded batch through `model.generate`; the seed is set per batch so reruns repeat.

    `streamer` receives tokens as they come (batches of one only, a transformers limit); generation
    ends early once `should_stop()` is true (e.g. after Ctrl-C).
    """
    import torch
    from transformers import StoppingCriteriaList

    stops = set(stop_token_ids(tokenizer))
    encoded = [prompt_ids(tokenizer, conv) for conv in conversations]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    criteria = StoppingCriteriaList([_PollStop(should_stop)]) if should_stop else None
    torch.manual_seed(decoding.seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=mask, streamer=streamer, stopping_criteria=criteria,
            **generate_kwargs(tokenizer, decoding),
        )
    replies = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        tokens = row if end is None else row[:end]
        replies.append(Reply(tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens), end is None))
    return replies


def generate_one(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], decoding: Decoding,
    streamer: Any = None, should_stop: Callable[[], bool] | None = None,
) -> Reply:
    """One reply, streamed to `streamer` as it is generated; see `generate_batch`."""
    return generate_batch(model, tokenizer, [messages], decoding, streamer, should_stop)[0]


def generate_replies(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], decoding: Decoding, batch_size: int = 8) -> list[Reply]:
    """Replies for many conversations, in batches; too-short replies are regenerated once, asking for more."""
    replies: list[Reply] = []
    for start in range(0, len(conversations), batch_size):
        replies += generate_batch(model, tokenizer, conversations[start:start + batch_size], decoding)
    if decoding.min_reply_chars > 0:
        short = [i for i, r in enumerate(replies) if len(r.text) < decoding.min_reply_chars]
        for start in range(0, len(short), batch_size):
            chunk = short[start:start + batch_size]
            retried = generate_batch(model, tokenizer, [fuller_request(conversations[i]) for i in chunk], decoding)
            for i, reply in zip(chunk, retried):
                reply.retried = True
                replies[i] = reply
    return replies
