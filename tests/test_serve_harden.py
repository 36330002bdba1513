"""serve.py against hostile, broken and excessive requests: each one refused (OpenAI-shaped) or
contained, on a real uvicorn server on loopback, and the server still answers a normal request after."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import time

import httpx
import pytest
from test_serve import KEY, free_port, serving

import serve
from personakit.conversations import ConversationStore, Exchange, read_session
from personakit.serve.user_memory import KEY_FILE, legacy_session, user_key, user_session

LIMITS = ("--max-body-bytes", "20000", "--max-messages", "50", "--max-message-chars", "2000")
ORIGIN = "http://chat.example"
HI = {"model": "girl", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def strict(tiny_model_dir, tiny_adapters, tmp_path_factory):
    """(httpx client, engine, log lines, conversations folder) of a server with small limits, user memory and one CORS origin."""
    root = tmp_path_factory.mktemp("harden") / "conversations"
    with serving(tiny_model_dir, tiny_adapters, *LIMITS, "--max-batch", "4", "--user-memory", "--conversations-root", str(root),
                 "--max-open-users", "2", "--cors-origin", ORIGIN) as (url, engine, logs):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
            yield client, engine, logs, root


def normal(client, **extra) -> dict:
    """A normal request still answered."""
    r = client.post("/chat/completions", json={**HI, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def refused(r: httpx.Response, status: int, says: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and says in error["message"], error


def messages(n: int, size: int = 2) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * size} for i in range(n - 1)] + [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, says", [
    (b'{"model": "girl", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nest"),  # Python's own recursion limit
    (b'{"model": "girl", "metadata": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b', "messages": [{"role": "user", "content": "hi"}]}', "nests more than"),
    (b'{"model": "girl", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "lone UTF-16 surrogate"),
    (b'{"model": "girl", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}", "number too large"),
    (b'{"model": "girl", "messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 100 + b"}", "outside the allowed range"),
    (b'{"model": "girl", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "outside the allowed range"),
    (json.dumps({**HI, "messages": messages(51)}).encode(), "over this server's limit of 50"),
    (json.dumps({**HI, "messages": messages(3, 2001)}).encode(), "2001 characters, over this server's limit of 2000"),
    (json.dumps({**HI, "stop": ["s" * 65]}).encode(), "a stop string has 65 characters"),
])
def test_malformed_and_oversized_bodies_are_400s(strict, body, says):
    client = strict[0]
    refused(client.post("/chat/completions", content=body, headers={"Content-Type": "application/json"}), 400, says)
    assert normal(client)["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_body_over_the_limit_is_a_413_with_or_without_a_length(strict):
    client = strict[0]
    big = json.dumps({**HI, "metadata": {"pad": "x" * 20_000}}).encode()
    refused(client.post("/chat/completions", content=big, headers={"Content-Type": "application/json"}), 413, "--max-body-bytes")
    chunked = (big[i:i + 4096] for i in range(0, len(big), 4096))  # no Content-Length: counted as it arrives
    refused(client.post("/chat/completions", content=chunked, headers={"Content-Type": "application/json"}), 413, "limit of 20000 bytes")
    normal(client)


def test_only_json_bodies_are_read(strict):
    """A web page may POST text/plain (or a form) to localhost without asking; the server refuses it unread."""
    client = strict[0]
    for kind in ("text/plain", "application/x-www-form-urlencoded"):
        refused(client.post("/chat/completions", content=json.dumps(HI), headers={"Content-Type": kind}), 415, "application/json")
    assert normal(client, stream=False)["object"] == "chat.completion"
    r = client.post("/chat/completions", content=json.dumps(HI), headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_a_loopback_server_answers_only_loopback_host_names(strict):
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 gets nothing, /health included."""
    client = strict[0]
    refused(client.post("/chat/completions", json=HI, headers={"Host": "evil.example:8000"}), 400, "localhost only")
    refused(client.get("/models", headers={"Host": "evil.example"}), 400, "localhost only")
    assert client.get(str(client.base_url).removesuffix("/v1") + "/health", headers={"Host": "rebind.example"}).status_code == 400
    assert normal(client, stream=False) and client.get("/models", headers={"Host": f"localhost:{client.base_url.port}"}).status_code == 200


def test_cors_answers_the_listed_origin_only(strict):
    client = strict[0]
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    ok = client.options("/chat/completions", headers={"Origin": ORIGIN, **ask})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert client.options("/chat/completions", headers={"Origin": "http://evil.example", **ask}).status_code == 400
    r = client.post("/chat/completions", json=HI, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in client.post("/chat/completions", json=HI, headers={"Origin": "http://evil.example"}).headers


def saved(root, user):
    path = root / "girl" / f"{user_session(user, user_key(root))}.jsonl"
    return [e.user for e in read_session(path).exchanges] if path.exists() else None


def open_session_files() -> int:
    return sum(1 for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}").endswith(".jsonl"))


def test_user_files_are_keyed_bounded_and_none_is_made_for_a_rejected_request(strict):
    client, engine, _, root = strict
    assert (root / KEY_FILE).stat().st_mode & 0o777 == 0o600
    for i in range(5):  # more users than --max-open-users 2
        normal(client, user=f"qq-{i}", messages=[{"role": "user", "content": f"I am user {i}"}])
        assert engine.user_memory.open_files() <= 2 and open_session_files() <= 2
    normal(client, user="qq-0", messages=[{"role": "user", "content": "again"}])  # closed meanwhile: reopened, nothing lost
    assert saved(root, "qq-0") == ["I am user 0", "again"]
    names = {p.stem for p in (root / "girl").glob("*.jsonl")}
    assert user_session("qq-0", user_key(root)) in names and legacy_session("qq-0") not in names  # an unkeyed hash of a QQ id can be reversed

    too_long = client.post("/chat/completions", json={**HI, "user": "rejected", "max_tokens": 390,
                                                      "messages": [{"role": "user", "content": "word " * 300}]})
    refused(too_long, 400, "prompt")
    refused(client.post("/chat/completions", json={**HI, "user": "rejected", "temperature": 9}), 400, "outside")
    assert saved(root, "rejected") is None  # no file, not even an empty one
    normal(client)


def test_a_file_from_before_the_key_is_renamed_and_kept(strict):
    client, _, _, root = strict
    with ConversationStore(root, "girl", legacy_session("carol")) as old:
        old.append(Exchange("My sister's cat is called Biscuit", "nice", "girl"))
    normal(client, user="carol", messages=[{"role": "user", "content": "hello"}])
    assert saved(root, "carol") == ["My sister's cat is called Biscuit", "hello"]
    assert not (root / "girl" / f"{legacy_session('carol')}.jsonl").exists()


def test_the_body_user_wins_over_x_user_unless_the_header_is_trusted(strict):
    client, _, _, root = strict
    normal(client, user="body-user", messages=[{"role": "user", "content": "from the body"}], )
    r = client.post("/chat/completions", json={**HI, "user": "body-user"}, headers={"X-User": "header-user"})
    assert r.status_code == 200 and saved(root, "body-user") == ["from the body", "hi"] and saved(root, "header-user") is None
    assert client.post("/chat/completions", json=HI, headers={"X-User": "header-user"}).status_code == 200
    assert saved(root, "header-user") == ["hi"]  # without a body `user`, the header names the user


def test_a_disk_full_mid_append_does_not_corrupt_the_next_exchange(strict, monkeypatch):
    client, _, logs, root = strict
    normal(client, user="dave", messages=[{"role": "user", "content": "first"}])
    real_write = os.write
    torn = []

    def disk_full_once(fd, data):
        if not torn and os.path.realpath(f"/proc/self/fd/{fd}").endswith(".jsonl"):
            torn.append(real_write(fd, bytes(data)[:len(data) // 2]))  # half the record reaches the disk, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", disk_full_once)
    assert normal(client, user="dave", messages=[{"role": "user", "content": "second"}])["choices"][0]["message"]["content"] is not None
    monkeypatch.undo()
    assert torn and any("could not save" in line for line in logs)
    normal(client, user="dave", messages=[{"role": "user", "content": "third"}])
    path = root / "girl" / f"{user_session('dave', user_key(root))}.jsonl"
    session = read_session(path)
    assert [e.user for e in session.exchanges] == ["first", "third"] and not session.skipped


@contextlib.contextmanager
def forward_hook(engine, hook):
    """`hook(input_ids)` runs before every forward pass of the served model (a slow or failing GPU)."""
    model = engine.scheduler.engine.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = base.register_forward_pre_hook(lambda module, args, kwargs: hook(kwargs.get("input_ids")), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def stream_lines(client, body):
    with client.stream("POST", "/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        yield from (json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]")


def until_text(events) -> list[dict]:
    """The stream's events up to its first text (the role chunk goes out before the reply is even prefilled)."""
    taken = [next(events)]
    while not stream_text(taken):
        taken.append(next(events))
    return taken


def stream_text(events) -> str:
    return "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))


def test_an_out_of_memory_prefill_fails_only_its_own_request(strict):
    """A CUDA OOM raised from the model's forward while a new request is prefilled: that request gets
    a 500, the reply already running goes on to the same text it has alone, and the server keeps serving."""
    import torch

    client, engine, _, _ = strict
    long = {**HI, "messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": 120}
    alone = normal(client, **long)["choices"][0]["message"]["content"]
    armed = threading.Event()

    def oom(ids):
        if armed.is_set() and ids is not None and ids.shape[1] > 1:  # a prefill, not a decoding step
            armed.clear()
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with forward_hook(engine, oom):
        events = stream_lines(client, long)
        first = until_text(events)
        armed.set()
        refused(client.post("/chat/completions", json={**HI, "messages": [{"role": "user", "content": "I can't sleep"}]}),
                500, "generation failed")
        assert stream_text(first + list(events)) == alone
    normal(client)


def test_one_rows_failure_leaves_its_batch_mates_alone(strict):
    """A row whose own sampling raises (transformers refuses an integer temperature) fails alone."""
    from personakit.engine import Sampling
    from personakit.serve.scheduler import Job

    engine = strict[1]
    prompt = engine.prepare(engine_request(engine, "I can't sleep"), lambda event: None).prompt
    events: dict[str, list] = {"good": [], "bad": []}
    good_alone = normal(strict[0], messages=[{"role": "user", "content": "I can't sleep"}])["choices"][0]["message"]["content"]
    jobs = {name: Job(prompt=prompt, max_tokens=12, adapter="girl", emit=events[name].append,
                      sampling=Sampling(do_sample=name == "bad", temperature=1 if name == "bad" else 1.0, seed=1)) for name in events}
    for job in jobs.values():
        engine.scheduler.submit(job)
    for _ in range(600):
        if all(e and e[-1][0] in ("end", "error") for e in events.values()):
            break
        time.sleep(0.05)
    assert events["bad"][-1][0] == "error" and events["bad"][-1][1].status == 500
    assert events["good"][-1][0] == "end" and events["good"][-1][2] == good_alone
    normal(strict[0])


def engine_request(engine, message):
    from personakit.serve.protocol import parse_request

    return parse_request({"model": "girl", "messages": [{"role": "user", "content": message}], "temperature": 0, "max_tokens": 12},
                         engine.models, engine.settings)


def test_queue_limit_deadline_trusted_header_and_a_dead_decoder(tiny_model_dir, tiny_adapters, tmp_path):
    """One slot and one place in the queue: the third request is a 429 with Retry-After; a reply past
    --request-timeout ends in a 504; then the decoding thread dies: /health says so, requests fail at once."""
    root = tmp_path / "conversations"
    with serving(tiny_model_dir, tiny_adapters, "--max-batch", "1", "--max-queue", "1", "--request-timeout", "3",
                 "--user-memory", "--conversations-root", str(root), "--trust-user-header") as (url, engine, _):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        r = client.post("/chat/completions", json={**HI, "user": "body-user"}, headers={"X-User": "proxy-user"})
        assert r.status_code == 200 and saved(root, "proxy-user") == ["hi"] and saved(root, "body-user") is None

        with forward_hook(engine, lambda ids: time.sleep(0.05)):  # a slow model: 20 tokens a second
            long = {**HI, "max_tokens": 300, "messages": [{"role": "user", "content": "tell me a long story"}]}
            events = stream_lines(client, long)
            first = until_text(events)
            queued = threading.Thread(target=lambda: client.post("/chat/completions", json=HI))
            queued.start()
            while engine.scheduler.backlog() < 1:
                time.sleep(0.01)
            busy = client.post("/chat/completions", json=HI)
            refused(busy, 429, "--max-queue")
            assert busy.headers["retry-after"] == "1"
            rest = first + list(events)
            assert "--request-timeout" in rest[-1]["error"]["message"] and stream_text(rest)  # the stream ends with the error
            queued.join()
            began = time.perf_counter()
            refused(client.post("/chat/completions", json=long), 504, "did not end within")
            assert time.perf_counter() - began < 6
        assert client.post("/chat/completions", json=HI).status_code == 200
        assert client.get(url.removesuffix("/v1") + "/health").json()["status"] == "ok"

        def broken() -> None:
            raise RuntimeError("the decoder broke")

        engine.scheduler._admit = broken
        refused(client.post("/chat/completions", json=HI), 503, "decoding thread has stopped")
        health = client.get(url.removesuffix("/v1") + "/health")
        assert health.status_code == 503 and "the decoder broke" in health.json()["error"]
        began = time.perf_counter()
        refused(client.post("/chat/completions", json=HI), 503, "restart the server")
        assert time.perf_counter() - began < 2
        client.close()


def test_sigterm_lets_running_replies_end_saves_them_and_exits_0(tiny_model_dir, tiny_adapters, tmp_path):
    import signal
    import subprocess
    import sys

    root, port = tmp_path / "conversations", free_port()
    proc = subprocess.Popen([sys.executable, str(serve.ROOT / "serve.py"), "--adapters-root", str(tiny_adapters), "--base", str(tiny_model_dir),
                             "--port", str(port), "--max-new-tokens", "200", "--user-memory", "--conversations-root", str(root),
                             "--shutdown-grace", "30"], stderr=subprocess.PIPE, text=True)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=60)
        started = time.monotonic()
        while True:  # a fresh interpreter loading torch takes a while on a busy machine
            try:
                client.get("/models")
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() - started < 300, "serve.py did not answer within 5 minutes"
                time.sleep(0.2)
        body = {"model": "girl", "user": "erin", "temperature": 0, "messages": [{"role": "user", "content": "tell me a long story"}]}
        events = stream_lines(client, body)
        first = until_text(events)
        proc.send_signal(signal.SIGTERM)
        rest = first + list(events)
        assert rest[-1]["choices"][0]["finish_reason"] in ("stop", "length")  # the reply ended as it would have
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    path = root / "girl" / f"{user_session('erin', user_key(root))}.jsonl"
    assert [(e.user, e.reply) for e in read_session(path).exchanges] == [("tell me a long story", stream_text(rest))]
    with ConversationStore(root, "girl", user_session("erin", user_key(root))):  # unlocked
        pass


def test_a_short_soak_of_mixed_requests(tiny_model_dir, tiny_adapters):
    """bench/soak.py for a few seconds: 16 clients mixing plain, streamed, cancelled and malformed requests."""
    from bench.soak import references, soak

    with serving(tiny_model_dir, tiny_adapters, "--max-body-bytes", "20000", "--greedy") as (url, _, _):
        refs = references(url, KEY, 12)
        report = soak(url, KEY, os.getpid(), refs, seconds=8, clients=16, max_tokens=12, max_body_bytes=20000)
    assert report.ok(), (report.crashes[:3], report.server_errors[:3], report.mismatches[:3], report.not_refused[:3])
    assert all(report.sent[k] > 0 for k in ("plain", "streamed", "cancelled", "malformed"))
    assert report.open_files[1] <= report.open_files[0] + 2 and report.rss_mb[1] - report.rss_mb[0] < 100


def test_limit_flags_out_of_range_are_one_sentence_errors():
    from personakit.errors import UserError

    with pytest.raises(UserError, match=r"--max-queue must be at least 1 \(got 0\); --request-timeout must be positive"):
        serve.main(serve.parse_args(["--max-queue", "0", "--request-timeout", "0"]))
