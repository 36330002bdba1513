"""serve.py under a long mixed load: many clients sending normal, streamed, cancelled and malformed requests at once.

    python -m bench.soak                                   # trains 2 tiny adapters on the embedded base first, 2 minutes
    python -m bench.soak --adapters-root adapters --seconds 60 --out /tmp/BENCHMARKS.md

Starts `serve.py` on the embedded base (greedy), takes every (persona, prompt) reply one request at a
time, then runs --clients clients for --seconds: each picks at random a plain request, a streamed
one, a stream it drops after the first chunk, or a malformed body (bad JSON, deep nesting, a lone
surrogate, a huge integer, a wrong content type, an oversized body, an unknown model). It counts
crashes (the server gone, a client's request raising), 5xx answers to valid requests, valid replies
that differ from their one-at-a-time reply, malformed bodies not answered with a 4xx, and the
server's memory (RSS) and open files before and after. Writes the "## Soak" section of
BENCHMARKS.md (between <!-- soak:start --> and <!-- soak:end -->); tests run the same `soak` for seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from personakit.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
PERSONAS = ("girl", "peixuan")
PROMPTS = ["hi there", "how was your day?", "I can't sleep", "what should I eat tonight", "tell me a story", "good morning!"]
KINDS = ("plain", "streamed", "cancelled", "malformed")


def malformed_bodies(max_body_bytes: int) -> list[tuple[str, bytes, str]]:
    """(name, body, content type) of requests a server must refuse with a 4xx."""
    ok = {"model": PERSONAS[0], "messages": [{"role": "user", "content": "hi"}]}
    return [
        ("bad JSON", b"{not json", "application/json"),
        ("deep nesting", b'{"model": "girl", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json"),
        ("lone surrogate", b'{"model": "girl", "messages": [{"role": "user", "content": "\\ud800"}]}', "application/json"),
        ("huge integer", b'{"model": "girl", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}",
         "application/json"),
        ("text/plain", json.dumps(ok).encode(), "text/plain"),
        ("oversized", json.dumps({**ok, "metadata": {"pad": "x" * max_body_bytes}}).encode(), "application/json"),
        ("unknown model", json.dumps({**ok, "model": "nobody"}).encode(), "application/json"),
        ("bad role", json.dumps({**ok, "messages": [{"role": "robot", "content": "hi"}]}).encode(), "application/json"),
    ]


@dataclass
class SoakReport:
    seconds: float
    clients: int
    sent: Counter = field(default_factory=Counter)  # requests per kind
    crashes: list[str] = field(default_factory=list)  # client-side exceptions, the server gone
    server_errors: list[str] = field(default_factory=list)  # 5xx (or no answer) for valid requests
    mismatches: list[str] = field(default_factory=list)  # valid greedy replies unlike their one-at-a-time reply
    not_refused: list[str] = field(default_factory=list)  # malformed bodies not answered with a 4xx
    rss_mb: tuple[float, float] = (0.0, 0.0)  # server memory before and after
    open_files: tuple[int, int] = (0, 0)  # server file descriptors before and after
    load: str = ""  # the machine's 1-minute load average at the start and the end

    def ok(self) -> bool:
        return not (self.crashes or self.server_errors or self.mismatches or self.not_refused)


def process_usage(pid: int) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of process `pid`."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def chat_body(persona: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    return {"model": persona, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens, "stream": stream}


class StreamError(Exception):
    """A stream the server ended with an error event: a 5xx sent after the 200 began."""


def stream_text(response) -> str:
    """The text of an SSE reply; an error event raises StreamError."""
    parts = []
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        data = json.loads(line[6:])
        if "error" in data:
            raise StreamError(data["error"]["message"])
        parts += [c["delta"].get("content") or "" for c in data["choices"]]
    return "".join(parts)


def references(url: str, key: str, max_tokens: int, timeout: float = 600) -> dict[tuple[str, str], str]:
    """Every (persona, prompt) greedy reply, asked one at a time."""
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout) as client:
        out = {}
        for persona in PERSONAS:
            for prompt in PROMPTS:
                r = client.post("/chat/completions", json=chat_body(persona, prompt, max_tokens, False))
                r.raise_for_status()
                out[(persona, prompt)] = r.json()["choices"][0]["message"]["content"]
        return out


def soak(url: str, key: str, pid: int, refs: dict[tuple[str, str], str], seconds: float, clients: int, max_tokens: int,
         max_body_bytes: int, seed: int = 0, timeout: float = 600) -> SoakReport:
    """`clients` threads mixing the four kinds of request for `seconds` against the server at `url` (process `pid`);
    a request not answered within `timeout` seconds counts as a crash."""
    import httpx

    report = SoakReport(seconds, clients)
    bad = malformed_bodies(max_body_bytes)
    lock = threading.Lock()
    before = process_usage(pid)
    load = os.getloadavg()[0]
    stop_at = time.monotonic() + seconds

    def note(bucket: list[str], what: str) -> None:
        with lock:
            bucket.append(what)

    def run(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout) as client:
            while time.monotonic() < stop_at:
                kind = rng.choice(KINDS)
                persona, prompt = rng.choice(PERSONAS), rng.choice(PROMPTS)
                with lock:
                    report.sent[kind] += 1
                try:
                    if kind == "malformed":
                        name, body, content_type = rng.choice(bad)
                        r = client.post("/chat/completions", content=body, headers={"Content-Type": content_type})
                        if not 400 <= r.status_code < 500 or set(r.json().get("error", {})) != {"message", "type", "param", "code"}:
                            note(report.not_refused, f"{name}: {r.status_code} {r.text[:200]}")
                    elif kind == "plain":
                        r = client.post("/chat/completions", json=chat_body(persona, prompt, max_tokens, False))
                        if r.status_code != 200:
                            note(report.server_errors, f"plain: {r.status_code} {r.text[:200]}")
                        elif r.json()["choices"][0]["message"]["content"] != refs[(persona, prompt)]:
                            note(report.mismatches, f"plain {persona} {prompt!r}")
                    else:
                        with client.stream("POST", "/chat/completions", json=chat_body(persona, prompt, max_tokens, True)) as r:
                            if r.status_code != 200:
                                note(report.server_errors, f"{kind}: {r.status_code}")
                            elif kind == "cancelled":
                                next(r.iter_lines())  # the first chunk, then the client goes away
                            elif stream_text(r) != refs[(persona, prompt)]:
                                note(report.mismatches, f"streamed {persona} {prompt!r}")
                except StreamError as exc:
                    note(report.server_errors, f"{kind}: the stream ended in an error: {exc}")
                except Exception as exc:  # a soak records every failure and goes on
                    note(report.crashes, f"{kind}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(50):  # closed connections take a moment to be closed on the server side too
        after = process_usage(pid)
        if after[1] <= before[1]:
            break
        time.sleep(0.1)
    report.rss_mb, report.open_files = (before[0], after[0]), (before[1], after[1])
    report.load = f"{load:.1f} → {os.getloadavg()[0]:.1f}"
    try:
        with httpx.Client(timeout=10) as client:
            if client.get(url.removesuffix("/v1") + "/health").status_code != 200:
                report.crashes.append("/health is not 200 after the soak")
    except httpx.HTTPError as exc:
        report.crashes.append(f"the server is gone after the soak ({exc})")
    return report


def section(report: SoakReport, command: str, started: datetime, machine: dict[str, str]) -> str:
    total = sum(report.sent.values())
    sent = ", ".join(f"{report.sent[k]} {k}" for k in KINDS)
    return "\n".join([
        "## Soak",
        "",
        f"Command: `{command}` · {started:%Y-%m-%d} · {machine['cpu']} ({machine['cores']}), embedded SmolLM2-135M-Instruct "
        f"on {'CUDA' if machine['gpu'] != 'none' else 'CPU'}, load average {report.load}",
        "",
        f"{report.clients} clients for {report.seconds:g} s against one `serve.py` (greedy, personas mixed): {total} requests "
        f"({sent}). Crashes: {len(report.crashes)}; 5xx for valid requests: {len(report.server_errors)}; valid replies unlike "
        f"their one-at-a-time reply: {len(report.mismatches)}; malformed bodies not refused with a 4xx: {len(report.not_refused)}. "
        f"Server memory (RSS) {report.rss_mb[0]:.0f} → {report.rss_mb[1]:.0f} MB, open files {report.open_files[0]} → "
        f"{report.open_files[1]}.",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters-root", default=None, help="adapters to serve (default: train girl and peixuan for 2 steps on the embedded base in a temp folder)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--seconds", type=float, default=120, help="how long the clients keep sending")
    p.add_argument("--max-tokens", type=int, default=24, help="reply length limit per request")
    p.add_argument("--max-body-bytes", type=int, default=100_000, help="the server's --max-body-bytes (the oversized body is one byte over)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file whose Soak section is (re)written")
    args = p.parse_args(argv)
    args.command = "python -m bench.soak " + shlex.join(sys.argv[1:] if argv is None else argv)
    return args


def main(args: argparse.Namespace) -> int:
    from bench.benchmarking import machine_info, write_section
    from bench.serve_bench import free_port, train_adapters

    started = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory(prefix="soak_") as work:
        adapters = Path(args.adapters_root) if args.adapters_root else Path(work) / "adapters"
        if not args.adapters_root:
            train_adapters(adapters)
        port, key = free_port(), "soak"
        log = Path(work) / "serve.log"
        proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--adapters-root", str(adapters), "--port", str(port),
                                 "--greedy", "--api-key", key, "--max-body-bytes", str(args.max_body_bytes)],
                                stdout=log.open("w"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            for _ in range(1200):
                if proc.poll() is not None:
                    raise UserError(f"serve.py exited with code {proc.returncode}: {log.read_text()[-500:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    time.sleep(0.5)
            refs = references(url, key, args.max_tokens)
            report = soak(url, key, proc.pid, refs, args.seconds, args.clients, args.max_tokens, args.max_body_bytes)
            if proc.poll() is not None:
                report.crashes.append(f"serve.py exited with code {proc.returncode}")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    for bucket in (report.crashes, report.server_errors, report.mismatches, report.not_refused):
        for line in bucket[:5]:
            print(f"  {line}", flush=True)
    text = section(report, args.command, started, machine_info())
    print(text, flush=True)
    write_section(args.out, "soak", text)
    print(f"wrote the Soak section of {args.out}", flush=True)
    return 0 if report.ok() else 1


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
