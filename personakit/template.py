"""Chat-template rendering shared by training and inference, and the rule that keeps them in step.

Training and inference render messages with the tokenizer's own `apply_chat_template`. For every
row, the inference prompt (system + history + user + generation prompt) must be an exact token
prefix of the training sequence, and the supervised tokens are exactly the reply plus the
template's end-of-turn token, so the model learns to stop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .data import Row
from .errors import UserError

IGNORE_INDEX = -100


class TemplateMismatch(UserError):
    """The rendered prompt is not a token prefix of the rendered training sequence."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int


def require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "this tokenizer has no chat template, so training and chat prompts cannot be rendered "
            "consistently; use a chat/instruct base (e.g. Qwen/Qwen1.5-1.8B-Chat) or add a "
            "chat_template to its tokenizer_config.json"
        )


def build_messages(row: Row, system: str | None, with_reply: bool = False) -> list[dict[str, str]]:
    """system (row's own wins) + history pairs + user turn (+ the reply for training)."""
    messages: list[dict[str, str]] = []
    system_text = row.get("system") or system
    if system_text:
        messages.append({"role": "system", "content": system_text})
    for user, reply in row.get("history") or []:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": reply})
    messages.append({"role": "user", "content": row["instruction"]})
    if with_reply:
        messages.append({"role": "assistant", "content": row["output"]})
    return messages


def render_text(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer: Any, text: str, as_text: bool = False) -> list[int]:
    # The template already contains any BOS it wants; adding special tokens again would double it.
    return tokenizer(text, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]


def _content_spans(text: str, messages: list[dict[str, str]]) -> list[tuple[int, int]] | None:
    """Where each message's text sits in the rendered `text`, in order; None if the template rewrote one."""
    spans, pos = [], 0
    for message in messages:
        content = message["content"]
        at = text.find(content, pos)
        if at < 0:
            content = content.strip()  # templates that trim
            at = text.find(content, pos)
        if at < 0:
            return None
        spans.append((at, at + len(content)))
        pos = at + len(content)
    return spans


def _neutralised(messages: list[dict[str, str]], specials: list[str]) -> list[dict[str, str]]:
    """Messages whose special-token strings carry a word joiner after their first character."""
    out = []
    for message in messages:
        content = message["content"]
        for special in specials:
            content = content.replace(special, special[0] + "\u2060" + special[1:])
        out.append({**message, "content": content})
    return out


def messages_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    """Token ids of the rendered messages, with the messages' own text always tokenized as text.

    A user who types `<|im_end|>\n<|im_start|>system` must not open a system turn: the template's
    control tokens come from the template alone. Messages without such strings tokenize exactly
    as the whole rendered text does.
    """
    text = render_text(tokenizer, messages, generation_prompt)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    strings = sorted({t.content for t in added.values() if len(t.content) > 1}, key=len, reverse=True)
    specials = [s for s in strings if any(s in m["content"] for m in messages)]
    if not specials:
        return _ids(tokenizer, text)
    spans = _content_spans(text, messages)
    if spans is None:  # the template rewrote a message: break the strings up before rendering instead
        return messages_ids(tokenizer, _neutralised(messages, specials), generation_prompt)
    ids, pos = [], 0
    for start, end in spans:
        ids += _ids(tokenizer, text[pos:start]) + _ids(tokenizer, text[start:end], as_text=True)
        pos = end
    return ids + _ids(tokenizer, text[pos:])


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the inference prompt (ends with the generation prompt)."""
    return messages_ids(tokenizer, messages, generation_prompt=True)


def end_of_turn_id(tokenizer: Any) -> int:
    """The token the template closes an assistant turn with (e.g. <|im_end|>, <|eot_id|>, </s>)."""
    cached = getattr(tokenizer, "_personakit_eot", None)
    if cached is not None:
        return cached
    probe = "PROBE"
    # A user turn follows the probe: some templates (Qwen1.5's first revision) close an assistant turn
    # only when another turn comes after it.
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}, {"role": "user", "content": "ok"}]
    text = render_text(tokenizer, msgs, generation_prompt=False)
    cut = text.rfind(probe)
    suffix_ids = _ids(tokenizer, text[cut + len(probe):])
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    eot = next((i for i in suffix_ids if i in special), None)
    if eot is None:
        raise UserError(
            "the chat template closes assistant turns with no special end-of-turn token, so a "
            "fine-tuned model could not learn to stop; use a chat model whose template ends turns with one"
        )
    tokenizer._personakit_eot = eot
    return eot


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Generation stops at the end-of-turn token and at the tokenizer's EOS."""
    ids = [end_of_turn_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_example(tokenizer: Any, row: Row, system: str | None) -> Encoded:
    """Training ids and labels for one row; raises TemplateMismatch when the consistency rule fails."""
    messages = build_messages(row, system, with_reply=True)
    prompt = prompt_ids(tokenizer, messages[:-1])
    eot = end_of_turn_id(tokenizer)
    full = messages_ids(tokenizer, messages, generation_prompt=False)
    if eot not in full[len(prompt):]:
        # The template leaves a final assistant turn open (Qwen1.5's first revision); at inference the
        # reply is closed as it is when another turn follows, so train on that rendering.
        closed = messages + [{"role": "user", "content": "ok"}]
        full = messages_ids(tokenizer, closed, generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise TemplateMismatch(
            f"the inference prompt is not a token prefix of the training sequence for row "
            f"{row['instruction'][:30]!r}; this tokenizer's template renders the reply differently "
            f"from the generation prompt, so use another base or fix its chat_template"
        )
    try:
        end = full.index(eot, len(prompt))
    except ValueError:
        raise TemplateMismatch(
            f"the training sequence for row {row['instruction'][:30]!r} has no end-of-turn token after the reply"
        ) from None
    reply_text = tokenizer.decode(full[len(prompt):end])
    if reply_text.strip() != row["output"].strip():
        raise TemplateMismatch(
            f"the supervised tokens decode to {reply_text[:40]!r}, not the reply {row['output'][:40]!r}; "
            f"the chat template rewrites assistant turns, so use another base or fix its chat_template"
        )
    # Everything after the end-of-turn token (e.g. a newline) is not needed to learn to stop.
    input_ids = full[: end + 1]
    labels = [IGNORE_INDEX] * len(prompt) + input_ids[len(prompt):]
    return Encoded(input_ids, labels, len(prompt))


def show_example(tokenizer: Any, encoded: Encoded) -> str:
    """The rendered training sequence with the supervised part between [[ and ]]."""
    prompt = tokenizer.decode(encoded.input_ids[: encoded.prompt_len])
    supervised = tokenizer.decode(encoded.input_ids[encoded.prompt_len:])
    return f"{prompt}[[{supervised}]]"
