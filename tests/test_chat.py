"""chat.py through its real CLI on the tiny model: memory, retrieval, commands, modes, switching, bad input."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import sys

import pytest

import chat
from personakit.data import read_jsonl
from personakit.errors import UserError
from personakit.generation import FULLER_HINT
from personakit.memory import bm25_scores, fit_to_budget, memory_window, retrieve
from personakit.template import build_messages, prompt_ids, render_text

GIRL_SYSTEM = "You are girl, chatting with a close friend."
PEIXUAN_SYSTEM = "You are peixuan, chatting with a close friend."
PROMPT = re.compile(r"--- prompt \((\d+) tokens\) ---\n(.*?)--- end of prompt ---", re.S)


def run_chat(monkeypatch, capsys, root, *argv, stdin=None):
    """Run `python chat.py --adapters-root ROOT --max-new-tokens 8 ARGV` with `stdin` piped in."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin if isinstance(stdin, io.StringIO) else io.StringIO(stdin))
    code = chat.main(chat.parse_args(["--adapters-root", str(root), "--max-new-tokens", "8", *argv]))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def conversations(monkeypatch, tmp_path):
    """Saved sessions go to each test's own folder, never the repository's conversations/."""
    monkeypatch.setattr(chat, "CONVERSATIONS", tmp_path / "conversations")
    return tmp_path / "conversations"


def prompts(out):
    return [(int(n), text) for n, text in PROMPT.findall(out)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def load_spy(monkeypatch):
    """Record every base load and every adapter activation, passing through to the real functions."""
    import personakit.chat_session
    import personakit.loading

    calls = {"load_base": [], "use_adapter": []}
    real_load, real_use = personakit.loading.load_base, personakit.chat_session.use_adapter

    def load_base(base, **kwargs):
        calls["load_base"].append(base)
        return real_load(base, **kwargs)

    @contextlib.contextmanager
    def use_adapter(model, name):
        with real_use(model, name) as active:
            base = active.get_base_model() if hasattr(active, "get_base_model") else active
            calls["use_adapter"].append((name, getattr(active, "active_adapter", None), id(base)))
            yield active

    monkeypatch.setattr(personakit.loading, "load_base", load_base)
    monkeypatch.setattr(personakit.chat_session, "use_adapter", use_adapter)
    return calls


# memory: pure functions

HISTORY = [
    ("My cat is called Biscuit and she hates rain.", "Biscuit sounds adorable!"),
    ("I have a chemistry exam on Friday.", "You will do great."),
    ("The weather is grey today.", "Perfect for tea."),
    ("I ate noodles for lunch.", "Yum, which kind?"),
    ("Work was long.", "Rest tonight."),
]


def test_memory_window_is_the_last_n_exchanges_in_order():
    assert memory_window(HISTORY, "hi", 2) == HISTORY[-2:]
    assert memory_window(HISTORY, "hi", 10) == HISTORY
    assert memory_window(HISTORY, "hi", 0) == []


def test_budget_drops_the_oldest_exchanges_exactly(tokenizer):
    def size(memory):
        return len(prompt_ids(tokenizer, build_messages({"instruction": "and you?", "history": memory}, "sys")))

    window = memory_window(HISTORY, "and you?", 4)
    with_two = size(window[-2:])
    assert fit_to_budget(window, size, with_two) == window[-2:]
    assert fit_to_budget(window, size, with_two - 1) == window[-1:]
    assert fit_to_budget(window, size, size(window)) == window
    assert fit_to_budget(window, size, size([]) - 1) == []


def test_retrieval_brings_back_the_relevant_early_turn_in_english_and_chinese():
    window = memory_window(HISTORY, "What was my cat called again?", 2, retrieve_k=1)
    assert window == [HISTORY[0], *HISTORY[-2:]]
    chinese = [("我家的猫叫小白。", "好可爱！"), ("今天下雨了。", "记得带伞。"), ("晚饭吃了面条。", "好吃吗？")]
    assert retrieve(chinese, "你还记得我的猫吗？", k=1, skip_last=1) == [chinese[0]]


def test_retrieval_brings_back_nothing_unrelated():
    assert retrieve(HISTORY, "Do you like jazz?", k=2) == []
    scores = bm25_scores("chemistry exam", [u for u, _ in HISTORY])
    assert scores[1] > 0 and all(s == 0 for i, s in enumerate(scores) if i != 1)


# the CLI

def test_once_prints_one_reply_with_the_persona_prompt(monkeypatch, capsys, tiny_adapters, tokenizer):
    code, out, err = run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", "--once", "hello there", "--show-prompt")
    assert code == 0
    [(n, shown)] = prompts(out)
    system = json.loads((tiny_adapters / "girl" / "persona.json").read_text())["system"]
    messages = build_messages({"instruction": "hello there"}, system)
    assert shown == render_text(tokenizer, messages, generation_prompt=True)
    assert n == len(prompt_ids(tokenizer, messages))
    reply = out[out.index("--- end of prompt ---") + len("--- end of prompt ---"):]
    assert reply.strip() and "girl> " not in reply


def test_persona_uses_the_base_recorded_in_persona_json(monkeypatch, capsys, tiny_adapters, tiny_model_dir, load_spy):
    run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", "--once", "hi")
    assert load_spy["load_base"] == [str(tiny_model_dir.resolve())]


def test_piped_lines_are_messages_and_empty_ones_are_ignored(monkeypatch, capsys, tiny_adapters):
    code, out, _ = run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", "--show-prompt", stdin="hello\n\n   \nhow are you\n")
    assert code == 0
    assert out.count("girl> ") == 2 and len(prompts(out)) == 2
    assert "how are you" in prompts(out)[1][1] and "hello" in prompts(out)[1][1]


def test_empty_once_message_is_refused():
    with pytest.raises(UserError, match="--once message is empty"):
        chat.main(chat.parse_args(["--once", "   "]))


def test_history_reset_help_and_exit(monkeypatch, capsys, tiny_adapters):
    script = "hello\n/history\n/reset\n/history\n/help\n/exit\nnever answered\n"
    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", stdin=script)
    assert out.count("[1] you: hello\n    girl: ") == 1
    assert out.index("[1] you: hello") < out.index("(no exchanges yet)")
    assert "memory cleared" in err and "/save FILE [--force]" in out
    assert out.count("girl> ") == 1


def test_unknown_command_is_reported_and_the_chat_goes_on(monkeypatch, capsys, tiny_adapters):
    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", stdin="/bogus\nhi\n")
    assert "unknown command /bogus" in err and out.count("girl> ") == 1


def test_memory_window_and_budget_in_the_prompt(monkeypatch, capsys, tiny_adapters):
    messages = [f"message number {i} " + "with some padding words " * 3 for i in range(6)]
    script = "\n".join(messages) + "\n"
    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", "--show-prompt",
                           "--memory-turns", "2", stdin=script)
    last = prompts(out)[-1][1]
    assert "message number 3" in last and "message number 4" in last and "message number 2" not in last

    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", "--show-prompt",
                           "--memory-turns", "10", "--max-context", "260", stdin=script)
    shown = prompts(out)
    assert len(shown) == 6 and all(n <= 260 - 8 for n, _ in shown)
    assert "message number 4" in shown[-1][1] and "message number 0" not in shown[-1][1]
    assert "oldest exchange(s) to fit 252 prompt tokens" in err


def test_a_message_too_long_for_the_budget_is_refused_and_the_chat_goes_on(monkeypatch, capsys, tiny_adapters):
    script = "word " * 200 + "\nhi\n"
    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", "--max-context", "100", stdin=script)
    assert "over the budget of 92" in err and out.count("girl> ") == 1


def test_retrieval_mode_brings_back_an_early_turn_that_recent_memory_dropped(monkeypatch, capsys, tiny_adapters):
    script = "My cat is called Biscuit\nThe weather is grey today\nI ate noodles for lunch\nWhat is my cat called?\n"
    args = ("--persona", "girl", "--show-prompt", "--memory-turns", "1")
    _, out, _ = run_chat(monkeypatch, capsys, tiny_adapters, *args, stdin=script)
    assert "Biscuit" not in prompts(out)[-1][1]
    _, out, _ = run_chat(monkeypatch, capsys, tiny_adapters, *args, "--memory", "retrieval", stdin=script)
    last = prompts(out)[-1][1]
    assert "Biscuit" in last and last.index("Biscuit") < last.index("noodles") and "grey" not in last


def test_save_writes_training_rows_and_refuses_to_overwrite(monkeypatch, capsys, tiny_adapters, tmp_path):
    path = tmp_path / "talk.jsonl"
    script = f"hello\nhow are you\n/save {path}\nthird message\n/save {path}\n/history\n"
    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", stdin=script)
    assert "already exists; use /save" in err
    rows = read_jsonl(path)
    assert [r["instruction"] for r in rows] == ["hello", "how are you"]
    assert all(f"    girl: {r['output']}\n" in out for r in rows)
    assert rows[1]["history"] == [["hello", rows[0]["output"]]] and "history" not in rows[0]

    run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", "--no-save", stdin=f"bye\n/save {path} --force\n")
    assert [r["instruction"] for r in read_jsonl(path)] == ["bye"]


def test_switching_persona_keeps_one_base_load(monkeypatch, capsys, tiny_adapters, load_spy):
    script = "hi\n/persona peixuan\nhi\n/persona girl\nhi\n/persona\n"
    _, out, _ = run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", "--show-prompt", stdin=script)
    assert len(load_spy["load_base"]) == 1
    used = load_spy["use_adapter"]
    assert [(name, active) for name, active, _ in used] == [("girl", "girl"), ("peixuan", "peixuan"), ("girl", "girl")]
    assert len({base for _, _, base in used}) == 1
    systems = [text for _, text in prompts(out)]
    assert GIRL_SYSTEM in systems[0] and PEIXUAN_SYSTEM in systems[1] and GIRL_SYSTEM in systems[2]
    assert "personas under" in out and "girl, peixuan (now: girl)" in out


def test_switching_from_the_base_loads_the_adapter_onto_the_same_base(monkeypatch, capsys, tiny_adapters, tiny_model_dir, load_spy):
    script = "hi\n/persona peixuan\nhi\n"
    _, out, _ = run_chat(monkeypatch, capsys, tiny_adapters, "--base", str(tiny_model_dir), stdin=script)
    assert len(load_spy["load_base"]) == 1
    assert [name for name, _, _ in load_spy["use_adapter"]] == [None, "peixuan"]
    assert out.count("base> ") == 1 and out.count("peixuan> ") == 1


def test_base_command_disables_the_adapter_and_uses_only_the_given_system(monkeypatch, capsys, tiny_adapters, tokenizer, load_spy):
    script = "/base\nhi\n"
    _, out, _ = run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", "--show-prompt", stdin=script)
    assert load_spy["use_adapter"][-1][0] is None
    assert prompts(out)[0][1] == render_text(tokenizer, build_messages({"instruction": "hi"}, None), generation_prompt=True)
    _, out, _ = run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", "--show-prompt", "--system", "Be brief.", stdin=script)
    shown = prompts(out)[0][1]
    assert "Be brief." in shown and GIRL_SYSTEM not in shown and "base> " in out


def test_short_reply_is_regenerated_once_asking_for_more(monkeypatch, capsys, tiny_adapters):
    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", "--show-prompt",
                           "--min-reply-chars", "10000", "--once", "hi")
    shown = prompts(out)
    assert len(shown) == 2 and FULLER_HINT["en"] in shown[1][1] and FULLER_HINT["en"] not in shown[0][1]
    assert err.count("asked once more for a fuller answer") == 1


class CtrlCAtReply(io.StringIO):
    """A terminal whose user presses Ctrl-C as soon as the first reply starts printing."""

    def __init__(self):
        super().__init__()
        self.pressed = False

    def write(self, text):
        if not self.pressed and text.startswith("girl> "):
            self.pressed = True
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(text)


def test_ctrl_c_stops_the_reply_not_the_chat(monkeypatch, capsys, tiny_adapters):
    term = CtrlCAtReply()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/history\nagain\n/history\n"))
    before = signal.getsignal(signal.SIGINT)
    code = chat.main(chat.parse_args(["--adapters-root", str(tiny_adapters), "--persona", "girl", "--max-new-tokens", "32"]))
    out, err = term.getvalue(), capsys.readouterr().err
    assert code == 0 and term.pressed
    assert err.count("(stopped; the partial reply is not kept in memory)") == 1
    assert out.count("girl> ") == 2 and "you: hello" not in out
    assert out.index("(no exchanges yet)") < out.index("[1] you: again")
    assert signal.getsignal(signal.SIGINT) is before

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    chat.main(chat.parse_args(["--adapters-root", str(tiny_adapters), "--persona", "girl", "--max-new-tokens", "32", "--no-save", "--once", "hello"]))
    partial, full = out.split("\n", 1)[0].removeprefix("girl> ").strip(), sys.stdout.getvalue().strip()
    assert full.startswith(partial) and len(partial) < len(full)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_session_prompts_and_leaves_cleanly_on_eof(monkeypatch, capsys, tiny_adapters):
    code, out, _ = run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", stdin=Terminal("hi\n"))
    assert code == 0 and out.count("you> ") == 2 and out.count("girl> ") == 1


# bad input

def test_unknown_persona_lists_the_ones_found(tiny_adapters):
    with pytest.raises(UserError, match=r"no persona named 'nobody'.*found: girl, peixuan"):
        chat.main(chat.parse_args(["--adapters-root", str(tiny_adapters), "--persona", "nobody"]))


@pytest.mark.parametrize("missing", ["persona.json", "adapter_model.safetensors"])
def test_incomplete_adapter_folder_is_refused(tiny_adapters, tmp_path, missing, load_spy):
    folder = shutil.copytree(tiny_adapters / "girl", tmp_path / "girl")
    (folder / missing).unlink()
    with pytest.raises(UserError, match=f"not a persona adapter folder \\(missing {missing}\\)"):
        chat.main(chat.parse_args(["--adapter", str(folder), "--once", "hi"]))
    assert load_spy["load_base"] == []


def test_base_mismatch_is_refused_unless_allowed(monkeypatch, capsys, tiny_adapters, tiny_model_dir, tmp_path):
    other = shutil.copytree(tiny_model_dir, tmp_path / "other-base")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "note": "another checkpoint"}))
    with pytest.raises(UserError, match="was trained on base .* pass --base"):
        chat.main(chat.parse_args(["--adapters-root", str(tiny_adapters), "--persona", "girl", "--base", str(other), "--once", "hi"]))
    code, out, _ = run_chat(monkeypatch, capsys, tiny_adapters, "--persona", "girl", "--base", str(other),
                            "--allow-base-mismatch", "--once", "hi")
    assert code == 0 and out.strip()


def test_switching_to_a_persona_of_another_base_is_refused(monkeypatch, capsys, tiny_adapters, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(tiny_adapters / "girl", root / "girl")
    stranger = shutil.copytree(tiny_adapters / "peixuan", root / "stranger")
    meta = json.loads((stranger / "persona.json").read_text())
    meta.update(persona="stranger", base={"id": "/elsewhere/model", "fingerprint": "0" * 16})
    (stranger / "persona.json").write_text(json.dumps(meta))
    _, out, err = run_chat(monkeypatch, capsys, root, "--persona", "girl", stdin="/persona stranger\nhi\n")
    assert "was trained on base /elsewhere/model" in err and out.count("girl> ") == 1
    _, out, _ = run_chat(monkeypatch, capsys, root, "--persona", "girl", "--allow-base-mismatch", stdin="/persona stranger\nhi\n")
    assert out.count("stranger> ") == 1


# the embedded model end to end

def test_embedded_persona_replies_with_text(monkeypatch, capsys, embedded_adapter):
    code, out, err = run_chat(monkeypatch, capsys, embedded_adapter.parent, "--adapter", str(embedded_adapter),
                              "--once", "Hi! How was your day?")
    assert code == 0 and re.search(r"\w", out)
    assert "embedded:SmolLM2-135M-Instruct" in err
