"""Prompt sets for the comparison reports: JSONL rows {"id", "category", "prompt", "keywords", "history"}."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import Row, parse_jsonl, sha256_file
from .errors import UserError
from .text import language_of


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    prompt: str
    keywords: tuple[str, ...] = ()
    history: tuple[tuple[str, str], ...] = ()

    def as_row(self) -> Row:
        """The canonical row that `template.build_messages` renders (no reply)."""
        row: Row = {"instruction": self.prompt}
        if self.history:
            row["history"] = [list(turn) for turn in self.history]
        return row


@dataclass(frozen=True)
class PromptSet:
    path: Path
    sha256: str
    total: int
    prompts: list[Prompt]

    @property
    def language(self) -> str:
        """'zh' or 'en', by the share of CJK characters in the prompts."""
        return language_of(p.prompt for p in self.prompts)


def _problem(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return "not a JSON object"
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        return "'prompt' must be a non-empty string"
    for key in ("id", "category"):
        if key in obj and not isinstance(obj[key], str):
            return f"'{key}' must be a string"
    keywords = obj.get("keywords", [])
    if not isinstance(keywords, list) or not all(isinstance(k, str) and k.strip() for k in keywords):
        return "'keywords' must be a list of non-empty strings"
    history = obj.get("history", [])
    if not isinstance(history, list) or not all(
        isinstance(t, list) and len(t) == 2 and all(isinstance(s, str) and s.strip() for s in t) for t in history
    ):
        return "'history' must be a list of [user, reply] pairs of non-empty strings"
    return None


def load_prompts(path: str | Path, limit: int | None = None) -> PromptSet:
    """Read and validate a prompt set; the first bad line stops with its line number.

    `limit` keeps the first N prompts; the sha256 is always that of the whole file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist; pass --prompts with a JSONL file of {{\"prompt\": ...}} rows")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, not {limit}")
    with path.open(encoding="utf-8-sig") as fh:
        records, _ = parse_jsonl(fh, _problem, on_error="stop", source=str(path))
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for lineno, obj in records:
        pid = obj.get("id") or f"p{len(prompts) + 1:02d}"
        if pid in seen:
            raise UserError(f"{path} line {lineno} repeats id {pid!r} of line {seen[pid]}; give every prompt its own id")
        seen[pid] = lineno
        prompts.append(Prompt(
            id=pid, category=obj.get("category") or "general", prompt=obj["prompt"].strip(),
            keywords=tuple(k.strip() for k in obj.get("keywords", [])),
            history=tuple((u, a) for u, a in obj.get("history", [])),
        ))
    if not prompts:
        raise UserError(f"{path} has no prompts; it needs JSONL lines like {{\"prompt\": \"...\", \"keywords\": [...]}}")
    total = len(prompts)
    return PromptSet(path, sha256_file(path), total, prompts[:limit] if limit else prompts)
