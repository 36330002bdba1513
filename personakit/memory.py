"""What a chat remembers: the recent exchanges, earlier ones retrieved by lexical match, the prompt they make cut to a token budget."""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .flags import DEFAULT_MAX_CONTEXT
from .template import build_messages, prompt_ids
from .text import CJK_RUN

Exchange = tuple[str, str]

_WORD = re.compile(r"[a-z0-9\u00c0-\u024f]+")
# Words that occur in nearly every English turn; matching on them would make everything look relevant.
_STOPWORDS = frozenset(
    "about am an and any are as at be been but by can did do does for from had has have he her him his how "
    "if in into is it its just me my no not of on or our she so than that the their them then there they "
    "this to too up was we were what when where which who why will with would you your".split()
)
# "Do you remember ..." is how people ask for an old turn; the asking words say nothing about which.
_RECALL = re.compile(r"还记得|记不记得|记得|\bremember\w*|\brecall\w*")
# Chinese characters that are grammar rather than topic; they still count inside bigrams.
_CJK_STOPCHARS = frozenset("的了得地着过是在有和也就都不没很太还又我你他她它们这那个吗呢吧啊呀哦嗯么")


def match_terms(text: str) -> list[str]:
    """Terms to match on: English words (2+ letters, no stopwords), Chinese characters and character bigrams.

    Chinese has no spaces; bigrams catch words, single characters catch a topic word (猫) that
    another phrasing wraps differently (我的猫 vs 我家的猫).
    """
    lowered = _RECALL.sub(" ", text.lower())
    terms = [w for w in _WORD.findall(lowered) if len(w) > 1 and w not in _STOPWORDS]
    for run in CJK_RUN.findall(lowered):
        terms += [c for c in run if c not in _CJK_STOPCHARS] + [run[i:i + 2] for i in range(len(run) - 1)]
    return terms


def bm25_scores(query: str, docs: Sequence[str], k1: float = 1.2, b: float = 0.75) -> list[float]:
    """Okapi BM25 score (bm25s, Lucene variant) of every doc for `query`; 0.0 for a doc sharing no term with it."""
    import bm25s

    if not docs:
        return []
    query_terms = list(dict.fromkeys(match_terms(query)))
    if not query_terms:
        return [0.0] * len(docs)
    index = bm25s.BM25(k1=k1, b=b, method="lucene")
    index.index([match_terms(d) for d in docs], show_progress=False)
    return [float(s) for s in index.get_scores(query_terms)]


def retrieve(history: Sequence[Exchange], message: str, k: int, skip_last: int = 0) -> list[Exchange]:
    """Up to `k` exchanges before the last `skip_last` most relevant to `message`, in conversation order."""
    pool = list(history[: max(len(history) - skip_last, 0)])
    scores = bm25_scores(message, [f"{user}\n{reply}" for user, reply in pool])
    # Best score first; among equals the more recent exchange wins.
    best = sorted((i for i, s in enumerate(scores) if s > 0), key=lambda i: (-scores[i], -i))[:k]
    return [pool[i] for i in sorted(best)]


def memory_window(history: Sequence[Exchange], message: str, turns: int, retrieve_k: int = 0) -> list[Exchange]:
    """The last `turns` exchanges, preceded by up to `retrieve_k` earlier ones relevant to `message`."""
    recent = list(history[-turns:]) if turns > 0 else []
    earlier = retrieve(history, message, retrieve_k, skip_last=len(recent)) if retrieve_k > 0 else []
    return earlier + recent


def fit_to_budget(window: Sequence[Exchange], prompt_len: Callable[[list[Exchange]], int], budget: int) -> list[Exchange]:
    """Drop exchanges from the front (oldest first) until `prompt_len(kept) <= budget`; may return []."""
    kept = list(window)
    while kept and prompt_len(kept) > budget:
        kept.pop(0)
    return kept


class PromptTooLong(Exception):
    """The message alone, with no memory, makes a prompt over the budget (each caller words the error)."""

    def __init__(self, size: int, budget: int):
        super().__init__(f"{size}-token prompt over a budget of {budget}")
        self.size, self.budget = size, budget


@dataclass
class FittedPrompt:
    messages: list[dict[str, str]]
    ids: list[int]
    kept: int  # exchanges of the window that fit
    window: int  # exchanges offered


def fit_prompt(tokenizer: Any, message: str, window: Sequence[Exchange], system: str | None, budget: int) -> FittedPrompt:
    """The prompt of `message` under `system` after as many exchanges of `window` as fit `budget`
    tokens, oldest dropped first (chat.py and the server); PromptTooLong if the message alone is over."""
    def render(memory: list[Exchange]) -> list[dict[str, str]]:
        return build_messages({"instruction": message, "history": [list(pair) for pair in memory]}, system)

    kept = fit_to_budget(window, lambda memory: len(prompt_ids(tokenizer, render(memory))), budget)
    messages = render(kept)
    ids = prompt_ids(tokenizer, messages)
    if len(ids) > budget:
        raise PromptTooLong(len(ids), budget)
    return FittedPrompt(messages, ids, len(kept), len(window))


def reply_budget(model: Any, max_context: int | None, max_new_tokens: int) -> tuple[int, int]:
    """(context tokens, prompt tokens left by a reply of `max_new_tokens`), `--max-context` checked against the base."""
    context = context_size(model, max_context)
    if context <= max_new_tokens:
        raise UserError(f"--max-new-tokens {max_new_tokens} fills this base's whole context of {context} tokens "
                        "(--max-context); lower --max-new-tokens or raise --max-context")
    return context, context - max_new_tokens


def context_size(model: Any, requested: int | None, default: int = DEFAULT_MAX_CONTEXT) -> int:
    """`--max-context` checked against the base's own context; default: the base's, at most `default`."""
    limit = getattr(model.config, "max_position_embeddings", None) or default
    if requested is not None and requested > limit:
        raise UserError(f"--max-context {requested} is more than this base's context of {limit} tokens; pass --max-context {limit} or less")
    return requested or min(limit, default)
