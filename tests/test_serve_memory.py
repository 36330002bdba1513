"""serve.py --user-memory: a real uvicorn server on the tiny model gives each request `user` its
own saved conversation per persona, resumed across restarts; off by default."""
from __future__ import annotations

import contextlib
import time

import pytest
from test_serve import KEY, free_port, serving

import serve
from personakit.conversations import ConversationStore, read_session
from personakit.serve.protocol import ApiError, parse_request
from personakit.serve.user_memory import KEY_FILE, user_key, user_session

ALICE, BOB = "alice@example.com", "bob-42"
FACT = "My sister's cat is called Biscuit"
QUESTION = "What is my sister's cat called?"


@contextlib.contextmanager
def running(tiny_model_dir, tiny_adapters, *flags):
    """test_serve's server with the official client: (openai client, engine, log lines)."""
    from openai import OpenAI

    with serving(tiny_model_dir, tiny_adapters, *flags) as (url, engine, logs):
        yield OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60), engine, logs


def say(client, message, user=None, stream=False, history=(), **kwargs):
    messages = [*history, {"role": "user", "content": message}]
    extra = {"user": user} if user else {}
    reply = client.chat.completions.create(model="girl", messages=messages, temperature=0, max_tokens=12, stream=stream, **extra, **kwargs)
    return "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream else reply


def prompt_of(engine, message, user=None, history=()):
    """The prompt the server builds for this request now, as text (the function the HTTP handler calls)."""
    body = {"model": "girl", "messages": [*history, {"role": "user", "content": message}], **({"user": user} if user else {})}
    req = parse_request(body, engine.models, engine.settings)
    job = engine.prepare(req, lambda event: None, engine.conversation(req))
    return engine.tokenizer.decode(job.prompt), len(job.prompt)


def session(root, user):
    """The session name the server gives `user` under `root` (its key made on first use)."""
    return user_session(user, user_key(root))


def saved_users(path):
    return [e.user for e in read_session(path).exchanges]


def test_each_user_is_remembered_from_the_new_message_alone(tiny_model_dir, tiny_adapters, tmp_path):
    root = tmp_path / "conversations"
    with running(tiny_model_dir, tiny_adapters, "--user-memory", "--conversations-root", str(root),
                 "--memory", "retrieval", "--memory-turns", "1") as (client, engine, logs):
        say(client, FACT, user=ALICE)
        streamed = say(client, "I went to the gym today", user=ALICE, stream=True)
        say(client, "hello there", user=BOB)
        say(client, "good morning!", extra_headers={"X-User": BOB})  # the header works when there is no `user` field
        say(client, "nobody knows me")  # no user: served without memory, saves nothing

        alice, bob = root / "girl" / f"{session(root, ALICE)}.jsonl", root / "girl" / f"{session(root, BOB)}.jsonl"
        assert saved_users(alice) == [FACT, "I went to the gym today"]
        assert read_session(alice).exchanges[1].reply == streamed and streamed  # streamed replies are saved too
        assert saved_users(bob) == ["hello there", "good morning!"]
        assert sorted(p.name for p in root.rglob("*") if p.is_file()) == sorted([alice.name, bob.name, KEY_FILE])
        assert (root / KEY_FILE).stat().st_mode & 0o777 == 0o600  # the key that names the files is the owner's alone
        assert not any(ALICE in p.read_text() or BOB in p.read_text() for p in (alice, bob))  # only a hash names them

        # A sends only the new message: the gym exchange is the recent window, the fact comes back by retrieval
        text, size = prompt_of(engine, QUESTION, user=ALICE)
        assert "Biscuit" in text and "gym" in text and text.count(QUESTION) == 1
        assert say(client, QUESTION, user=ALICE).usage.prompt_tokens == size  # the server used exactly this prompt
        assert saved_users(alice)[-1] == QUESTION

        text, _ = prompt_of(engine, QUESTION, user=BOB)
        assert "Biscuit" not in text and "good morning!" in text
        assert "Biscuit" not in prompt_of(engine, QUESTION)[0]  # without a user, no memory

        # a client that sends its own history: that is the recent window, retrieval still searches the saved one
        history = [{"role": "user", "content": "tell me a story"}, {"role": "assistant", "content": "once upon a time"}]
        text, _ = prompt_of(engine, QUESTION, user=ALICE, history=history)
        assert "once upon a time" in text and "Biscuit" in text and "gym" not in text
    assert any("user memory: on" in line for line in logs)


def test_a_user_is_resumed_after_a_restart(tiny_model_dir, tiny_adapters, tmp_path):
    root = tmp_path / "conversations"
    flags = ("--user-memory", "--conversations-root", str(root), "--memory", "retrieval", "--memory-turns", "1")
    with running(tiny_model_dir, tiny_adapters, *flags) as (client, _, _):
        say(client, FACT, user=ALICE)
        say(client, "I went to the gym today", user=ALICE)
    path = root / "girl" / f"{session(root, ALICE)}.jsonl"
    with ConversationStore(root, "girl", session(root, ALICE)):  # the server's shutdown released the lock
        pass
    with running(tiny_model_dir, tiny_adapters, *flags) as (client, engine, _):
        assert "Biscuit" in prompt_of(engine, QUESTION, user=ALICE)[0]
        say(client, QUESTION, user=ALICE, stream=True)
    assert saved_users(path) == [FACT, "I went to the gym today", QUESTION]


def test_a_conversation_locked_elsewhere_is_a_503_and_the_server_keeps_serving(tiny_model_dir, tiny_adapters, tmp_path):
    from openai import InternalServerError

    root = tmp_path / "conversations"
    with ConversationStore(root, "girl", session(root, ALICE)):  # e.g. `chat.py --session u-...` holds it
        with running(tiny_model_dir, tiny_adapters, "--user-memory", "--conversations-root", str(root)) as (client, _, logs):
            with pytest.raises(InternalServerError) as err:
                say(client, "hi", user=ALICE)
            assert err.value.status_code == 503 and "cannot be opened" in err.value.body["message"]
            assert any("is locked" in line for line in logs)
            assert say(client, "hi", user=BOB).choices[0].finish_reason in ("stop", "length")


def test_user_memory_is_off_by_default(tiny_model_dir, tiny_adapters, tmp_path):
    root = tmp_path / "conversations"
    assert not serve.parse_args([]).user_memory
    with running(tiny_model_dir, tiny_adapters, "--conversations-root", str(root)) as (client, engine, logs):
        say(client, FACT, user=ALICE)
        say(client, "hello", user=ALICE, stream=True)
        assert "Biscuit" not in prompt_of(engine, QUESTION, user=ALICE)[0]
        with pytest.raises(ApiError, match="'user' must be a string"):
            parse_request({"model": "girl", "messages": [{"role": "user", "content": "hi"}], "user": 42}, engine.models, engine.settings)
    assert not root.exists() and any("user memory: off" in line for line in logs)


def test_the_serve_py_command_saves_users_and_ctrl_c_releases_their_files(tiny_model_dir, tiny_adapters, tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import urllib.request

    root, port = tmp_path / "conversations", free_port()
    proc = subprocess.Popen([sys.executable, str(serve.ROOT / "serve.py"), "--adapters-root", str(tiny_adapters), "--base", str(tiny_model_dir),
                             "--port", str(port), "--max-new-tokens", "8", "--user-memory", "--conversations-root", str(root)],
                            stderr=subprocess.PIPE, text=True)
    try:
        body = json.dumps({"model": "peixuan", "user": ALICE, "messages": [{"role": "user", "content": FACT}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        started = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(request, timeout=60) as resp:
                    reply = json.loads(resp.read())["choices"][0]["message"]["content"]
                break
            except OSError:  # not listening yet (a fresh interpreter loading torch takes a while on a busy machine)
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() - started < 300, "serve.py did not answer within 5 minutes"
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    path = root / "peixuan" / f"{session(root, ALICE)}.jsonl"
    assert [(e.user, e.reply) for e in read_session(path).exchanges] == [(FACT, reply)]
    with ConversationStore(root, "peixuan", session(root, ALICE)):  # unlocked once the server stopped
        pass
    assert "user memory: on" in proc.stderr.read()
