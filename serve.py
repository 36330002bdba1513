"""Every persona behind an OpenAI-compatible HTTP API, for chat apps and bots (Open WebUI, AstrBot, LangBot, the openai SDK).

    python serve.py                                    # every adapter under adapters/, on 127.0.0.1:8000
    python serve.py --personas girl peixuan --port 8005
    python serve.py --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"

Loads the base once with every adapter attached. The model name is the persona (`base` = no
adapter); the persona's training system prompt is always what the model sees. Endpoints:
GET /v1/models, POST /v1/chat/completions (plain or streamed), GET /health.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from personakit.errors import run_cli
from personakit.generation import add_decoding_args

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # which personas
    g = p.add_argument_group("personas")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--personas", nargs="+", default=None, help="persona names under --adapters-root (default: every adapter there)")
    which.add_argument("--adapters", nargs="+", default=None, help="adapter folders written by llm.py")
    g.add_argument("--adapters-root", default=str(ROOT / "adapters"), help="folder with one adapter folder per persona")
    # model loading
    g = p.add_argument_group("model loading")
    g.add_argument("--base", default=None, help="base model id or folder (default: the base the adapters were trained on)")
    g.add_argument("--allow-base-mismatch", action="store_true", help="attach adapters whose recorded base fingerprint differs from --base")
    g.add_argument("--cache-dir", default=None, help="where the embedded base is converted (default: $PERSONAKIT_CACHE or ~/.cache/personakit)")
    g.add_argument("--load-in-4bit", default="auto", choices=["auto", "yes", "no"], help="nf4 4-bit base: auto = on CUDA with bitsandbytes")
    g.add_argument("--trust-remote-code", action="store_true", help="allow a base model that ships its own Python code")
    # server
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 opens it to the network (set --api-key then)")
    g.add_argument("--port", type=int, default=8000, help="TCP port")
    g.add_argument("--api-key", default=os.environ.get("PERSONAKIT_API_KEY") or None, help="require 'Authorization: Bearer KEY' (default: $PERSONAKIT_API_KEY, else no key)")
    g.add_argument("--client-system", default="ignore", choices=["ignore", "append"], help="a client's own system message: ignore it (the persona keeps its training prompt) or append it after the persona's")
    g.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most (1 = one request at a time)")
    # memory
    g = p.add_argument_group("memory")
    g.add_argument("--memory", default="recent", choices=["recent", "retrieval"], help="recent: last N exchanges of the client's conversation; retrieval: also bring back relevant earlier ones")
    g.add_argument("--memory-turns", type=int, default=4, help="how many recent exchanges go into the prompt")
    g.add_argument("--retrieve-k", type=int, default=2, help="earlier exchanges brought back by --memory retrieval")
    g.add_argument("--max-context", type=int, default=None, help="tokens for prompt plus reply; the oldest exchanges are dropped to fit (default: the base's context, at most 2048)")
    add_decoding_args(p, sample=True)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from personakit.serving import serve

    return serve(args)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
