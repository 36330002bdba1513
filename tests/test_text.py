"""personakit.text: CJK detection, language, particles, the normalisation key and the trigram index."""
from __future__ import annotations

import time

import pytest

from personakit import text


def test_cjk_characters_are_found_in_every_range():
    # basic block, extension A, compatibility ideograph, kana; full-width latin is not CJK
    assert [bool(text.CJK_CHAR.fullmatch(c)) for c in "好㐀豈のＡa，"] == [True, True, True, True, False, False, False]
    assert text.CJK_RUN.findall("我的猫 likes 晒太阳") == ["我的猫", "晒太阳"]


@pytest.mark.parametrize("message, language", [
    ("我准备考研但很焦虑", "zh"),
    ("我想买个iPhone 15 Pro Max", "zh"),     # brand names do not make a Chinese message English
    ("这个bug怎么fix啊", "zh"),
    ("I met 小雨 at the cafe yesterday", "en"),  # a Chinese name does not make an English message Chinese
    ("Have you tried 火锅 before?", "en"),
    ("I can't stop scrolling", "en"),
    ("", "en"),
    ("12345 !!!", "en"),
])
def test_language_counts_a_chinese_character_like_an_english_word(message, language):
    assert text.language_of(message) == language
    assert text.is_chinese(message) == (language == "zh")


def test_language_of_a_set_pools_every_text():
    assert text.language_of(["我准备考研但很焦虑", "hi"]) == "zh"
    assert text.language_of(["I can't stop scrolling", "困"]) == "en"
    assert text.cjk_share(["好的", "ok"]) == pytest.approx(2 / 3)


def test_particles_are_single_units_in_both_languages():
    assert all(text.is_particle(u) for u in ["啊", "呢", "lol", "LOL", "hahaha", "hmm", "hehe", "ok"])
    assert not any(text.is_particle(u) for u in ["他", "好", "he", "the", "home", "love"])


def test_only_particles_means_a_reply_with_no_content():
    assert all(text.only_particles(c) for c in ["嗯嗯", "哈哈哈", "lolok", "好的呀", "收到", "hmmokay", "no"])
    assert not any(text.only_particles(c) for c in ["好累", "晚安", "hello", "sure"])


def test_long_laughter_followed_by_a_word_is_answered_at_once():
    # nested repeats would try every way of splitting "hahaha...": 2x slower per "ha"
    start = time.perf_counter()
    for unit in ("ha", "he", "hm", "m", "ah", "ok", "哈"):
        assert not text.only_particles(unit * 200 + "x")
    assert time.perf_counter() - start < 0.5


def test_normal_key_ignores_width_case_spacing_punctuation_and_emoji():
    assert text.normal_key("ＴＯＤＡＹ 好累！") == text.normal_key("today好累") == "today好累"
    assert text.normal_key("好的~") == text.normal_key("好的！") == text.normal_key("好的😊") == "好的"
    assert text.normal_key("That's  OK, I guess...") == "thatsokiguess"
    assert text.normal_key("Straße") == text.normal_key("STRASSE")


def test_trigrams_of_short_and_empty_keys():
    assert text.char_trigrams("abcd") == {"abc", "bcd"}
    assert text.char_trigrams("ab") == {"ab"}
    assert text.char_trigrams("") == frozenset()


def test_trigram_index_finds_similar_chinese_and_only_similar():
    index = text.TrigramIndex(0.8)
    index.add("好哦早点睡晚安我也要去敷面膜了然后大概率会刷手机到一点")
    assert index.contains_similar("好哦早点睡晚安我也要去敷面膜了然后大概率会刷手机到两点")
    assert not index.contains_similar("先去洗个热水澡早点睡明天的你会更有力气的")
    assert not index.contains_similar("")


def test_trigram_index_on_english_matches_the_exact_jaccard():
    kept = text.normal_key("Put your phone in another room and take a walk tonight")
    index = text.TrigramIndex(0.6, [kept])
    close = text.normal_key("Put your phone in another room, then take a walk tonight!")
    far = text.normal_key("Honestly just delete the app and go to sleep early")
    for query in (close, far):
        a, b = text.char_trigrams(query), text.char_trigrams(kept)
        assert index.contains_similar(query) == (len(a & b) / len(a | b) >= 0.6)
    assert index.contains_similar(close) and not index.contains_similar(far)
    assert text.TrigramIndex(1.0, [kept]).contains_similar(kept)


def test_trigram_index_rejects_a_threshold_outside_0_1():
    with pytest.raises(ValueError):
        text.TrigramIndex(0)
