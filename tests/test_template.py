"""The make-or-break rule: inference prompt is a token prefix of training, supervision = reply + end-of-turn."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from conftest import CHATML
from personakit.errors import UserError
from personakit.template import IGNORE_INDEX, build_messages, encode_example, end_of_turn_id, prompt_ids, require_chat_template, show_example

ROWS = [
    {"instruction": "I can't stop scrolling on my phone.", "output": "Put it in the kitchen and set a 10 minute timer (I need this too)!"},
    {"instruction": "我准备考研但很焦虑", "output": "今晚先列三个小目标，加油！（其实我也会慌）",
     "history": [["在吗", "在的"], ["最近好累", "抱抱，先睡够"]]},
    {"instruction": "hey", "output": "hey, eaten yet?", "system": "You are Peixuan."},
]


@pytest.fixture(scope="module", params=["tiny", "embedded", "qwen_chatml"])
def tokenizer(request, tiny_model_dir, embedded_dir):
    if request.param == "tiny":
        return AutoTokenizer.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    if request.param == "qwen_chatml":
        # Qwen1.5/Qwen2 chat template: ChatML with its own default system prompt.
        tok.chat_template = CHATML
    return tok


@pytest.mark.parametrize("row", ROWS, ids=["plain", "history", "row_system"])
@pytest.mark.parametrize("system", [None, "You are Mia, a warm friend."])
def test_prompt_is_prefix_and_labels_are_reply_plus_eot(tokenizer, row, system):
    enc = encode_example(tokenizer, row, system)
    prompt = prompt_ids(tokenizer, build_messages(row, system))
    assert enc.input_ids[: len(prompt)] == prompt
    supervised = [t for t in enc.labels if t != IGNORE_INDEX]
    assert supervised == enc.input_ids[len(prompt):]
    assert supervised[-1] == end_of_turn_id(tokenizer)
    assert tokenizer.decode(supervised[:-1]).strip() == row["output"]
    assert all(t == IGNORE_INDEX for t in enc.labels[: len(prompt)])


def test_system_prompt_and_history_are_rendered(tokenizer):
    enc = encode_example(tokenizer, ROWS[1], "You are Mia.")
    text = show_example(tokenizer, enc)
    assert "You are Mia." in text and "最近好累" in text and "抱抱，先睡够" in text
    assert text.endswith(ROWS[1]["output"] + tokenizer.decode([end_of_turn_id(tokenizer)]) + "]]")


def test_row_system_overrides_default(tokenizer):
    messages = build_messages(ROWS[2], "default system")
    assert messages[0] == {"role": "system", "content": "You are Peixuan."}


def test_tokenizer_without_chat_template_is_an_error(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        require_chat_template(tok)
    with pytest.raises(UserError, match="chat_template"):
        encode_example(tok, ROWS[0], None)
