"""Every shipped dataset, prompt set and persona definition is valid and usable."""
from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT
from personakit.data import read_jsonl

PERSONAS = ("girl", "jiangjian", "peixuan")
DATA = ROOT / "data"
PERSONA_DEFS = json.loads((DATA / "personas.json").read_text(encoding="utf-8"))


def dataset(lang: str, persona: str):
    return read_jsonl((DATA if lang == "zh" else DATA / "en") / f"{persona}.jsonl")


@pytest.mark.parametrize("lang,minimum", [("zh", 300), ("en", 200)])
@pytest.mark.parametrize("persona", PERSONAS)
def test_persona_dataset_is_valid_and_large_enough(lang, minimum, persona):
    rows = dataset(lang, persona)
    assert len(rows) >= minimum
    assert any(r.get("history") for r in rows), "some rows carry history"
    outputs = [r["output"] for r in rows]
    assert len(set(outputs)) == len(outputs), "no duplicate replies"
    pairs = {(r["instruction"], r["output"]) for r in rows}
    assert len(pairs) == len(rows)


@pytest.mark.parametrize("lang", ["zh", "en"])
@pytest.mark.parametrize("persona", PERSONAS)
def test_persona_markers_are_carried_by_most_replies(lang, persona):
    markers = [re.compile(m, re.IGNORECASE) for m in PERSONA_DEFS[persona]["markers"][lang]]
    rows = dataset(lang, persona)
    share = sum(any(m.search(r["output"]) for m in markers) for r in rows) / len(rows)
    assert share >= 0.85


@pytest.mark.parametrize("path", ["prompts.jsonl", "en/prompts.jsonl"])
def test_prompt_sets_cover_every_category(path):
    lines = (DATA / path).read_text(encoding="utf-8").splitlines()
    prompts = [json.loads(line) for line in lines if line.strip()]
    assert len(prompts) >= 16
    assert len({p["id"] for p in prompts}) == len(prompts)
    categories = {p["category"] for p in prompts}
    assert {"emotional", "action", "advice", "teasing", "short", "multiturn"} <= categories
    assert all(isinstance(p["keywords"], list) for p in prompts)
    assert all(p.get("history") for p in prompts if p["category"] == "multiturn")


def test_chinese_prompt_set_has_the_seed_examples():
    prompts = {p["prompt"]: p for p in map(json.loads, (DATA / "prompts.jsonl").read_text(encoding="utf-8").splitlines())}
    exam = prompts["我准备考研但很焦虑。给我一个今晚能做的最小行动，再说一句鼓励的话。"]
    phone = prompts["我一直刷手机停不下来。给我一个现在就能执行的动作，并说明为什么有效。"]
    assert exam["keywords"] == ["考研", "焦虑", "今晚"]
    assert phone["keywords"] == ["刷手机", "停不下来", "现在"]


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_personas_are_told_apart_by_a_char_ngram_classifier(lang):
    from personakit.metrics import CharNgramNB

    train, held_out = {}, {}
    for persona in PERSONAS:
        outputs = [r["output"] for r in dataset(lang, persona)]
        train[persona], held_out[persona] = outputs[: -40], outputs[-40:]
    classifier = CharNgramNB().fit(train)
    accuracy = {p: sum(classifier.predict(t) == p for t in texts) / len(texts) for p, texts in held_out.items()}
    # Chance is 1/3; short question-back replies (peixuan) are the hardest to tell apart.
    assert min(accuracy.values()) >= 0.7, accuracy
    assert sum(accuracy.values()) / len(accuracy) >= 0.85, accuracy


# Fresh personas and prompts judge the default recipe; they were never used to choose it.
FRESH = ("marco", "dana")
FRESH_DIR = DATA / "en" / "fresh"


def fresh_prompts() -> list[dict]:
    return [json.loads(line) for line in (FRESH_DIR / "prompts.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


# Written for issue 34: personas whose style competes with the question's words; levers are chosen on
# the tuning ones (data/en/tuning/) and judged on the held-out ones (data/en/fresh2/).
TUNING_DIR, FRESH2_DIR = DATA / "en" / "tuning", DATA / "en" / "fresh2"
SMALL = [(FRESH_DIR, p) for p in FRESH] + [(TUNING_DIR, "rex"), (FRESH2_DIR, "hal"), (FRESH2_DIR, "jaz")]


@pytest.mark.parametrize("folder,persona", SMALL)
def test_fresh_persona_is_small_valid_and_carries_its_habit(folder, persona):
    rows = read_jsonl(folder / f"{persona}.jsonl")
    assert 100 <= len(rows) <= 150
    with_history = [r for r in rows if r.get("history")]
    assert 0.1 <= len(with_history) / len(rows) <= 0.2 and all(1 <= len(r["history"]) <= 2 for r in with_history)
    outputs = [r["output"] for r in rows]
    assert len(set(outputs)) == len(outputs) and len({r["instruction"] for r in rows}) == len(rows), "no duplicates"
    markers = [re.compile(m, re.IGNORECASE) for m in PERSONA_DEFS[persona]["markers"]["en"]]
    assert sum(any(m.search(o) for m in markers) for o in outputs) / len(rows) >= 0.85
    assert PERSONA_DEFS[persona]["system"]["en"]


def _stems(text: str) -> set[str]:
    return {w[:5] for w in re.findall(r"[a-z]{4,}", text.lower())}


@pytest.mark.parametrize("folder,persona", SMALL)
def test_small_persona_replies_answer_the_question(folder, persona):
    """However strong the style, the replies name what was asked: a recipe can learn to answer from them."""
    asked = [r for r in read_jsonl(folder / f"{persona}.jsonl") if len(r["instruction"].split()) > 2]
    answered = [r for r in asked if _stems(r["instruction"]) & _stems(r["output"])]
    assert len(answered) / len(asked) >= 0.85


def test_levers_prompt_set_is_held_out_from_every_dataset():
    prompts = [json.loads(line) for line in (FRESH2_DIR / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert 12 <= len(prompts) <= 16 and len({p["id"] for p in prompts}) == len(prompts)
    assert {"emotional", "action", "advice", "teasing", "short", "multiturn"} <= {p["category"] for p in prompts}
    assert all(p["keywords"] for p in prompts if p["category"] != "short")
    seen = set()
    for path in [*DATA.glob("**/*.jsonl")]:
        if path.name == "prompts.jsonl" and path.parent != FRESH2_DIR:
            seen |= {json.loads(line)["prompt"].lower() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
        elif path.name != "prompts.jsonl" and "raw" not in path.parts:
            seen |= {r["instruction"].lower() for r in read_jsonl(path)}
    assert not [p["prompt"] for p in prompts if p["prompt"].lower() in seen]


def test_fresh_prompt_set_is_held_out_from_every_dataset():
    prompts = fresh_prompts()
    assert 12 <= len(prompts) <= 16 and len({p["id"] for p in prompts}) == len(prompts)
    assert {"emotional", "action", "advice", "teasing", "short", "multiturn"} <= {p["category"] for p in prompts}
    assert all(p["keywords"] for p in prompts if p["category"] != "short")
    assert all(p.get("history") for p in prompts if p["category"] == "multiturn")
    seen = {json.loads(line)["prompt"] for line in (DATA / "en" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()}
    for path in [*(DATA / "en").glob("*.jsonl"), *FRESH_DIR.glob("*.jsonl")]:
        if path.name != "prompts.jsonl":
            seen |= {r["instruction"].lower() for r in read_jsonl(path)}
    assert not [p["prompt"] for p in prompts if p["prompt"] in seen or p["prompt"].lower() in seen]


def test_fresh_personas_are_told_apart_from_each_other_and_the_demo_ones():
    from personakit.metrics import CharNgramNB

    train, held_out = {}, {}
    for persona in FRESH:
        outputs = [r["output"] for r in read_jsonl(FRESH_DIR / f"{persona}.jsonl")]
        train[persona], held_out[persona] = outputs[:-30], outputs[-30:]
    for persona in PERSONAS:
        train[persona] = [r["output"] for r in dataset("en", persona)]
    classifier = CharNgramNB().fit(train)
    accuracy = {p: sum(classifier.predict(t) == p for t in held_out[p]) / 30 for p in FRESH}
    assert min(accuracy.values()) >= 0.9, accuracy
