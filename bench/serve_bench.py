"""serve.py under load: concurrent clients against the batching server vs the same server one request at a time.

    python -m bench.serve_bench                                  # trains 2 tiny adapters on the embedded base first
    python -m bench.serve_bench --adapters-root adapters --max-tokens 48 --out /tmp/BENCHMARKS.md   # shorter replies
    python -m bench.serve_bench --engines 8 32 --requests 2   # our engine vs llama-server behind serve.py vs alone (make llama-server)

Starts `serve.py` three times on the embedded base with the same adapters (`--max-batch 8` with
personas mixed in a batch, `--max-batch 8 --batching per-persona`, `--max-batch 1`), each time
sends --clients concurrent clients x --requests streamed requests (greedy, personas mixed), and records replies/s, reply tokens/s, p50/p95 latency, time to first
token and whether every reply equals the one-at-a-time reply. Writes the "## Serving" section of
BENCHMARKS.md (between <!-- serve:start --> and <!-- serve:end -->). Timings are wall time: run it
on an idle machine.
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from personakit.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
PERSONAS = ("girl", "peixuan")
TARGET_SPEEDUP = 3.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters-root", default=None, help="adapters to serve (default: train girl and peixuan for 2 steps on the embedded base in a temp folder)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests", type=int, default=4, help="requests each client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=160, help="reply length limit per request (default: serve.py's own, --max-new-tokens 160)")
    p.add_argument("--max-batch", type=int, default=8, help="--max-batch of the batching server")
    p.add_argument("--rounds", type=int, default=3, help="times each server runs the whole load; wall time is the median round")
    p.add_argument("--prompts", default=str(ROOT / "data" / "en" / "prompts.jsonl"), help="prompt set the clients cycle through")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file whose Serving section is (re)written")
    p.add_argument("--engines", type=int, nargs="+", default=None, metavar="CLIENTS",
                   help="instead: serve.py's own engine vs serve.py --engine llama-server vs llama-server called directly, "
                        "at each of these client counts (e.g. 8 32); writes the 'Serving engines' section")
    args = p.parse_args(argv)
    args.command = "python -m bench.serve_bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    return args


@dataclass
class Result:
    client: int
    index: int
    persona: str
    text: str
    tokens: int
    latency: float
    ttft: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_adapters(root: Path) -> None:
    """Two 2-step adapters on the embedded base: enough LoRA weights to measure serving, through the real llm.py."""
    for persona in PERSONAS:
        cmd = [sys.executable, str(ROOT / "llm.py"), "--persona", persona, "--data", str(ROOT / "data" / "en" / f"{persona}.jsonl"),
               "--output-root", str(root), "--max-steps", "2", "--val-fraction", "0", "--batch-size", "4"]
        print(f"training {persona}: {' '.join(cmd[1:])}", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"llm.py failed for {persona}: {done.stderr.strip().splitlines()[-1:]}")


def start_server(adapters: Path, max_batch: int, batching: str, max_tokens: int, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "serve.py"), "--adapters-root", str(adapters), "--port", str(port),
           "--max-batch", str(max_batch), "--batching", batching, "--greedy", "--max-new-tokens", str(max_tokens), *extra]
    env = {k: v for k, v in os.environ.items() if k != "PERSONAKIT_API_KEY"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    return proc, wait_healthy(proc, url, "serve.py", log) + "/v1"


def wait_healthy(proc: subprocess.Popen, url: str, what: str, log: Path) -> str:
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{what} exited with code {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise UserError(f"{what} did not answer within 600 s; see {log}")


def one_request(client, persona: str, prompt: str, max_tokens: int, direct: dict | None = None) -> tuple[str, int, float, float]:
    """One streamed request; `direct` (llama-server called without serve.py): {persona: (system prompt, lora list)},
    sent as a client would have to, the persona's system message and the request's `lora` field."""
    started = time.perf_counter()
    first = None
    parts, tokens = [], 0
    messages = [{"role": "user", "content": prompt}]
    extra = {}
    if direct is not None:
        system, lora = direct[persona]
        messages, extra = [{"role": "system", "content": system}, *messages], {"extra_body": {"lora": lora}, "temperature": 0}
    stream = client.chat.completions.create(model=persona, messages=messages, stream=True,
                                            max_tokens=max_tokens, stream_options={"include_usage": True}, **extra)
    for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    return "".join(parts), tokens, end - started, (first or end) - started


def run_arm(name: str, adapters: Path, max_batch: int, batching: str, args: argparse.Namespace, prompts: list[str], work: Path,
            *extra: str) -> dict:
    proc, url = start_server(adapters, max_batch, batching, args.max_tokens, work / f"serve-{name}.log", *extra)
    try:
        return run_load(name, url, args, prompts, max_batch=max_batch, batching=batching)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def run_load(name: str, url: str, args: argparse.Namespace, prompts: list[str], direct: dict | None = None, **about) -> dict:
    """--clients concurrent clients x --requests streamed requests, --rounds times, against `url`."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
    for persona in PERSONAS:  # warm-up, not timed
        one_request(client, persona, prompts[0], 4, direct)

    def run_client(c: int) -> list[Result]:
        out = []
        for i in range(args.requests):
            k = c * args.requests + i
            persona = PERSONAS[(c + i) % len(PERSONAS)]
            text, tokens, latency, ttft = one_request(client, persona, prompts[k % len(prompts)], args.max_tokens, direct)
            out.append(Result(c, i, persona, text, tokens, latency, ttft))
        return out

    load = os.getloadavg()[0]
    walls, rounds = [], []
    for _ in range(args.rounds):
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            rounds.append([r for rs in pool.map(run_client, range(args.clients)) for r in rs])
        walls.append(time.perf_counter() - started)
    results = rounds[0]
    wall = statistics.median(walls)
    latencies = sorted(r.latency for rs in rounds for r in rs)
    ttfts = sorted(r.ttft for rs in rounds for r in rs)
    tokens = sum(r.tokens for r in results)
    texts = {(r.client, r.index): r.text for r in results}
    arm = {
        "name": name, **about, "clients": args.clients, "wall_s": wall, "walls": walls, "replies": len(results), "tokens": tokens,
        "repeatable": all({(r.client, r.index): r.text for r in rs} == texts for rs in rounds),
        "replies_per_s": len(results) / wall, "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latencies), "p95_s": latencies[max(0, round(0.95 * len(latencies)) - 1)],
        "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": ttfts[max(0, round(0.95 * len(ttfts)) - 1)],
        "texts": texts,
        "load": f"{load:.1f} → {os.getloadavg()[0]:.1f}",
    }
    print(f"{name}: {len(results)} replies, {tokens} tokens in {wall:.1f} s (median of {', '.join(f'{w:.1f}' for w in walls)}): {arm['replies_per_s']:.2f} replies/s, "
          f"{arm['tokens_per_s']:.1f} tokens/s, latency p50 {arm['p50_s']:.2f} s p95 {arm['p95_s']:.2f} s, "
          f"first token p50 {arm['ttft_p50_s']:.2f} s", flush=True)
    return arm


def section(args: argparse.Namespace, arms: list[dict], identical: tuple[int, int], total: int, machine: dict[str, str], minutes: float) -> str:
    from bench.benchmarking import md_table

    batched, separate, single = arms
    speedup = batched["tokens_per_s"] / single["tokens_per_s"]
    rows = [[a["name"], a["max_batch"], a["batching"], f"{a['wall_s']:.1f} ({' / '.join(f'{w:.1f}' for w in a['walls'])})", f"{a['replies_per_s']:.2f}", f"{a['tokens_per_s']:.1f}",
             f"{a['p50_s']:.2f} / {a['p95_s']:.2f}", f"{a['ttft_p50_s']:.2f} / {a['ttft_p95_s']:.2f}", a["load"]] for a in arms]
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return "\n".join([
        "## Serving: concurrent clients, batched vs one request at a time",
        "",
        f"Command: `{args.command}` · {date} · {machine['cpu']} ({machine['cores']}), embedded SmolLM2-135M-Instruct "
        f"on {'CUDA' if machine['gpu'] != 'none' else 'CPU'} · {minutes:.0f} min",
        "",
        f"{args.clients} clients x {args.requests} streamed requests each, personas {' and '.join(PERSONAS)} mixed, greedy, "
        f"up to {args.max_tokens} reply tokens, prompts from `{Path(args.prompts).name}`; the same `serve.py` with "
        f"`--max-batch {args.max_batch}` (personas mixed in one batch, the default, and one batch per persona) and with "
        "`--max-batch 1`. Latency and time to first token are per request, "
        f"from sending it to its last (first) text chunk, queueing included, over all {args.rounds} rounds; replies/s and "
        "tokens/s from the median round.",
        "",
        md_table(["server", "--max-batch", "--batching", "wall s: median (rounds)", "replies/s", "reply tokens/s", "latency p50 / p95 s", "first token p50 / p95 s", "load average start → end"], rows),
        "",
        f"Throughput {speedup:.2f}x the one-at-a-time server (target {TARGET_SPEEDUP:g}x: "
        f"{'met' if speedup >= TARGET_SPEEDUP else 'not met'}); per-persona batches "
        f"{separate['tokens_per_s'] / single['tokens_per_s']:.2f}x. Replies identical to the one-at-a-time reply: "
        f"{identical[0]}/{total} mixed, {identical[1]}/{total} per persona; every server gave the same replies in every round: "
        f"{'yes' if all(a['repeatable'] for a in arms) else 'no'}.",
    ])


def engines_section(args: argparse.Namespace, adapters: Path, prompts: list[str], work: Path, machine: dict[str, str], started: float) -> str:
    """serve.py's own engine vs serve.py --engine llama-server vs llama-server called directly, at each --engines client count."""
    import copy
    import json

    from bench.benchmarking import md_table
    from personakit.persona import read_adapter

    exports = work / "exports"
    for persona in PERSONAS:
        done = subprocess.run([sys.executable, str(ROOT / "export.py"), "--adapters-root", str(adapters), "--persona", persona, "--format", "gguf",
                               "--lora-only", "--out", str(exports / f"{persona}-lora")], capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"export.py --lora-only failed for {persona}: {done.stdout.strip().splitlines()[-1:]}")
    url = f"http://127.0.0.1:{free_port()}"
    printed = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--adapters-root", str(adapters), "--exports-root", str(exports),
                              "--max-batch", str(args.max_batch), "--engine-url", url, "--print-engine-command", "llama-server"],
                             capture_output=True, text=True, check=True).stdout.strip()
    log = work / "llama-server.log"
    engine = subprocess.Popen(shlex.split(printed), stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_healthy(engine, url, "llama-server", log)
        with urllib.request.urlopen(f"{url}/lora-adapters", timeout=10) as r:
            names = [Path(a["path"]).name.rsplit("-lora-", 1)[0] for a in json.loads(r.read())]
        direct = {p: (read_adapter(adapters / p).system, [{"id": i, "scale": 1.0 if n == p else 0.0} for i, n in enumerate(names)])
                  for p in PERSONAS}
        arms = []
        for clients in args.engines:
            load = copy.copy(args)
            load.clients = clients
            arms += [run_arm("serve.py, own engine", adapters, args.max_batch, "mixed", load, prompts, work),
                     run_arm("serve.py --engine llama-server", adapters, args.max_batch, "mixed", load, prompts, work,
                             "--engine", "llama-server", "--engine-url", url, "--exports-root", str(exports)),
                     run_load("llama-server directly", f"{url}/v1", load, prompts, direct=direct)]
    finally:
        engine.terminate()
        engine.wait(timeout=60)
    rows = [[a["clients"], a["name"], f"{a['wall_s']:.1f}", f"{a['replies_per_s']:.2f}", f"{a['tokens_per_s']:.1f}",
             f"{a['ttft_p50_s']:.2f} / {a['ttft_p95_s']:.2f}", f"{a['p50_s']:.2f} / {a['p95_s']:.2f}", a["load"]] for a in arms]
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return "\n".join([
        "## Serving engines: serve.py's own vs llama-server behind serve.py vs llama-server alone",
        "",
        f"Command: `{args.command}` · {date} · {machine['cpu']} ({machine['cores']}), embedded SmolLM2-135M-Instruct "
        f"on {'CUDA' if machine['gpu'] != 'none' else 'CPU'} · {(time.time() - started) / 60:.0f} min",
        "",
        f"Each client sends {args.requests} streamed requests one after another, personas {' and '.join(PERSONAS)} mixed, greedy, "
        f"up to {args.max_tokens} reply tokens, prompts from `{Path(args.prompts).name}`, {args.rounds} round(s). serve.py runs with "
        f"`--max-batch {args.max_batch}`; llama-server (built by `make llama-server`, f16 base GGUF + each persona's LoRA GGUF) with "
        f"the command `serve.py --print-engine-command llama-server` prints (`-np {args.max_batch}`), the same process for both "
        "llama-server rows. Called directly, the client sends the persona's system prompt and the `lora` field itself and "
        "llama-server renders the template. Time to first token and latency per request, queueing included. The load "
        "average column says how busy the machine was: on a shared machine the rows compare only roughly.",
        "",
        md_table(["clients", "server", "wall s", "replies/s", "reply tokens/s", "first token p50 / p95 s", "latency p50 / p95 s",
                  "load average start → end"], rows),
    ])


def main(args: argparse.Namespace) -> int:
    from bench.benchmarking import machine_info, write_section
    from personakit.prompts import load_prompts

    if min(args.clients, args.requests, args.max_tokens, args.rounds) < 1 or args.max_batch < 2:
        raise UserError("--clients, --requests, --max-tokens and --rounds must be at least 1, --max-batch at least 2")
    print("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items()) if k != "command"), flush=True)
    started = time.time()
    prompts = [p.prompt for p in load_prompts(args.prompts).prompts]
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        work = Path(tmp)
        adapters = Path(args.adapters_root) if args.adapters_root else work / "adapters"
        if not args.adapters_root:
            train_adapters(adapters)
        if args.engines:
            body = engines_section(args, adapters, prompts, work, machine_info(), started)
            write_section(args.out, "serve-engines", body)
            print(f"wrote the Serving engines section of {args.out}", flush=True)
            return 0
        arms = [run_arm("batched", adapters, args.max_batch, "mixed", args, prompts, work),
                run_arm("batched, per persona", adapters, args.max_batch, "per-persona", args, prompts, work),
                run_arm("one at a time", adapters, 1, "mixed", args, prompts, work)]
    keys = arms[2]["texts"]
    identical = tuple(sum(arm["texts"][k] == keys[k] for k in keys) for arm in arms[:2])
    body = section(args, arms, identical, len(keys), machine_info(), (time.time() - started) / 60)
    write_section(args.out, "serve", body)
    print(body.splitlines()[-1])
    print(f"wrote the Serving section of {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
