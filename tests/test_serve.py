"""serve.py as a real uvicorn server on the tiny model with two adapters, driven by the official openai client."""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import chat
import serve

KEY = "test-key"
MESSAGES = ["hi there", "how was your day?", "I can't sleep", "what should I eat tonight", "tell me a story",
            "I failed my exam", "good morning!", "do you like rain?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(tiny_model_dir, tiny_adapters, *flags):
    """A real uvicorn server in a background thread: (base URL, engine, log lines); stopped (lifespan shutdown included) on exit."""
    from personakit.serve.app import create_app, server_from_args

    logs: list[str] = []
    args = serve.parse_args(["--adapters-root", str(tiny_adapters), "--base", str(tiny_model_dir), "--api-key", KEY,
                             "--max-new-tokens", "12", "--max-context", "400", *flags])
    engine = server_from_args(args, log=logs.append)
    with on_loopback(create_app(engine)) as url:
        yield url, engine, logs


@contextlib.contextmanager
def on_loopback(app):
    """`app` served by uvicorn in a background thread on a free loopback port: its /v1 URL; stopped (lifespan shutdown included) on exit."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), access_log=False, log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    while not running.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}/v1"
    finally:
        running.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapters):
    with serving(tiny_model_dir, tiny_adapters) as started:
        yield started


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=60)


def ask(client, model, message, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 12, **kwargs}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": message}], **kwargs)


def streamed(client, model, message, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 12, **kwargs}
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": message}], stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def post(url, body: bytes, key: str | None = KEY):
    """A raw POST; returns (status, parsed JSON body)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"{url}/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_lists_every_persona_and_base(client):
    assert [m.id for m in client.models.list().data] == ["girl", "peixuan", "base"]


def test_plain_streamed_and_chat_once_give_the_same_reply(client, tiny_model_dir, tiny_adapters, capsys):
    message = "How was your day?"
    reply = ask(client, "girl", message)
    text, chunks = streamed(client, "girl", message)
    code = chat.main(chat.parse_args(["--adapters-root", str(tiny_adapters), "--base", str(tiny_model_dir), "--persona", "girl",
                                      "--greedy", "--max-new-tokens", "12", "--once", message]))
    once = capsys.readouterr().out.rstrip("\n")
    assert code == 0 and reply.choices[0].message.content == text == once and text
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
    # chunks: the role first, then text as it is generated, then the finish reason
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert sum(1 for c in chunks if c.choices[0].delta.content) > 1, [c.choices[0].delta.content for c in chunks]


def test_base_is_the_base_model_as_chat_py_talks_to_it(client, tiny_model_dir, tiny_adapters, capsys):
    text, _ = streamed(client, "base", "good morning!")
    code = chat.main(chat.parse_args(["--adapters-root", str(tiny_adapters), "--base", str(tiny_model_dir),
                                      "--greedy", "--max-new-tokens", "12", "--once", "good morning!"]))
    assert code == 0 and text == capsys.readouterr().out.rstrip("\n")


def test_client_system_messages_are_ignored_or_appended(tiny_adapters):
    from personakit.persona import read_adapter
    from personakit.serve.server import system_prompt

    persona = read_adapter(tiny_adapters / "girl")
    assert system_prompt(persona, "You are a helpful assistant.", "ignore") == persona.system
    assert system_prompt(persona, "Answer in one line.", "append") == persona.system + "\n\nAnswer in one line."
    assert system_prompt(None, "You are a pirate.", "ignore") == "You are a pirate."  # the base has no training prompt


def test_the_persona_keeps_its_system_prompt_and_long_histories_fit(client, server):
    message = "I can't sleep"
    alone = ask(client, "peixuan", message).choices[0].message.content
    bot = client.chat.completions.create(model="peixuan", temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": message}])
    assert bot.choices[0].message.content == alone  # the client's system message is ignored by default
    history = [m for i in range(40) for m in ({"role": "user", "content": f"long message number {i} " * 8},
                                               {"role": "assistant", "content": f"long reply number {i} " * 8})]
    long = client.chat.completions.create(model="peixuan", temperature=0, max_tokens=12,
                                          messages=[*history, {"role": "user", "content": message}])
    assert long.usage.prompt_tokens <= 400 - 12  # --max-context minus the reply: oldest exchanges dropped
    assert long.choices[0].finish_reason in ("stop", "length")


def test_stop_strings_and_seeded_sampling(client):
    full = ask(client, "girl", "tell me a story", max_tokens=12).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = ask(client, "girl", "tell me a story", stop=[stop])
    assert cut.choices[0].message.content == full[:full.find(stop)].strip() and cut.choices[0].finish_reason == "stop"
    assert streamed(client, "girl", "tell me a story", stop=stop)[0] == cut.choices[0].message.content
    sampled = [ask(client, "girl", "hi", temperature=1.0, seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_unknown_model_is_a_404_listing_the_personas(client):
    from openai import NotFoundError

    with pytest.raises(NotFoundError) as err:
        ask(client, "nobody", "hi")
    assert err.value.status_code == 404 and "girl, peixuan, base" in err.value.body["message"]
    assert err.value.body["code"] == "model_not_found"


def test_the_api_key_is_required(server):
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server[0], api_key="wrong-key", max_retries=0).models.list()
    status, body = post(server[0], b'{"model": "girl", "messages": [{"role": "user", "content": "hi"}]}', key=None)
    assert status == 401 and "API key" in body["error"]["message"]


@pytest.mark.parametrize("body, says", [
    (b"{not json", "not valid JSON"),
    (b'["a list"]', "JSON object"),
    (b'{"model": "girl", "messages": []}', "non-empty list"),
    (b'{"model": "girl", "messages": [{"role": "assistant", "content": "hi"}]}', "end with a user message"),
    (b'{"model": "girl", "messages": [{"role": "robot", "content": "hi"}]}', "use system, user or assistant"),
    (b'{"model": "girl", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}', "outside the allowed range"),
    (b'{"model": "girl", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "outside the allowed range"),
    (b'{"model": "girl", "messages": [{"role": "user", "content": "hi"}], "n": 2}', "one choice per request"),
    (b'{"model": "girl", "messages": [{"role": "user", "content": "hi"}], "tools": "web_search"}', "must be a list"),
    (b'{"model": "girl", "messages": [{"role": "user", "content": "hi"}], "logprobs": true}', "not supported"),
])
def test_bad_requests_are_openai_shaped_400s_and_the_server_keeps_serving(server, client, body, says):
    status, reply = post(server[0], body)
    assert status == 400 and says in reply["error"]["message"]
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert ask(client, "girl", "hi").choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_across_personas_match_one_at_a_time(client, server):
    engine = server[1]
    jobs = [("girl" if i % 2 else "peixuan", m) for i, m in enumerate(MESSAGES)]
    alone = [ask(client, model, m).choices[0].message.content for model, m in jobs]
    before = engine.scheduler.engine.rows_per_step.copy()
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: ask(client, *job).choices[0].message.content, jobs))
    assert together == alone
    assert max(engine.scheduler.engine.rows_per_step - before) > 1  # they really shared decoding steps
    assert engine.scheduler.engine.adapters.mixed is not None  # both personas in one batch
    assert {"girl", "peixuan"} <= {persona for persona, _ in engine.scheduler.engine.prefixes}  # each system prompt prefilled once, then reused


def test_per_persona_batching_gives_the_same_replies(tiny_model_dir, tiny_adapters, client):
    from openai import OpenAI

    jobs = [("girl" if i % 2 else "peixuan", m) for i, m in enumerate(MESSAGES)]
    mixed = [ask(client, model, m).choices[0].message.content for model, m in jobs]
    with serving(tiny_model_dir, tiny_adapters, "--batching", "per-persona") as (url, engine, _):
        other = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
        with ThreadPoolExecutor(len(jobs)) as pool:
            separate = list(pool.map(lambda job: ask(other, *job).choices[0].message.content, jobs))
        assert engine.scheduler.engine.adapters.mixed is None and max(engine.scheduler.engine.rows_per_step) > 1
    assert separate == mixed


def test_a_request_joins_a_running_batch_and_still_gets_its_own_reply(client, server):
    """Continuous batching: a request arriving mid-reply joins the running rows of its persona at the
    next step (its prompt prefilled, its cache stacked on theirs) and its reply is the one it gets alone."""
    engine = server[1]
    long_ask = {"max_tokens": 150}
    alone_long = ask(client, "girl", "tell me a long story", **long_ask).choices[0]
    assert alone_long.finish_reason == "length"  # it runs long enough for the others to join
    alone_greedy = ask(client, "girl", "I failed my exam and my parents will be angry").choices[0].message.content
    alone_sampled = ask(client, "girl", "do you like rain?", temperature=0.9, seed=7).choices[0].message.content
    before = engine.scheduler.engine.rows_per_step.copy()
    stream = iter(client.chat.completions.create(model="girl", messages=[{"role": "user", "content": "tell me a long story"}],
                                                 stream=True, temperature=0, **long_ask))
    pieces = [next(stream), next(stream)]  # the long reply is running
    with ThreadPoolExecutor(2) as pool:
        greedy = pool.submit(lambda: ask(client, "girl", "I failed my exam and my parents will be angry").choices[0].message.content)
        sampled = pool.submit(lambda: ask(client, "girl", "do you like rain?", temperature=0.9, seed=7).choices[0].message.content)
        pieces += list(stream)
        assert (greedy.result(), sampled.result()) == (alone_greedy, alone_sampled)
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == alone_long.message.content
    assert max(engine.scheduler.engine.rows_per_step - before) == 3  # both decoded in the long reply's batch


def test_a_client_leaving_mid_stream_stops_its_reply(client, server):
    logs = server[2]
    stream = client.chat.completions.create(model="girl", messages=[{"role": "user", "content": "tell me a long story"}],
                                            stream=True, max_tokens=300, temperature=0)
    next(iter(stream))
    stream.close()
    for _ in range(100):
        gone = [line for line in logs if "client gone" in line]
        if gone:
            break
        time.sleep(0.1)
    assert gone and int(gone[-1].split(" prompt + ")[1].split()[0]) < 300
    assert ask(client, "peixuan", "hi").choices[0].finish_reason in ("stop", "length")


def test_flags_that_cannot_work_are_one_sentence_errors(tmp_path, capsys):
    from personakit.errors import UserError

    with pytest.raises(UserError, match="min-reply-chars"):
        serve.main(serve.parse_args(["--min-reply-chars", "5"]))
    with pytest.raises(UserError, match="no adapters found"):
        serve.main(serve.parse_args(["--host", "0.0.0.0", "--port", str(free_port()), "--adapters-root", str(tmp_path)]))
    assert "without --api-key" in capsys.readouterr().err
