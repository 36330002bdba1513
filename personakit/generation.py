"""Reply generation shared by chat.py and the comparison scripts: decoding settings, batching, retry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .options import Decoding
from .template import prompt_ids, stop_token_ids
from .text import is_chinese

FULLER_HINT = {"zh": "（请多说几句，用两三句话回答。）", "en": " (Please answer in two or three full sentences.)"}


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


class _PollStop:
    """Stopping criterion for `model.generate`, checked after every token: stop once `should_stop()` is true."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), bool(self.should_stop()), dtype=torch.bool, device=input_ids.device)


def _generate_encoded(
    model: Any, tokenizer: Any, encoded: list[list[int]], decoding: Decoding,
    streamer: Any = None, should_stop: Callable[[], bool] | None = None,
) -> list[Reply]:
    """One left-padded batch of prompts already rendered to token ids through `model.generate` (or,
    greedy and unstreamed, the same search dropping finished rows); the seed is set per batch so reruns repeat.

    `streamer` receives tokens as they come (batches of one only, a transformers limit); generation
    ends early once `should_stop()` is true (e.g. after Ctrl-C).
    """
    import torch
    from transformers import StoppingCriteriaList

    stops = set(stop_token_ids(tokenizer))
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    kwargs = generate_kwargs(tokenizer, decoding, width)
    torch.manual_seed(decoding.seed)
    if not decoding.do_sample and decoding.repetition_scope == "reply" and not (streamer or should_stop):
        rows = _greedy_dropping_finished(model, input_ids, mask, kwargs["logits_processor"], stops, decoding.max_new_tokens)
    else:
        criteria = StoppingCriteriaList([_PollStop(should_stop)]) if should_stop else None
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, streamer=streamer, stopping_criteria=criteria, **kwargs)
        rows = out[:, width:].tolist()
    replies = []
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in stops), None)
        tokens = row if end is None else row[:end]
        replies.append(Reply(tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens), end is None))
    return replies


def _greedy_dropping_finished(model: Any, input_ids: Any, mask: Any, processors: Any, stops: set[int], max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding of a left-padded batch that drops each row from the batch, KV cache
    included, as soon as it ends its turn.

    `model.generate` keeps finished rows in the batch until the longest reply is done: in a batch
    of 16 where one reply runs to the token limit, most of the work is padding (~40% of row-steps
    on the quality benchmark's prompts). Same model calls, position ids, float32 logits and logits
    processors as `generate`'s greedy search, so the tokens are the same (tested).
    """
    import inspect

    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
    stop_ids = torch.tensor(sorted(stops), device=input_ids.device)
    rows: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    active = torch.arange(input_ids.shape[0], device=input_ids.device)
    seq, step_ids, cache = input_ids, input_ids, None
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        for step in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache,
                        use_cache=True, **extra)
            cache = out.cache
            scores = processors(seq, out.logits[:, -1].to(dtype=torch.float32))
            chosen = scores.argmax(dim=-1)
            for row, token in zip(active.tolist(), chosen.tolist()):
                rows[row].append(token)
            keep = ~torch.isin(chosen, stop_ids)
            if step == max_new_tokens - 1 or not bool(keep.any()):
                break
            seq = torch.cat([seq, chosen[:, None]], dim=1)
            if not bool(keep.all()):
                kept = keep.nonzero().squeeze(1)
                cache.batch_select_indices(kept)
                active, seq, mask, chosen = active[kept], seq[kept], mask[kept], chosen[kept]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            positions = mask.long().sum(-1, keepdim=True) - 1
            step_ids = chosen[:, None]
    return rows


def generate_one(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], decoding: Decoding,
    streamer: Any = None, should_stop: Callable[[], bool] | None = None,
) -> Reply:
    """One reply, streamed to `streamer` as it is generated; see `_generate_encoded`."""
    return _generate_encoded(model, tokenizer, [prompt_ids(tokenizer, messages)], decoding, streamer, should_stop)[0]


def generate_replies(
    model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], decoding: Decoding, batch_size: int = 8,
) -> list[Reply]:
    """Replies for many conversations, in batches; too-short replies are regenerated once, asking for more.

    Conversations are batched in order of prompt length, so a batch pads little.
    """
    def run(convs: list[list[dict[str, str]]]) -> list[Reply]:
        encoded = [prompt_ids(tokenizer, conv) for conv in convs]
        order = sorted(range(len(encoded)), key=lambda k: len(encoded[k]))
        out: list[Reply | None] = [None] * len(encoded)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for k, reply in zip(chunk, _generate_encoded(model, tokenizer, [encoded[k] for k in chunk], decoding)):
                out[k] = reply
        return out  # type: ignore[return-value]

    replies = run(conversations)
    if decoding.min_reply_chars > 0:
        short = [i for i, r in enumerate(replies) if len(r.text) < decoding.min_reply_chars]
        for i, reply in zip(short, run([fuller_request(conversations[i]) for i in short])):
            reply.retried = True
            replies[i] = reply
    return replies
