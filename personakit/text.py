"""Text helpers for Chinese/English chat text, defined once: CJK ranges, language, particles,
the normalisation key that comparisons use, and a character-trigram similarity index.
"""
from __future__ import annotations

import math
import re
import unicodedata
import zlib
from collections import defaultdict
from collections.abc import Iterable

# Han ideographs (basic block, extension A, compatibility) and Japanese kana: each such character
# is one word-like unit, since these scripts write no spaces between words.
CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
CJK_CHAR = re.compile(f"[{CJK_RANGES}]")
CJK_RUN = re.compile(f"[{CJK_RANGES}]+")
_LATIN_WORD = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)*")

# Chinese when at least half of the units are CJK characters (see `cjk_share`).
ZH_SHARE = 0.5

# Modal particles and interjections: style markers of a persona, and no content on their own.
_PARTICLES_ZH = "啊呀吧呢嘛哈啦哦噢喔呗嗯哎诶欸哇耶嘿咯噻哟呵嘻额呃嗷哼唔"
# Laughter and "hmm" of any length are one particle; their repeats are possessive (*+, ++) so
# that a long "hahaha...x" cannot make the regex try every way of splitting it.
_PARTICLES_EN = (
    r"ha(?:h[ae])*+h?|he(?:h[ae])++h?|h?m{2,}+|hm|lol|lmao|omg|xd|tbh|oh|ah|um|ugh|wow|hey|well|like|honestly|kinda"
    r"|gonna|yeah|yep|yup|ya|ok|okay|totally|literally"
)
PARTICLE = re.compile(f"[{_PARTICLES_ZH}]|(?:{_PARTICLES_EN})", re.IGNORECASE)
# Acknowledgements say no more than a particle as a whole reply, but are not style markers.
_ACKNOWLEDGEMENTS = r"好的|好滴|好哒|好吧|好|行|对|是的|是|收到|k|yes|no"
_ONLY_PARTICLES = re.compile(f"(?:{PARTICLE.pattern}|{_ACKNOWLEDGEMENTS})+", re.IGNORECASE)


def cjk_share(texts: str | Iterable[str]) -> float:
    """Share of CJK characters among CJK characters plus latin words (0 = all English, 1 = all Chinese).

    One character weighs what one word does, so a Chinese message quoting "iPhone 15 Pro Max"
    stays Chinese and an English one naming 小雨 stays English. 0 for text with neither.
    """
    joined = texts if isinstance(texts, str) else "\n".join(texts)
    cjk, words = len(CJK_CHAR.findall(joined)), len(_LATIN_WORD.findall(joined))
    return cjk / (cjk + words) if cjk + words else 0.0


def language_of(texts: str | Iterable[str]) -> str:
    """'zh' when at least ZH_SHARE of the units are CJK characters, else 'en'."""
    return "zh" if cjk_share(texts) >= ZH_SHARE else "en"


def is_chinese(text: str) -> bool:
    return language_of(text) == "zh"


def is_particle(unit: str) -> bool:
    """One unit (a CJK character or a latin word) that is a modal particle or interjection: 啊, 呢, lol, hmm."""
    return bool(PARTICLE.fullmatch(unit))


def only_particles(content: str) -> bool:
    """True when `content` (spaces and punctuation already removed) is nothing but particles and acknowledgements."""
    return bool(_ONLY_PARTICLES.fullmatch(content))


def normal_key(text: str) -> str:
    """Width-, case-, spacing-, punctuation- and emoji-insensitive form that comparisons use.

    NFKC folds full-width letters (ＴＯＤＡＹ) and casefold folds case; only letters and digits
    (CJK included) are kept, so "好的~" and "好的！" and "好的😊" are the same text.
    """
    return "".join(c for c in unicodedata.normalize("NFKC", text).casefold() if c.isalnum())


def char_trigrams(key: str) -> frozenset[str]:
    """Character 3-grams of `key`; a key of 1-2 characters is its own only gram, an empty one has none."""
    if len(key) < 3:
        return frozenset([key]) if key else frozenset()
    return frozenset(key[i:i + 3] for i in range(len(key) - 2))


class TrigramIndex:
    """Keys (see `normal_key`) indexed to find one whose character-trigram Jaccard similarity
    with a query reaches `threshold` (0 < threshold <= 1).

    Prefix filtering: with all grams in one fixed order, two sets with Jaccard >= t share a
    gram among the first |x| - ceil(t*|x|) + 1 grams of each, so only those are indexed and
    looked up and each candidate is then checked exactly: near linear, with no false misses.
    """

    def __init__(self, threshold: float, keys: Iterable[str] = ()):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], not {threshold}")
        self.threshold = threshold
        self._sets: list[frozenset[str]] = []
        self._postings: dict[str, list[int]] = defaultdict(list)
        for key in keys:
            self.add(key)

    def _prefix(self, grams: frozenset[str]) -> list[str]:
        ordered = sorted(grams, key=lambda g: (zlib.crc32(g.encode()), g))
        keep = len(ordered) - math.ceil(self.threshold * len(ordered) - 1e-9) + 1
        return ordered[:keep]

    def contains_similar(self, key: str) -> bool:
        grams = char_trigrams(key)
        seen: set[int] = set()
        for gram in self._prefix(grams):
            for i in self._postings.get(gram, ()):
                if i not in seen:
                    seen.add(i)
                    other = self._sets[i]
                    if len(grams & other) >= self.threshold * len(grams | other):
                        return True
        return False

    def add(self, key: str) -> None:
        grams = char_trigrams(key)
        for gram in self._prefix(grams):
            self._postings[gram].append(len(self._sets))
        self._sets.append(grams)
