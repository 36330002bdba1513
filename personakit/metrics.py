"""Text metrics that show whether a fine-tune changed a model: pure Python, no torch, no judge model.

Lengths and n-grams are counted in *units*: one unit per CJK character (Chinese, Japanese kana)
and one per latin/digit word, so Chinese and English replies are measured on the same scale.
Every rate is in 0..1; every function returns None where it has nothing to measure.
"""
from __future__ import annotations

import math
import re
import statistics
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .text import CJK_RANGES, TrigramIndex, is_particle, normal_key

_UNIT = re.compile(rf"[{CJK_RANGES}]|(?:(?![{CJK_RANGES}])\w)+(?:['’](?:(?![{CJK_RANGES}])\w)+)*")
_SPACE = re.compile(r"\s+")
_EMOTICON = re.compile(r"(?<!\w)[:;]-?[()DPp](?!\w)|\^_*\^|QAQ|T_T|orz")

LENGTH_BINS = (5, 10, 20, 40, 80)
STYLE_COMPONENTS = ("length", "particles", "punctuation", "emoji", "catchphrases", "char_ngrams")
CATCHPHRASES = 20
LOOP_N, LOOP_TIMES = 4, 3
STUTTER_UNITS = 12
NEAR_COPY = 0.6
MIN_COPY_CHARS = 5


# ---- units --------------------------------------------------------------------

def units(text: str) -> list[str]:
    """Lower-cased units of `text`: each CJK character, each latin/digit word; punctuation dropped."""
    return [u.lower() for u in _UNIT.findall(text)]


def length(text: str) -> int:
    """Reply length in units (CJK characters + latin words)."""
    return len(units(text))


def ngrams(seq: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


# ---- per-reply measures --------------------------------------------------------------------

def is_too_short(text: str, min_units: int) -> bool:
    """A reply with fewer than `min_units` units carries no answer (an empty reply is too short)."""
    return length(text) < min_units


def keyword_hits(text: str, keywords: Sequence[str]) -> int:
    """How many of `keywords` occur in `text` (case-insensitive substring match)."""
    low = text.lower()
    return sum(1 for k in keywords if k.lower() in low)


def keyword_coverage(texts: Sequence[str], keywords: Sequence[Sequence[str]]) -> tuple[float | None, float | None]:
    """(share of replies touching at least one keyword, mean share of keywords touched).

    Only prompts that have keywords count; both are None when no prompt has any. Range 0..1.
    """
    pairs = [(t, k) for t, k in zip(texts, keywords) if k]
    if not pairs:
        return None, None
    hits = [keyword_hits(t, k) for t, k in pairs]
    return (sum(h > 0 for h in hits) / len(pairs),
            sum(h / len(k) for h, (_, k) in zip(hits, pairs)) / len(pairs))


def distinct_n(texts: Sequence[str], n: int = 2) -> float | None:
    """Distinct-n: distinct unit n-grams / all unit n-grams, n-grams taken within each reply.

    1 = no n-gram ever repeats, near 0 = the same phrases over and over. None without any n-gram.
    Pooled over replies, so it falls slowly as replies get longer; compare models at equal lengths.
    """
    grams = [g for t in texts for g in ngrams(units(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def has_loop(text: str, n: int = LOOP_N, times: int = LOOP_TIMES) -> bool:
    """True for degenerate repetition, either of two kinds:

    - a recurring phrase: some sequence of `n` units occurs `times` or more times without
      overlapping ("I am here for you. ... I am here for you. ... I am here for you.");
    - a stutter: a block of 1 to 3 units repeated back to back over STUTTER_UNITS or more units
      ("哈" x 12, "I am here" x 4); shorter laughter like "哈哈哈哈哈哈" is style, not a loop.
    """
    seq = units(text)
    for period in (1, 2, 3):
        run = period
        for k in range(period, len(seq)):
            run = run + 1 if seq[k] == seq[k - period] else period
            if run >= STUTTER_UNITS:
                return True
    count: Counter[tuple[str, ...]] = Counter()
    next_free: dict[tuple[str, ...], int] = {}
    for i, gram in enumerate(ngrams(seq, n)):
        if i >= next_free.get(gram, 0):
            count[gram] += 1
            next_free[gram] = i + n
            if count[gram] >= times:
                return True
    return False


def marker_hit(text: str, patterns: Sequence[re.Pattern[str]]) -> bool:
    return any(p.search(text) for p in patterns)


def marker_rate(texts: Sequence[str], patterns: Sequence[re.Pattern[str]]) -> float | None:
    """Share of replies matching any persona marker regex; None without replies or markers."""
    if not texts or not patterns:
        return None
    return sum(marker_hit(t, patterns) for t in texts) / len(texts)


def compile_markers(patterns: Sequence[str]) -> list[re.Pattern[str]]:
    return [re.compile(p, re.IGNORECASE) for p in patterns]


# ---- style distance ------------------------------------------------------------------------

def _length_bin(n: int) -> int:
    return next((i for i, edge in enumerate(LENGTH_BINS) if n < edge), len(LENGTH_BINS))


def _is_emoji(ch: str) -> bool:
    cp = ord(ch)
    return 0x1F000 <= cp <= 0x1FAFF or 0x2600 <= cp <= 0x27BF or 0x2B00 <= cp <= 0x2BFF


def _is_punct(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat.startswith("P") or cat in ("Sm", "Sk")


def _normal(text: str) -> str:
    return _SPACE.sub(" ", text.lower()).strip()


def char_ngrams(text: str, n_max: int = 3) -> Counter[str]:
    """Counts of character 1..n_max-grams of the lower-cased, space-collapsed text."""
    t = _normal(text)
    return Counter(t[i:i + n] for n in range(1, n_max + 1) for i in range(len(t) - n + 1))


def ruzicka_distance(p: dict, q: dict) -> float:
    """1 - sum(min)/sum(max) over non-negative feature values: 0 identical, 1 disjoint; 0 if both empty."""
    keys = set(p) | set(q)
    top = sum(max(p.get(k, 0.0), q.get(k, 0.0)) for k in keys)
    if top == 0:
        return 0.0
    return 1.0 - sum(min(p.get(k, 0.0), q.get(k, 0.0)) for k in keys) / top


def cosine_distance(p: Counter, q: Counter) -> float:
    """1 - cosine similarity of two count vectors (0..1 for counts); 1 when either is empty."""
    dot = sum(v * q[k] for k, v in p.items() if k in q)
    norm = math.sqrt(sum(v * v for v in p.values())) * math.sqrt(sum(v * v for v in q.values()))
    return 1.0 if norm == 0 else max(0.0, 1.0 - dot / norm)


def _phrases(text: str) -> set[tuple[str, ...]]:
    seq = units(text)
    return set(ngrams(seq, 2)) | set(ngrams(seq, 3))


@dataclass
class StyleProfile:
    """Pooled style features of a set of replies (see `style_distance`)."""

    n: int
    length_hist: dict[int, float]
    particles: dict[str, float]
    punctuation: dict[str, float]
    emoji: dict[str, float]
    char_ngrams: Counter[str]
    phrase_sets: list[set[tuple[str, ...]]] = field(repr=False)


def style_profile(texts: Sequence[str]) -> StyleProfile:
    """Length histogram shares; particle, punctuation and emoji counts per unit; char 1-3-gram counts."""
    lengths = [length(t) for t in texts]
    total_units = max(sum(lengths), 1)
    hist = Counter(_length_bin(n) for n in lengths)
    particles: Counter[str] = Counter(u for t in texts for u in units(t) if is_particle(u))
    punct: Counter[str] = Counter(ch for t in texts for ch in t if _is_punct(ch))
    emoji: Counter[str] = Counter(ch for t in texts for ch in t if _is_emoji(ch))
    emoji.update(m for t in texts for m in _EMOTICON.findall(t))
    grams: Counter[str] = Counter()
    for t in texts:
        grams.update(char_ngrams(t))
    return StyleProfile(
        n=len(texts),
        length_hist={k: v / max(len(texts), 1) for k, v in hist.items()},
        particles={k: v / total_units for k, v in particles.items()},
        punctuation={k: v / total_units for k, v in punct.items()},
        emoji={k: v / total_units for k, v in emoji.items()},
        char_ngrams=grams,
        phrase_sets=[_phrases(t) for t in texts],
    )


def catchphrases(profile: StyleProfile, k: int = CATCHPHRASES) -> list[tuple[str, ...]]:
    """The `k` unit 2-/3-grams found in most replies of `profile` (at least 2 replies each)."""
    df: Counter[tuple[str, ...]] = Counter(g for s in profile.phrase_sets for g in s)
    ranked = sorted((g for g, c in df.items() if c >= 2), key=lambda g: (-df[g], g))
    return ranked[:k]


def _phrase_shares(profile: StyleProfile, phrases: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], float]:
    n = max(profile.n, 1)
    return {g: sum(g in s for s in profile.phrase_sets) / n for g in phrases}


@dataclass
class StyleDistance:
    """One 0..1 number (mean of the components) plus each component, 0 = same style."""

    combined: float
    components: dict[str, float]


def style_distance(texts: Sequence[str] | StyleProfile, reference: Sequence[str] | StyleProfile) -> StyleDistance | None:
    """How far the style of `texts` is from the `reference` replies, 0 (same) .. 1 (nothing shared).

    Components, each 0..1:
    - length: total variation distance between reply-length histograms (bins <5, <10, <20, <40, <80, 80+ units);
    - particles, punctuation, emoji: Ruzicka (weighted Jaccard) distance between per-unit rates of
      each modal particle (啊 呢 吧 哈 / lol haha honestly ...), punctuation mark and emoji/emoticon;
    - catchphrases: Ruzicka distance between the shares of replies using each of the reference's
      20 most widespread unit 2-/3-grams;
    - char_ngrams: cosine distance between character 1-3-gram counts.
    `combined` is their plain mean. Identical reply distributions give 0. None without replies.
    """
    a = texts if isinstance(texts, StyleProfile) else style_profile(texts)
    b = reference if isinstance(reference, StyleProfile) else style_profile(reference)
    if a.n == 0 or b.n == 0:
        return None
    phrases = catchphrases(b)
    components = {
        "length": 0.5 * sum(abs(a.length_hist.get(k, 0.0) - b.length_hist.get(k, 0.0))
                            for k in set(a.length_hist) | set(b.length_hist)),
        "particles": ruzicka_distance(a.particles, b.particles),
        "punctuation": ruzicka_distance(a.punctuation, b.punctuation),
        "emoji": ruzicka_distance(a.emoji, b.emoji),
        "catchphrases": ruzicka_distance(_phrase_shares(a, phrases), _phrase_shares(b, phrases)),
        "char_ngrams": cosine_distance(a.char_ngrams, b.char_ngrams),
    }
    return StyleDistance(statistics.fmean(components.values()), components)


# ---- memorisation --------------------------------------------------------------------------

class CopyIndex:
    """Training replies, ready to tell exact and near copies apart."""

    def __init__(self, replies: Sequence[str], near: float = NEAR_COPY):
        keys = [k for k in map(normal_key, replies) if len(k) >= MIN_COPY_CHARS]
        self.exact = set(keys)
        self.similar = TrigramIndex(near, keys)

    def kind(self, text: str) -> str | None:
        """'exact', 'near' or None for one reply.

        exact: equal to a training reply after dropping case, width, spaces, punctuation and emoji;
        near: character-trigram Jaccard similarity >= `near` with some training reply.
        Replies under 5 letters/characters never count: "ok" is not memorisation.
        """
        key = normal_key(text)
        if len(key) < MIN_COPY_CHARS:
            return None
        if key in self.exact:
            return "exact"
        return "near" if self.similar.contains_similar(key) else None


def copy_kinds(texts: Sequence[str], training: Sequence[str] | CopyIndex) -> list[str | None]:
    """Per reply: 'exact' copy of a training reply, 'near' copy, or None (see CopyIndex.kind)."""
    index = training if isinstance(training, CopyIndex) else CopyIndex(training)
    return [index.kind(t) for t in texts]


# ---- attribution ---------------------------------------------------------------------------

class CharNgramNB:
    """Multinomial naive Bayes over character 1-3-grams, uniform class prior, add-`alpha` smoothing.

    Uniform priors keep a class with many training replies from winning by size alone.
    """

    def __init__(self, alpha: float = 0.5, n_max: int = 3):
        self.alpha, self.n_max = alpha, n_max
        self.counts: dict[str, Counter[str]] = {}
        self.totals: dict[str, int] = {}
        self.vocab: set[str] = set()

    def fit(self, docs: dict[str, Sequence[str]]) -> CharNgramNB:
        for label, texts in docs.items():
            counts: Counter[str] = Counter()
            for t in texts:
                counts.update(char_ngrams(t, self.n_max))
            self.counts[label] = counts
            self.totals[label] = sum(counts.values())
            self.vocab |= set(counts)
        return self

    def scores(self, text: str, leave_out: tuple[str, str] | None = None) -> dict[str, float]:
        """Log-likelihood of `text` per class; `leave_out=(label, doc)` first removes that training doc."""
        grams = char_ngrams(text, self.n_max)
        removed = char_ngrams(leave_out[1], self.n_max) if leave_out else Counter()
        v = max(len(self.vocab), 1)
        out = {}
        for label, counts in self.counts.items():
            minus = removed if leave_out and leave_out[0] == label else Counter()
            total = self.totals[label] - sum(minus.values())
            denom = math.log(total + self.alpha * v)
            out[label] = sum(c * (math.log(counts[g] - minus[g] + self.alpha) - denom) for g, c in grams.items())
        return out

    def predict(self, text: str, leave_out: tuple[str, str] | None = None) -> str:
        scores = self.scores(text, leave_out)
        return max(sorted(scores), key=lambda label: scores[label])


def attribute(training: dict[str, Sequence[str]], outputs: dict[str, Sequence[str]]) -> dict[str, list[str]]:
    """Class predicted for every reply of every model.

    A model whose name is also a class trained on exactly its own outputs (the base) is scored
    leave-one-out: each of its replies is classified with that reply removed from the training
    counts, so no reply is ever classified by a model that saw it.
    """
    clf = CharNgramNB().fit(training)
    predictions = {}
    for model, texts in outputs.items():
        held_in = model in training and list(training[model]) == list(texts)
        predictions[model] = [clf.predict(t, (model, t) if held_in else None) for t in texts]
    return predictions


def attribution_accuracy(predictions: Sequence[str], own: str | None) -> float | None:
    """Share of a model's replies attributed to its own class; None when it has no class or replies."""
    if own is None or not predictions:
        return None
    return sum(p == own for p in predictions) / len(predictions)


# ---- one model's summary -------------------------------------------------------------------

@dataclass
class Reference:
    """A persona's training replies, prepared once for style distance and memorisation."""

    profile: StyleProfile
    copies: CopyIndex

    @classmethod
    def of(cls, replies: Sequence[str]) -> Reference:
        return cls(style_profile(replies), CopyIndex(replies))


@dataclass
class ModelMetrics:
    """Every summary number of one model on one prompt set (see `summarize`)."""

    n: int
    mean_length: float
    median_length: float
    too_short: int
    keyword_any: float | None
    keyword_fraction: float | None
    keyword_misses: int
    keyword_prompts: int
    distinct_2: float | None
    loops: int
    cut_off: int
    retried: int
    style: StyleDistance | None
    exact_copies: int | None
    near_copies: int | None
    marker_rate: float | None
    lengths: list[int]
    flags: list[list[str]]


def summarize(
    texts: Sequence[str],
    keywords: Sequence[Sequence[str]],
    *,
    hit_limit: Sequence[bool],
    retried: Sequence[bool],
    reference: Reference | None,
    markers: Sequence[re.Pattern[str]] | None,
    too_short_units: int,
) -> ModelMetrics:
    """All metrics of one model's replies; reference-based ones are None without a reference."""
    lengths = [length(t) for t in texts]
    short = [is_too_short(t, too_short_units) for t in texts]
    loops = [has_loop(t) for t in texts]
    kinds = copy_kinds(texts, reference.copies) if reference else [None] * len(texts)
    hits = [keyword_hits(t, k) if k else None for t, k in zip(texts, keywords)]
    flags = []
    for i in range(len(texts)):
        f = []
        if short[i]:
            f.append("too short")
        if hits[i] == 0:
            f.append("no keyword")
        if loops[i]:
            f.append("loop")
        if hit_limit[i]:
            f.append("cut off at the token limit")
        if retried[i]:
            f.append("regenerated (too short)")
        if kinds[i]:
            f.append(f"{kinds[i]} copy of a training reply")
        if markers and marker_hit(texts[i], markers):
            f.append("persona marker")
        flags.append(f)
    any_kw, frac_kw = keyword_coverage(texts, keywords)
    return ModelMetrics(
        n=len(texts),
        mean_length=statistics.fmean(lengths) if lengths else 0.0,
        median_length=statistics.median(lengths) if lengths else 0.0,
        too_short=sum(short),
        keyword_any=any_kw,
        keyword_fraction=frac_kw,
        keyword_misses=sum(h == 0 for h in hits),
        keyword_prompts=sum(h is not None for h in hits),
        distinct_2=distinct_n(texts, 2),
        loops=sum(loops),
        cut_off=sum(bool(h) for h in hit_limit),
        retried=sum(bool(r) for r in retried),
        style=style_distance(texts, reference.profile) if reference else None,
        exact_copies=kinds.count("exact") if reference else None,
        near_copies=kinds.count("near") if reference else None,
        marker_rate=marker_rate(texts, markers) if markers else None,
        lengths=lengths,
        flags=flags,
    )
