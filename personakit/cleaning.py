"""Filters, personal-data masking and duplicate detection: candidate pairs in, training rows out.

A candidate is checked in this order and rejected with the first reason that applies:
  empty           instruction or reply is blank
  placeholder     nothing left once media placeholders such as [图片] [Sticker] are removed
  garbled         U+FFFD, control characters, UTF-8 read as Latin-1/cp1252 ("ä½ å¥½") or as GBK
  url_only        nothing but links
  truncated       the reply carries a truncation marker, or is a long reply cut with "..."/"…"
  low_info        the reply is only particles, punctuation or emoji, or too short
  too_long        the reply is longer than --max-reply-chars
  pii             personal data found and --pii drop
  invalid_row     the finished row is not canonical (e.g. a blank history turn)
  duplicate       same normalised instruction and reply as a kept row
  near_duplicate  the reply is (nearly) the same as a kept reply
"""
from __future__ import annotations

import math
import re
import statistics
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from .data import Row, normalize_row, validate_row
from .exports import PLACEHOLDER_RE, Candidate, Reject
from .text import CJK_CHAR, TrigramIndex, normal_key, only_particles

TRUNCATION_MARKERS = ("[truncated]", "(truncated)", "<truncated>", "[已截断]", "（已截断）", "[内容过长]")
# A trailing "..." or a single "…" right after a word is how previews and exporters cut text;
# short replies ending that way are usually just a way of talking, so only long ones count.
TRUNCATED_MIN_CHARS = 20
CUT_ENDING = re.compile(r"\w(?:\.\.\.|…)$")

# WeChat/QQ inline emoji codes such as [微笑] [捂脸] [Facepalm].
EMOJI_CODE = re.compile(r"\[[^\[\]\s]{1,8}\]")
URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# Characters a UTF-8 continuation byte (0x80-0xBF) turns into when read as cp1252/Latin-1.
_CONT = "[\u0080-\u00bf\u20ac\u201a\u0192\u201e\u2026\u2020\u2021\u02c6\u2030\u0160\u2039\u0152" \
        "\u017d\u2018\u2019\u201c\u201d\u2022\u2013\u2014\u02dc\u2122\u0161\u203a\u0153\u017e\u0178]"
LATIN1_MOJIBAKE = re.compile(f"[\u00c2-\u00df]{_CONT}|[\u00e0-\u00ef]{_CONT}{{2}}|[\u00f0-\u00f4]{_CONT}{{3}}")
NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]{3,}")

PII_PATTERNS = [
    ("EMAIL", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")),
    ("ID", re.compile(r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])"
                      r"(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx](?![0-9A-Za-z])")),
    ("CARD", re.compile(r"(?<![\d+])\d(?:[ -]?\d){15,18}(?!\d)")),
    ("PHONE", re.compile(r"(?<![\d+])(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)")),
    ("PHONE", re.compile(r"(?<![\d+])\+\d{1,3}(?:[ -]?\(?\d{1,4}\)?){2,5}(?!\d)")),
]

# Notices that chat apps write as if someone had said them: recalls, pats/pokes, join/leave,
# renames. A message whose whole text is one of these is system text, never training text.
_NAME = r".{0,40}?"
_QUOTED = r"[\"“「『].{1,40}?[\"”」』]"
SYSTEM_LINES = [re.compile(p, re.IGNORECASE) for p in (
    rf"{_NAME}\s*撤回了一条(?:成员的)?消息(?:[，,]?\s*\[?重新编辑\]?)?",
    r"[^，。！？,.!?~～]{0,40}?(?:拍了拍|戳了戳)[^，。！？,.!?~～]{0,40}",
    rf"(?:欢迎)?{_NAME}(?:邀请.{{0,80}}?)?(?:通过.{{0,40}}?)?加入了?(?:群聊|本群|该群)[。！!]?",
    rf"{_NAME}(?:已)?(?:退出了?|离开了?|被移出)(?:群聊|本群|该群)[。]?",
    rf"{_NAME}将.{{0,80}}?移出了?(?:群聊|本群)[。]?",
    rf"{_NAME}修改群名为.{{0,60}}",
    rf"{_NAME}(?:已)?成为新群主[。]?",
    rf"你已添加了{_NAME}，现在可以开始聊天了。?",
    r"以上是打招呼的内容",
    rf"{_NAME}开启了朋友验证.{{0,80}}",
    rf"{_NAME}\s*(?:recalled|unsent|withdrew|retracted) a message\.?(?:\s*re-?edit)?",
    rf"(?:{_QUOTED}|you) (?:patted|nudged|poked|tickled) (?:{_QUOTED}|me|you).{{0,40}}",
    rf"{_NAME} (?:joined|left) (?:the |this )?group(?: chat)?(?: via .{{0,60}})?\.?",
    rf"{_NAME} invited .{{0,80}}? to (?:join )?(?:the |this )?group(?: chat)?\.?",
    rf"{_NAME} removed .{{0,40}}? from (?:the |this )?group(?: chat)?\.?",
    rf"{_NAME} changed the group name to .{{0,60}}",
    rf"you(?:'ve| have) added {_NAME} as your wechat contact\. start chatting!?",
)]

SHORT_REPLY_CHARS = 10     # replies under this many characters count as very short
SHORT_SHARE_WARNING = 0.4  # warn when at least this share of kept replies is very short


@dataclass(frozen=True)
class CleanConfig:
    pii: str                # "mask", "drop" or "keep"
    min_reply_chars: int
    max_reply_chars: int
    near_dup: float         # 3-gram Jaccard threshold against kept replies; 0 turns it off
    history_turns: int      # earlier kept pairs of a chat session given as history


def clean_text(text: str) -> str:
    """Drop media placeholders and trailing spaces; the text itself is left as written."""
    text = PLACEHOLDER_RE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def is_system_line(text: str) -> bool:
    """A recall, pat, join/leave or rename notice written as a message (Chinese or English)."""
    text = text.strip()
    return bool(text) and "\n" not in text and any(p.fullmatch(text) for p in SYSTEM_LINES)


def is_garbled(text: str) -> bool:
    if "\ufffd" in text or "锟斤拷" in text or CONTROL.search(text) or LATIN1_MOJIBAKE.search(text):
        return True
    return any(_gbk_mojibake(run) for run in NON_ASCII_RUN.findall(text))


def _gbk_mojibake(run: str) -> bool:
    """UTF-8 Chinese read as GBK ("浣犲ソ"): re-encoding gives back UTF-8 Chinese.

    One broken sequence is allowed because such text usually lost its last byte."""
    try:
        original = run.encode("gbk").decode("utf-8", errors="replace")
    except UnicodeError:
        return False
    return original.count("\ufffd") <= 1 and len(CJK_CHAR.findall(original)) >= 2


def is_url_only(text: str) -> bool:
    return bool(URL.search(text)) and not re.search(r"\w", URL.sub("", text))


def is_truncated(text: str) -> bool:
    lowered = text.lower()
    if any(marker in lowered for marker in TRUNCATION_MARKERS):
        return True
    return len(text) >= TRUNCATED_MIN_CHARS and bool(CUT_ENDING.search(text))


def content_chars(text: str) -> str:
    """The text without emoji codes, punctuation, symbols, emoji and spaces, NFKC and lower case."""
    text = unicodedata.normalize("NFKC", EMOJI_CODE.sub("", text)).casefold()
    return "".join(c for c in text if unicodedata.category(c)[0] not in "PSZC"
                   and unicodedata.category(c) != "Mn")


def is_low_info(text: str, min_chars: int) -> bool:
    content = content_chars(text)
    return len(content) < min_chars or only_particles(content)


def mask_pii(text: str) -> tuple[str, Counter[str]]:
    """Replace phone numbers, e-mail addresses, ID and bank card numbers with [TYPE]."""
    found: Counter[str] = Counter()

    def replace(kind: str, match: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", match.group())
        if kind == "CARD" and not (16 <= len(digits) <= 19 and luhn_ok(digits)):
            return match.group()
        if kind == "PHONE" and match.group().startswith("+") and not 8 <= len(digits) <= 15:
            return match.group()
        found[kind] += 1
        return f"[{kind}]"

    for kind, pattern in PII_PATTERNS:
        text = pattern.sub(lambda m, k=kind: replace(k, m), text)
    return text, found


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


class Cleaner:
    """Checks candidates in order; keeps rows and builds chat history from kept pairs."""

    def __init__(self, config: CleanConfig):
        self.config = config
        self.kept: list[Row] = []
        self.pii_masked: Counter[str] = Counter()
        self._pairs: set[tuple[str, str]] = set()
        self._near = TrigramIndex(config.near_dup) if config.near_dup > 0 else None
        self._history: dict[str, list[list[str]]] = defaultdict(list)

    def add(self, cand: Candidate) -> Reject | None:
        """Keep the candidate, or return why not."""
        instruction, output = clean_text(cand.instruction), clean_text(cand.output)
        reason = (_text_problem(cand.instruction, instruction) or _text_problem(cand.output, output)
                  or self._reply_problem(output))
        if reason:
            return _reject(cand, reason)
        texts, found = self._pii([instruction, output, *(t for pair in cand.history for t in pair)])
        if found and self.config.pii == "drop":
            return _reject(cand, "pii")
        history = (self._history_for(cand.session) if cand.session
                   else [texts[i:i + 2] for i in range(2, len(texts), 2)])
        row = normalize_row({"instruction": texts[0], "output": texts[1],
                             "history": history, "system": cand.system})
        problem = validate_row(row)
        if problem:
            return _reject(cand, "invalid_row", problem)
        key = (normal_key(row["instruction"]), normal_key(row["output"]))
        if key in self._pairs:
            return _reject(cand, "duplicate")
        if self._near and key[1] and self._near.contains_similar(key[1]):
            return _reject(cand, "near_duplicate")
        self._keep(cand, row, key, found)
        return None

    def _reply_problem(self, reply: str) -> str | None:
        if is_truncated(reply):
            return "truncated"
        if is_low_info(reply, self.config.min_reply_chars):
            return "low_info"
        if len(reply) > self.config.max_reply_chars:
            return "too_long"
        return None

    def _pii(self, texts: list[str]) -> tuple[list[str], Counter[str]]:
        if self.config.pii == "keep":
            return texts, Counter()
        masked = [mask_pii(t) for t in texts]
        found = sum((c for _, c in masked), Counter())
        return ([t for t, _ in masked] if self.config.pii == "mask" else texts), found

    def _history_for(self, session: str) -> list[list[str]]:
        turns = self.config.history_turns
        return self._history[session][-turns:] if turns > 0 else []

    def _keep(self, cand: Candidate, row: Row, key: tuple[str, str], found: Counter[str]) -> None:
        self.kept.append(row)
        if self.config.pii == "mask":
            self.pii_masked.update(found)
        self._pairs.add(key)
        if self._near and key[1]:
            self._near.add(key[1])
        if cand.session:
            self._history[cand.session].append([row["instruction"], row["output"]])


def _reject(cand: Candidate, reason: str, detail: str | None = None) -> Reject:
    # The rejects file keeps the text exactly as read: nothing is lost, even masked data.
    return Reject(reason, cand.file, cand.where, detail=detail,
                  instruction=cand.instruction, output=cand.output)


def _text_problem(raw: str, cleaned: str) -> str | None:
    if not raw.strip():
        return "empty"
    if not cleaned:
        return "placeholder"
    if is_garbled(cleaned):
        return "garbled"
    if is_url_only(cleaned):
        return "url_only"
    return None


def reply_stats(rows: list[Row]) -> dict[str, Any]:
    """Reply length in characters (mean, median, p90) and the share of very short replies."""
    lengths = sorted(len(r["output"]) for r in rows)
    if not lengths:
        return {}
    return {"mean": round(statistics.fmean(lengths), 1), "median": statistics.median(lengths),
            "p90": lengths[math.ceil(0.9 * len(lengths)) - 1],
            "short_share": round(sum(n < SHORT_REPLY_CHARS for n in lengths) / len(lengths), 3)}
