"""Memory that lasts: saved sessions (resume, crash safety, corrupt lines, the lock, /forget,
--no-save), summary memory and retrieval over a saved session, through chat.py's real CLI on the
tiny model."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import chat
from personakit.conversations import ConversationStore, Exchange, read_session
from personakit.errors import UserError
from personakit.summary import NOTE_CLOSE, NOTE_OPEN, cut_to_tokens, fold_into_note, with_note

ROOT = Path(__file__).resolve().parents[1]
PROMPT = re.compile(r"--- prompt \((\d+) tokens\) ---\n(.*?)--- end of prompt ---", re.S)
SUMMARY_PROMPT = re.compile(r"--- summary prompt \((\d+) tokens\) ---\n(.*?)--- end of summary prompt ---", re.S)


@pytest.fixture()
def conversations(tmp_path):
    return tmp_path / "conversations"


def run_chat(monkeypatch, capsys, adapters, conversations, *argv, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = chat.main(chat.parse_args([
        "--adapters-root", str(adapters), "--conversations-root", str(conversations), "--persona", "girl",
        "--max-new-tokens", "8", *argv,
    ]))
    out, err = capsys.readouterr()
    return code, out, err


def prompts(out):
    return [text for _, text in PROMPT.findall(out)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# saved sessions

def test_the_next_run_resumes_the_session(monkeypatch, capsys, tiny_adapters, conversations):
    _, _, err = run_chat(monkeypatch, capsys, tiny_adapters, conversations, stdin="My cat is called Biscuit\nhello\n")
    path = conversations / "girl" / "default.jsonl"
    assert "session 'default': new" in err
    assert [e.user for e in read_session(path).exchanges] == ["My cat is called Biscuit", "hello"]

    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, conversations, "--show-prompt", stdin="and you?\n/history\n/history 1\n")
    assert "resumed 2 exchange(s)" in err
    assert "Biscuit" in prompts(out)[0] and "hello" in prompts(out)[0]
    assert "[1] you: My cat is called Biscuit" in out and "[3] you: and you?" in out
    assert out.count("[3] you: and you?") == 2 and out.count("[1] you:") == 1
    assert len(read_session(path).exchanges) == 3

    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, conversations, "--session", "work", "--show-prompt", stdin="hi\n/sessions\n")
    assert "Biscuit" not in prompts(out)[0] and "session 'work': new" in err
    assert re.search(r"^work: 1 exchange\(s\), last used .* \(this one\)$", out, re.M)
    assert re.search(r"^default: 3 exchange\(s\)", out, re.M)


def test_a_half_written_last_line_costs_only_that_exchange(monkeypatch, capsys, tiny_adapters, conversations):
    run_chat(monkeypatch, capsys, tiny_adapters, conversations, stdin="first message\nsecond message\n")
    path = conversations / "girl" / "default.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 15])  # killed in the middle of writing the second line

    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, conversations, "--show-prompt", stdin="third message\n")
    assert "resumed 1 exchange(s)" in err and "skipped 1 unreadable line(s)" in err and "(line 2)" in err
    assert "first message" in prompts(out)[0] and "second message" not in prompts(out)[0]
    saved = read_session(path)
    assert [e.user for e in saved.exchanges] == ["first message", "third message"] and saved.skipped == [2]
    assert path.read_bytes().startswith(data[: len(data) - 15])  # the damaged bytes are kept, not rewritten


def test_corrupt_lines_are_reported_and_the_rest_resumed(monkeypatch, capsys, tiny_adapters, conversations):
    path = conversations / "girl" / "default.jsonl"
    path.parent.mkdir(parents=True)
    good = [json.dumps({"user": f"message {i}", "reply": "ok", "speaker": "girl"}) for i in range(3)]
    path.write_bytes("\n".join([good[0], "{not json", good[1], "[1, 2]", '{"user": 5}', good[2]]).encode() + b"\n\xff\xfe\n")
    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, conversations, stdin="/history\n")
    assert "resumed 3 exchange(s)" in err
    assert "skipped 4 unreadable line(s)" in err and "(line 2, 4, 5, 7)" in err
    assert "[3] you: message 2" in out


def test_a_second_process_on_the_same_session_is_refused_and_a_killed_one_loses_nothing_said(
    monkeypatch, capsys, tiny_adapters, conversations,
):
    path = conversations / "girl" / "default.jsonl"
    cmd = [sys.executable, str(ROOT / "chat.py"), "--adapters-root", str(tiny_adapters), "--persona", "girl",
           "--conversations-root", str(conversations), "--max-new-tokens", "8"]
    first = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first.stdin.write(b"My cat is called Biscuit\n")
        first.stdin.flush()
        deadline = time.monotonic() + 120
        while not (path.exists() and read_session(path).exchanges) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert read_session(path).exchanges, "the first chat never saved its exchange"
        with pytest.raises(UserError, match=r"^session 'default' of girl is open in another chat \(.*default.jsonl is locked\)"):
            run_chat(monkeypatch, capsys, tiny_adapters, conversations, stdin="hi\n")
        second = subprocess.run(cmd + ["--once", "hi"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and second.stderr.strip().startswith("error: session 'default' of girl is open in another chat")
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.kill()  # SIGKILL: no chance to clean up
        first.wait()
    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, conversations, "--show-prompt", stdin="what is my cat called?\n")
    assert "resumed 1 exchange(s)" in err and "Biscuit" in prompts(out)[0]


def test_the_lock_is_per_session_and_released_on_close(tmp_path):
    with ConversationStore(tmp_path, "girl", "a") as store:
        store.append(Exchange("hi", "hey", "girl"))
        with pytest.raises(UserError, match="is open in another chat"):
            ConversationStore(tmp_path, "girl", "a").open()
        with ConversationStore(tmp_path, "girl", "b"):
            pass
    with ConversationStore(tmp_path, "girl", "a"):
        pass
    assert [e.user for e in read_session(tmp_path / "girl" / "a.jsonl").exchanges] == ["hi"]
    assert not (tmp_path / "girl" / "b.jsonl").exists()  # nothing said, no file


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 101])
def test_a_session_name_that_is_not_a_file_name_is_refused(tmp_path, name):
    with pytest.raises(UserError, match="cannot be a file name"):
        ConversationStore(tmp_path, "girl", name)


def test_forget_asks_first_and_then_deletes_the_saved_history(monkeypatch, capsys, tiny_adapters, conversations):
    run_chat(monkeypatch, capsys, tiny_adapters, conversations, stdin="My cat is called Biscuit\n")
    script = "/forget\nno\n/history\n/forget\nyes\n/history\n"
    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, conversations, stdin=script)
    assert err.count("delete all 1 saved exchange(s) of session 'default'") == 2
    assert "kept the session" in err and "forgot session 'default'" in err
    assert out.index("[1] you: My cat is called Biscuit") < out.index("(no exchanges yet)")
    assert not (conversations / "girl" / "default.jsonl").exists()
    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, conversations, "--show-prompt", stdin="hello\n")
    assert "session 'default': new" in err and "Biscuit" not in out


def test_no_save_resumes_nothing_and_writes_nothing(monkeypatch, capsys, tiny_adapters, conversations):
    run_chat(monkeypatch, capsys, tiny_adapters, conversations, stdin="My cat is called Biscuit\n")
    before = (conversations / "girl" / "default.jsonl").read_bytes()
    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, conversations, "--no-save", "--show-prompt",
                           stdin="hello\nagain\n/forget\n")
    assert "Biscuit" not in out and "session '" not in err
    assert "this chat saves nothing (--no-save)" in err
    assert (conversations / "girl" / "default.jsonl").read_bytes() == before
    assert [p.name for p in conversations.rglob("*")] == ["girl", "default.jsonl"]


def test_retrieval_brings_an_old_fact_back_from_a_saved_session(monkeypatch, capsys, tiny_adapters, conversations):
    run_chat(monkeypatch, capsys, tiny_adapters, conversations,
             stdin="My cat is called Biscuit\nThe weather is grey today\nI ate noodles for lunch\n")
    args = ("--memory-turns", "1", "--show-prompt")
    _, out, _ = run_chat(monkeypatch, capsys, tiny_adapters, conversations, *args, stdin="What is my cat called?\n")
    assert "Biscuit" not in prompts(out)[0]
    _, out, _ = run_chat(monkeypatch, capsys, tiny_adapters, conversations, *args, "--memory", "retrieval", stdin="What is my cat called?\n")
    assert "Biscuit" in prompts(out)[0] and "grey" not in prompts(out)[0]


# summary memory

def test_summary_mode_puts_a_note_within_budget_in_the_system_prompt(monkeypatch, capsys, tiny_adapters, conversations, tokenizer):
    script = "My cat is called Biscuit\nThe weather is grey today\nI ate noodles for lunch\nWork was long\nWhat is my cat called?\n"
    _, out, err = run_chat(monkeypatch, capsys, tiny_adapters, conversations, "--memory", "summary", "--memory-turns", "2",
                           "--summary-tokens", "12", "--show-prompt", stdin=script)
    [(_, summary)] = SUMMARY_PROMPT.findall(out)
    assert "User: My cat is called Biscuit" in summary and "User: The weather is grey today" in summary
    assert "User: I ate noodles" not in summary and "at most 8 words" in summary
    assert "condensing 2 older exchange(s) into the note" in err
    shown = prompts(out)
    # Exchanges that left the window wait word for word until two of them can be condensed together.
    assert NOTE_OPEN not in shown[3] and "Biscuit" in shown[3] and "noodles" in shown[3]
    last = shown[4]
    system = json.loads((tiny_adapters / "girl" / "persona.json").read_text())["system"]
    after_note = last.split(NOTE_CLOSE)[1]
    assert f"<|im_start|>system\n{system}\n\n{NOTE_OPEN}\n" in last and "My cat is called Biscuit" not in after_note
    assert "noodles" in after_note and "Work was long" in after_note
    note = last.split(NOTE_OPEN + "\n")[1].split("\n" + NOTE_CLOSE)[0]
    assert note.strip() and len(tokenizer(note, add_special_tokens=False)["input_ids"]) <= 12

    saved = read_session(conversations / "girl" / "default.jsonl")
    assert saved.note == note and saved.covers == 2
    _, out, _ = run_chat(monkeypatch, capsys, tiny_adapters, conversations, "--memory", "summary", "--memory-turns", "2",
                         "--summary-tokens", "12", "--show-prompt", stdin="hello\n")
    resumed = prompts(out)[0]
    assert f"{NOTE_OPEN}\n{note}\n{NOTE_CLOSE}" in resumed and "grey" not in resumed and "noodles" in resumed
    assert not SUMMARY_PROMPT.findall(out)


def test_without_a_note_the_system_prompt_is_the_trained_one():
    assert with_note("You are girl.", "") == "You are girl."
    assert with_note(None, "") is None
    assert with_note("You are girl.", "cat: Biscuit") == f"You are girl.\n\n{NOTE_OPEN}\ncat: Biscuit\n{NOTE_CLOSE}"


def test_the_note_is_folded_in_chunks_that_fit_and_cut_to_its_budget(tokenizer):
    from personakit.template import prompt_ids

    seen = []

    def summarize(messages):
        seen.append(len(prompt_ids(tokenizer, messages)))
        return "Biscuit the cat " * 40

    exchanges = [(f"message {i} " + "words " * 6, "reply " * 3) for i in range(6)]
    note = fold_into_note(tokenizer, "", exchanges, "girl", note_tokens=10, prompt_budget=300, summarize=summarize)
    assert 1 < len(seen) < 6 and all(n <= 300 for n in seen)
    assert len(tokenizer(note, add_special_tokens=False)["input_ids"]) <= 10 and note.startswith("Biscuit")
    assert cut_to_tokens(tokenizer, "short", 10) == "short"


def test_bad_summary_budget_is_refused():
    with pytest.raises(UserError, match="--summary-tokens must be at least 8"):
        chat.main(chat.parse_args(["--summary-tokens", "2"]))


# the recall benchmark's conversations and its deterministic target

def test_recall_benchmark_retrieval_brings_the_fact_back_where_recent_memory_cannot(tokenizer):
    from bench import recall

    convs = recall.build_conversations()
    gaps = [len(c.history) - next(i for i, (u, _) in enumerate(c.history) if c.answer in u) for c in convs]
    assert len(convs) == 20 and min(gaps) == 10 and max(gaps) == 30
    args = recall.parse_args([])
    found = {}
    for mode in ("recent", "retrieval"):
        prompts = [recall.final_prompt(args, tokenizer, c, mode, recall.SYSTEM, "", 1000) for c in convs]
        found[mode] = sum(c.answer.lower() in str(p).lower() for c, p in zip(convs, prompts))
    assert found["recent"] <= 2 and found["retrieval"] >= 18
