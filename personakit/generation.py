"""Replies for chat.py and the reports over the one engine (personakit/engine.py): decoding settings, batches, the retry of short replies."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .engine import Engine, Row, Sampling, TextRow
from .options import Decoding
from .template import prompt_ids, stop_token_ids
from .text import is_chinese

FULLER_HINT = {"zh": "（请多说几句，用两三句话回答。）", "en": " (Please answer in two or three full sentences.)"}


def sampling(decoding: Decoding) -> Sampling:
    """The engine's per-row sampling for these decoding settings."""
    return Sampling(decoding.do_sample, decoding.temperature, decoding.top_p, decoding.top_k, decoding.seed)


@dataclass
class Reply:
    text: str
    new_tokens: int
    hit_limit: bool
    retried: bool = False


class _ReplyOnly:
    """Apply a logits processor to the generated reply only, never to the prompt.

    transformers applies `repetition_penalty` and `no_repeat_ngram_size` to the whole sequence,
    prompt included: a system prompt that names the persona's habit ("I usually...") or a user
    message ending in "?" then penalises exactly the tokens the persona should produce.
    """

    def __init__(self, inner: Any, start: int):
        self.inner, self.start = inner, start

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if input_ids.shape[1] <= self.start:
            return scores
        return self.inner(input_ids[:, self.start:], scores)


def generate_kwargs(tokenizer: Any, decoding: Decoding, prompt_width: int) -> dict[str, Any]:
    """`model.generate` arguments for `decoding`; with scope "reply", repetition controls see only tokens after `prompt_width`."""
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    kwargs: dict[str, Any] = {
        "max_new_tokens": decoding.max_new_tokens,
        "do_sample": decoding.do_sample,
        "eos_token_id": stop_token_ids(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if decoding.repetition_scope == "all":  # transformers' own processors, prompt included
        kwargs["repetition_penalty"] = decoding.repetition_penalty
        kwargs["no_repeat_ngram_size"] = decoding.no_repeat_ngram_size or None
    else:
        processors = []
        if decoding.repetition_penalty != 1.0:
            processors.append(_ReplyOnly(RepetitionPenaltyLogitsProcessor(decoding.repetition_penalty), prompt_width))
        if decoding.no_repeat_ngram_size:
            processors.append(_ReplyOnly(NoRepeatNGramLogitsProcessor(decoding.no_repeat_ngram_size), prompt_width))
        kwargs["logits_processor"] = LogitsProcessorList(processors)
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def fuller_request(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The same conversation with the last user turn asking for a fuller answer, in its language."""
    last = messages[-1]["content"]
    hint = FULLER_HINT["zh"] if is_chinese(last) else FULLER_HINT["en"]
    return messages[:-1] + [{"role": "user", "content": last + hint}]


def decoding_engine(model: Any, tokenizer: Any, decoding: Decoding) -> Engine:
    """The engine with `decoding`'s repetition controls on `model` as the caller left it (adapter switched or merged)."""
    return Engine(model, tokenizer, repetition_penalty=decoding.repetition_penalty,
                  no_repeat_ngram_size=decoding.no_repeat_ngram_size, repetition_scope=decoding.repetition_scope)


def _reply(engine: Engine, row: Row) -> Reply:
    return Reply(engine.decode(row.tokens).strip(), len(row.tokens), row.finish != "stop")


@dataclass(eq=False)
class _Interruptible(TextRow):
    should_stop: Callable[[], bool] | None = None

    def abandoned(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())


def generate_one(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], decoding: Decoding,
    on_text: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
) -> Reply:
    """One reply; its text goes to `on_text` piece by piece as it is generated, and generation ends
    early once `should_stop()` is true (e.g. after Ctrl-C)."""
    engine = decoding_engine(model, tokenizer, decoding)
    row = _Interruptible(prompt_ids(tokenizer, messages), decoding.max_new_tokens, sampling=sampling(decoding),
                         on_text=on_text, should_stop=should_stop)
    return _reply(engine, engine.run([row])[0])


def generate_replies(
    model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], decoding: Decoding, batch_size: int = 8,
) -> list[Reply]:
    """Replies for many conversations, in batches; too-short replies are regenerated once, asking for more.

    Conversations are batched in order of prompt length, so a batch pads little. Each row samples
    from its own generator seeded with `decoding.seed`, so a reply does not depend on its batch.
    """
    engine = decoding_engine(model, tokenizer, decoding)

    def run(convs: list[list[dict[str, str]]]) -> list[Reply]:
        rows = [Row(prompt_ids(tokenizer, conv), decoding.max_new_tokens, sampling=sampling(decoding)) for conv in convs]
        order = sorted(range(len(rows)), key=lambda k: len(rows[k].prompt))
        for start in range(0, len(order), batch_size):
            engine.run([rows[k] for k in order[start:start + batch_size]])
        return [_reply(engine, row) for row in rows]

    replies = run(conversations)
    if decoding.min_reply_chars > 0:
        short = [i for i, r in enumerate(replies) if len(r.text) < decoding.min_reply_chars]
        for i, reply in zip(short, run([fuller_request(conversations[i]) for i in short])):
            reply.retried = True
            replies[i] = reply
    return replies
