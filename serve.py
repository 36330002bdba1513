"""Every persona behind an OpenAI-compatible HTTP API, for chat apps and bots (Open WebUI, AstrBot, LangBot, the openai SDK).

    python serve.py                                    # every adapter under adapters/, on 127.0.0.1:8000
    python serve.py --personas girl peixuan --port 8005
    python serve.py --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"
    python serve.py --user-memory --memory retrieval   # each request's `user` remembered across requests and restarts
    python serve.py --print-engine-command llama-server # then start that, and: python serve.py --engine llama-server

Loads the base once with every adapter attached. The model name is the persona (`base` = no
adapter); the persona's training system prompt is always what the model sees. Endpoints:
GET /v1/models, POST /v1/chat/completions (plain or streamed), GET /health. With --engine
llama-server or vllm, an engine already running decodes; serve.py stays the persona layer.
With --user-memory, a request's `user` has its own saved conversation per persona (README).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from personakit.errors import run_cli
from personakit.flags import add_decoding_flags, add_memory_flags, add_model_flags, add_personas_flags
from personakit.serve.protocol import Limits

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_personas_flags(p, ROOT)
    add_model_flags(p, "(default: the base the adapters were trained on)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 opens it to the network (set --api-key then)")
    g.add_argument("--port", type=int, default=8000, help="TCP port")
    g.add_argument("--api-key", default=os.environ.get("PERSONAKIT_API_KEY") or None, help="require 'Authorization: Bearer KEY' (default: $PERSONAKIT_API_KEY, else no key)")
    g.add_argument("--client-system", default="ignore", choices=["ignore", "append"],
                   help="a client's own system message: ignore it (the persona keeps its training prompt) or append it after the persona's")
    g.add_argument("--tools", default="ignore", choices=["ignore", "reject"],
                   help="requests with tools (bots with plugins send them): answer as plain text, the personas have no tools "
                        "(logged once per client), or refuse them with a 400")
    g.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most (1 = one request at a time)")
    g.add_argument("--batching", default="mixed", choices=["mixed", "per-persona"],
                   help="mixed: requests of every persona share one batch, each row with its own adapter (plain LoRA adapters; "
                        "others fall back to per-persona); per-persona: one batch per persona, taking turns")
    g = p.add_argument_group("limits (what one request may ask; beyond them, an OpenAI-shaped 4xx)")
    g.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes, help="largest request body (413 beyond)")
    g.add_argument("--max-messages", type=int, default=Limits.max_messages, help="most messages in one request (400 beyond)")
    g.add_argument("--max-message-chars", type=int, default=Limits.max_message_chars, help="longest message in characters (400 beyond)")
    g.add_argument("--max-queue", type=int, default=Limits.max_queue,
                   help="requests waiting for a batch slot at most; beyond, 429 with Retry-After")
    g.add_argument("--request-timeout", type=float, default=Limits.request_timeout,
                   help="seconds from a request's arrival to its reply's end, queueing included (504 beyond)")
    g.add_argument("--shutdown-grace", type=int, default=10,
                   help="seconds that running replies get to end on Ctrl-C or SIGTERM before they are cut")
    g.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="a web page origin allowed to call the API from a browser, e.g. http://localhost:3000 (repeatable; default: none)")
    g = p.add_argument_group("engine")
    g.add_argument("--engine", default="local", choices=["local", "llama-server", "vllm"],
                   help="local: decode here (PyTorch); llama-server / vllm: send each rendered prompt, as token ids, to that engine "
                        "already running at --engine-url, with the persona's adapter picked per request (README, Scaling)")
    g.add_argument("--engine-url", default=None, help="where the engine listens (default: http://127.0.0.1:8080 for llama-server, :8001 for vllm)")
    g.add_argument("--engine-api-key", default=os.environ.get("PERSONAKIT_ENGINE_API_KEY") or None,
                   help="the key the engine was started with, sent as 'Authorization: Bearer KEY' (default: $PERSONAKIT_ENGINE_API_KEY, else none)")
    g.add_argument("--print-engine-command", default=None, choices=["llama-server", "vllm"],
                   help="print the command that starts that engine with every persona (for --engine; --max-batch requests at once), then exit")
    g.add_argument("--exports-root", type=Path, default=ROOT / "exports",
                   help="where `export.py --lora-only --out EXPORTS/<persona>-lora` wrote the GGUFs llama-server loads (default: exports/)")
    g = p.add_argument_group("per-user memory")
    g.add_argument("--user-memory", action="store_true",
                   help="remember each user: a request's 'user' field (or X-User header) keys a saved conversation per persona, "
                        "conversations/<persona>/u-<keyed hash>.jsonl, that the prompt's memory comes from (off by default)")
    g.add_argument("--conversations-root", type=Path, default=ROOT / "conversations",
                   help="folder of the saved conversations of --user-memory (default: conversations/ next to serve.py, as chat.py)")
    g.add_argument("--max-open-users", type=int, default=Limits.max_open_users,
                   help="users' conversation files kept open at most; the least recently used idle one is closed beyond")
    g.add_argument("--trust-user-header", action="store_true",
                   help="the X-User header wins over the body's 'user' (set it when a proxy you run sets X-User); "
                        "by default the body's 'user' wins and X-User only fills in a missing one")
    add_memory_flags(p)
    add_decoding_flags(p, sample=True)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from personakit.serve.app import serve

    return serve(args)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
