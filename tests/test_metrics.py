"""personakit.metrics on hand-made replies with known answers, Chinese and English."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from personakit import metrics as m

ROOT = Path(__file__).resolve().parents[1]

PERSONAS = json.loads((ROOT / "data" / "personas.json").read_text(encoding="utf-8"))


# ---- units and lengths ---------------------------------------------------------------------

def test_units_count_cjk_characters_and_latin_words():
    assert m.units("Hello, I'm here! 你好呀～") == ["hello", "i'm", "here", "你", "好", "呀"]
    assert m.length("先睡一觉吧。") == 5
    assert m.length("Go to bed early, okay?") == 5
    assert m.length("") == 0


def test_too_short_uses_units_in_both_languages():
    assert m.is_too_short("好的", 5) and m.is_too_short("ok sure", 5) and m.is_too_short("", 5)
    assert not m.is_too_short("那你每天看多长时间", 5)
    assert not m.is_too_short("Put the phone in another room.", 5)


# ---- keywords, diversity, loops ------------------------------------------------------------

def test_keyword_coverage_counts_prompts_with_keywords_only():
    replies = ["今晚先背十个单词，别焦虑。", "去睡觉吧", "Put your PHONE in the kitchen now.", "whatever"]
    keywords = [["考研", "焦虑", "今晚"], [], ["phone", "scrolling", "now"], ["exam"]]
    hit_any, share = m.keyword_coverage(replies, keywords)
    assert hit_any == pytest.approx(2 / 3)
    assert share == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert m.keyword_coverage(["anything"], [[]]) == (None, None)


def test_distinct_2_counts_bigrams_within_each_reply():
    assert m.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert m.distinct_n(["哈哈哈哈"], 2) == pytest.approx(1 / 3)
    assert m.distinct_n(["you got this", "you got this"], 2) == pytest.approx(2 / 4)
    assert m.distinct_n(["我", "ok"], 2) is None


def test_loops_are_recurring_phrases_or_long_stutters():
    assert m.has_loop("I am here for you. You can do it. I am here for you. Sleep. I am here for you.")
    assert m.has_loop("你可以的你可以的你可以的")
    assert m.has_loop("I am here. I am here. I am here. I am here.")
    assert m.has_loop("哈" * 12)
    # Laughter and a phrase said twice are style, not loops.
    assert not m.has_loop("哈" * 8)
    assert not m.has_loop("I am here for you. I am here for you.")
    assert not m.has_loop("你可以先把手机放远一点，你可以去洗个澡，你可以早点睡。")
    assert not m.has_loop("Put the phone in another room, drink some water, then take a shower.")


# ---- memorisation --------------------------------------------------------------------------

TRAINING = [
    "That night-before panic is so normal, and you know more than you think.",
    "丧的时候就先躺一躺吧，不用逼自己振作～要不要吃点好吃的？",
    "ok",
]


def test_memorisation_exact_near_and_none():
    replies = [
        "that night before panic is so normal and you know more than you think",  # case/punctuation only
        "丧的时候就先躺一躺吧，不用逼自己振作～要不要吃点好喝的？",  # one character changed
        "Take a walk outside and call a friend tonight.",
        "OK!",  # too short to count as a copy
    ]
    assert m.copy_kinds(replies, TRAINING) == ["exact", "near", None, None]


# ---- style distance ------------------------------------------------------------------------

GIRL = [
    "抱抱你～先去洗个热水澡早点睡吧（我上次也是这样熬过来的）加油！",
    "哈哈确实麻烦……先煮个面加个蛋，十分钟搞定（我懒的时候也这样）你可以的！",
    "丧的时候就先躺一躺吧～要不要吃点好吃的（我也是这样续命的哈哈）抱抱",
    "你已经很努力了呀，先把今天的一小块做完（我也常拖延哈哈）加油！",
]
PEIXUAN = ["吃饭了没？", "先睡觉。明天再说？", "几点了还不睡？", "作业写完没？"]


def test_style_distance_is_zero_for_identical_distributions():
    shuffled = GIRL[:]
    random.Random(0).shuffle(shuffled)
    d = m.style_distance(shuffled, GIRL)
    assert d.combined == pytest.approx(0.0, abs=1e-9)
    assert set(d.components) == set(m.STYLE_COMPONENTS)
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in d.components.values())


def test_style_distance_separates_personas_and_stays_in_range():
    near_girl = ["别太焦虑啦～先把书桌收拾一下（我也经常乱成一团哈哈）加油！", "抱抱～今晚早点睡吧（熬夜真的会变笨哈哈）你可以的！"]
    to_girl = m.style_distance(near_girl, GIRL)
    to_peixuan = m.style_distance(near_girl, PEIXUAN)
    assert to_girl.combined < to_peixuan.combined
    for d in (to_girl, to_peixuan):
        assert 0.0 <= d.combined <= 1.0 and all(0.0 <= v <= 1.0 for v in d.components.values())
    assert m.style_distance([], GIRL) is None


def test_style_components_see_length_punctuation_and_emoji():
    a = ["Sure!! 😂 lol", "omg yes!! 😂"]
    b = ["I would suggest a short walk, followed by a glass of water and an early night.",
         "Consider writing the three most important tasks on paper, then starting with the first one."]
    d = m.style_distance(a, b)
    assert d.components["length"] == pytest.approx(1.0)
    assert d.components["emoji"] == pytest.approx(1.0)
    assert d.components["punctuation"] > 0.5
    assert d.combined > 0.6


# ---- persona markers -----------------------------------------------------------------------

def test_marker_rate_uses_the_persona_regexes_case_insensitively():
    girl_zh = m.compile_markers(PERSONAS["girl"]["markers"]["zh"])
    assert m.marker_rate(["先睡吧（我也是这样）", "加油", "去吃饭"], girl_zh) == pytest.approx(2 / 3)
    girl_en = m.compile_markers(PERSONAS["girl"]["markers"]["en"])
    assert m.marker_rate(["YOU'VE GOT THIS", "Go to sleep."], girl_en) == pytest.approx(1 / 2)
    peixuan_en = m.compile_markers(PERSONAS["peixuan"]["markers"]["en"])
    assert m.marker_rate(["Did you eat?", "Eat first."], peixuan_en) == pytest.approx(1 / 2)
    assert m.marker_rate(["x"], []) is None


# ---- attribution ---------------------------------------------------------------------------

def test_attribution_puts_separable_personas_on_their_own_rows():
    training = {
        "girl": GIRL,
        "peixuan": PEIXUAN,
        "jiangjian": ["I usually make a plan the night before.", "When I was in my second year I did the same, so I just start small.",
                      "What I do is set a timer for twenty five minutes.", "I normally eat in the canteen at noon."],
    }
    outputs = {
        "girl": ["别怕～先洗个澡早点睡（我也常这样哈哈）加油！", "抱抱～吃点好吃的吧（我也是这样哈哈）你可以的"],
        "peixuan": ["睡了没？", "饭吃了没？"],
        "jiangjian": ["I usually study in the library when I was in my first year.", "What I do is make a list the night before."],
    }
    predictions = m.attribute(training, outputs)
    for name, predicted in predictions.items():
        assert m.attribution_accuracy(predicted, name) == 1.0
    assert m.attribution_accuracy(predictions["girl"], None) is None


def test_attribution_scores_a_class_trained_on_its_own_outputs_leave_one_out():
    # The base's second reply looks like peixuan. A classifier that had seen it would call it
    # base; scored leave-one-out it cannot lean on having seen the very reply it classifies.
    base_replies = ["Here are five tips to manage stress: 1. Breathe deeply. 2. Exercise regularly.", "饭呢？"]
    training = {"base": base_replies, "girl": GIRL, "peixuan": PEIXUAN}
    assert m.CharNgramNB().fit(training).predict(base_replies[1]) == "base"
    predictions = m.attribute(training, {"base": base_replies})
    assert predictions["base"] == ["base", "peixuan"]
    assert m.attribution_accuracy(predictions["base"], "base") == 0.5


# ---- one model's summary -------------------------------------------------------------------

def test_summarize_counts_and_flags_every_reply():
    texts = ["That night-before panic is so normal, and you know more than you think.", "ok", "I am here. I am here. I am here. I am here."]
    keywords = [["panic"], [], ["exam"]]
    girl_en = m.compile_markers(PERSONAS["girl"]["markers"]["en"])
    s = m.summarize(texts, keywords, hit_limit=[False, False, True], retried=[False, True, False],
                    reference=m.Reference.of(TRAINING), markers=girl_en, too_short_units=5)
    assert (s.n, s.too_short, s.loops, s.cut_off, s.retried, s.exact_copies, s.near_copies) == (3, 1, 1, 1, 1, 1, 0)
    assert s.lengths == [14, 1, 12] and s.median_length == 12
    assert (s.keyword_any, s.keyword_misses, s.keyword_prompts) == (0.5, 1, 2)
    assert s.flags[0] == ["exact copy of a training reply"]
    assert s.flags[1] == ["too short", "regenerated (too short)"]
    assert s.flags[2] == ["no keyword", "loop", "cut off at the token limit"]
    assert s.marker_rate == 0.0
    bare = m.summarize(texts, keywords, hit_limit=[False] * 3, retried=[False] * 3, reference=None, markers=None, too_short_units=5)
    assert bare.style is None and bare.exact_copies is None and bare.marker_rate is None
