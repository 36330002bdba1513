"""Summary memory: exchanges that fall out of the recent window are condensed by the model into a
short running note, which rides in the system prompt under a token budget; exchanges not yet
condensed stay in the prompt word for word.

The note goes into the system message, as a delimited block after the persona's own system
prompt, because that is the only place free text fits the template rule (DESIGN.md): the prompt
stays system + history + user, the shape the adapter was trained on, with no invented turn. With
no note yet, the system prompt is exactly the trained one.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from .template import prompt_ids

Exchange = tuple[str, str]

NOTE_OPEN = "[Notes on your earlier conversation with this user]"
NOTE_CLOSE = "[End of notes]"
SUMMARY_SYSTEM = "You keep short notes about a chat, for remembering it later."
# Longer turns are cut in the summarising prompt so that one chunk always fits the context.
TURN_CHARS = 600


def with_note(system: str | None, note: str) -> str | None:
    """The persona's system prompt with the running note appended as a delimited block."""
    if not note:
        return system
    block = f"{NOTE_OPEN}\n{note}\n{NOTE_CLOSE}"
    return f"{system}\n\n{block}" if system else block


def to_fold(total: int, covers: int, memory_turns: int) -> int:
    """How many exchanges after the first `covers` to condense into the note now: those that left
    the recent window, once `max(memory_turns, 1)` of them have gathered. Until then they stay in
    the prompt word for word, so the model writes the note once every few exchanges, not after each."""
    left = total - memory_turns - covers
    return left if left >= max(memory_turns, 1) else 0


def summary_messages(note: str, exchanges: Sequence[Exchange], speaker: str, words: int) -> list[dict[str, str]]:
    """The prompt that asks the model to fold `exchanges` into `note`."""
    lines = "\n".join(f"User: {u[:TURN_CHARS]}\n{speaker}: {r[:TURN_CHARS]}" for u, r in exchanges)
    earlier = f"Notes so far:\n{note}\n\n" if note else ""
    ask = (
        f"{earlier}New part of the chat:\n{lines}\n\n"
        f"Write the updated notes: the facts about the user worth remembering (names, people, pets, "
        f"places, dates, plans, likes), in at most {words} words. Reply with the notes only."
    )
    return [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": ask}]


def cut_to_tokens(tokenizer: Any, text: str, limit: int) -> str:
    """`text` cut to at most `limit` tokens, at a word boundary when there is one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= limit:
        return text.strip()
    cut = tokenizer.decode(ids[:limit], skip_special_tokens=True)
    head, space, _ = cut.rpartition(" ")
    return (head if space and head else cut).strip()


def fold_into_note(
    tokenizer: Any, note: str, exchanges: Sequence[Exchange], speaker: str, note_tokens: int,
    prompt_budget: int, summarize: Callable[[list[dict[str, str]]], str],
) -> str:
    """The note updated with `exchanges`, in chunks whose summarising prompt fits `prompt_budget`;
    `summarize(messages)` returns the model's text, which is cut to `note_tokens` tokens."""
    words = max(note_tokens * 2 // 3, 8)  # ~1.5 tokens per English word
    pending = list(exchanges)
    while pending:
        take = 1
        while take < len(pending) and len(prompt_ids(tokenizer, summary_messages(note, pending[:take + 1], speaker, words))) <= prompt_budget:
            take += 1
        text = summarize(summary_messages(note, pending[:take], speaker, words))
        note = cut_to_tokens(tokenizer, text, note_tokens) or note
        pending = pending[take:]
    return note
