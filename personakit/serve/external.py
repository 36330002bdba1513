"""serve.py --engine llama-server|vllm: the same app and personas in front of an existing engine.

serve.py still checks, authenticates, applies the persona's system prompt and memory and renders
the prompt to token ids with the training template (server.Server.prepare); this scheduler sends
those ids to the engine's completion endpoint with the persona's adapter selected per request,
streams the reply text back into the request's Job (stop strings, held-back text and events as
with the local engine) and maps the engine's failures to OpenAI-shaped errors (down or
overloaded: 503). The request shapes follow each engine's own server code:
- llama-server (llama.cpp, tools/server: server-schema.cpp, server-context.cpp): POST /completion
  with `prompt` as token ids, `lora` [{id, scale}] per request, SSE chunks {content, stop, stop_type,
  tokens_predicted}; GET /lora-adapters lists the adapters loaded with --lora, in id order.
- vLLM (vllm/entrypoints/openai/protocol.py, CompletionRequest): POST /v1/completions with
  `prompt` as token ids, the LoRA module name as `model`, `stop_token_ids`, `top_k`,
  `repetition_penalty`; SSE chunks {choices: [{text, finish_reason}], usage}.
"""
from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import UserError
from .protocol import ApiError
from .scheduler import Job

ENGINES = ("llama-server", "vllm")
DEFAULT_URLS = {"llama-server": "http://127.0.0.1:8080", "vllm": "http://127.0.0.1:8001"}
READ_TIMEOUT = 600.0  # seconds without a byte from the engine before a request is given up
CONNECT_TIMEOUT = 5.0


@dataclass
class Piece:
    """What one engine event adds: reply text, the engine's reply token count so far, and its end."""

    text: str
    tokens: int | None = None
    finish: str | None = None  # "stop" or "length" once the engine ended the reply


class EngineError(Exception):
    """The engine answered with an error, or could not be reached: `api` is what the client gets."""

    def __init__(self, api: ApiError):
        super().__init__(api.message)
        self.api = api


def _unavailable(kind: str, what: str) -> EngineError:
    return EngineError(ApiError(503, f"the {kind} engine behind this server {what}; send the request again later",
                                code="engine_unavailable", kind="server_error"))


# ---------------------------------------------------------------- request shapes

def llama_server_body(job: Job, lora_ids: list[str], repetition_penalty: float) -> dict[str, Any]:
    """A /completion request: the prompt as token ids, every loaded adapter off but the persona's."""
    s = job.sampling
    return {
        "prompt": list(job.prompt), "n_predict": job.max_tokens, "stream": True, "cache_prompt": True,
        "lora": [{"id": i, "scale": 1.0 if name == job.adapter else 0.0} for i, name in enumerate(lora_ids)],
        # temperature 0 is llama.cpp's greedy; otherwise our order (temperature, top-k, top-p) and no min-p,
        # so that the knobs mean what they mean in serve.py's own engine.
        "temperature": s.temperature if s.do_sample else 0.0, "top_k": s.top_k, "top_p": s.top_p, "min_p": 0.0,
        "samplers": ["penalties", "temperature", "top_k", "top_p"], "seed": s.seed % 2 ** 32,
        "repeat_penalty": repetition_penalty, "repeat_last_n": job.max_tokens,
    }


def vllm_body(job: Job, model: str, stops: list[int], repetition_penalty: float) -> dict[str, Any]:
    """A /v1/completions request: the prompt as token ids, the persona's LoRA module as the model."""
    s = job.sampling
    return {
        "model": model, "prompt": list(job.prompt), "max_tokens": job.max_tokens, "stream": True,
        "stream_options": {"include_usage": True}, "temperature": s.temperature if s.do_sample else 0.0,
        "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed % 2 ** 63, "repetition_penalty": repetition_penalty,
        "stop_token_ids": stops, "skip_special_tokens": True,
    }


def llama_server_pieces(events: Iterator[dict[str, Any]]) -> Iterator[Piece]:
    for event in events:
        if "error" in event:
            raise _engine_error("llama-server", event["error"])
        tokens, finish = event.get("tokens_predicted"), None
        if event.get("stop"):
            finish = "length" if event.get("stop_type") == "limit" else "stop"
            if event.get("stop_type") == "eos" and tokens:
                tokens -= 1  # the end-of-turn token is not part of the reply, as in serve.py's own engine
        yield Piece(event.get("content") or "", tokens, finish)


def vllm_pieces(events: Iterator[dict[str, Any]]) -> Iterator[Piece]:
    finish, count = None, None
    for event in events:
        if "error" in event:
            raise _engine_error("vllm", event["error"])
        for choice in event.get("choices") or []:
            finish = choice.get("finish_reason") or finish
            yield Piece(choice.get("text") or "")
        count = (event.get("usage") or {}).get("completion_tokens", count)  # the last chunk (stream_options.include_usage)
    if finish is not None:
        yield Piece("", count, "length" if finish == "length" else "stop")


def _engine_error(kind: str, error: Any, status: int | None = None) -> EngineError:
    """An engine's error object ({message, type, code}) as what our client should get."""
    message = error.get("message") if isinstance(error, dict) else str(error)
    code = error.get("code") if isinstance(error, dict) else None
    status = status or (code if isinstance(code, int) else 500)
    if status in (429, 503) or status >= 500:
        return _unavailable(kind, f"is overloaded or failing ({status}: {message})")
    if status == 404:
        return EngineError(ApiError(503, f"the {kind} engine behind this server does not serve this persona ({message}); "
                                    "restart it with the command `serve.py --print-engine-command` prints",
                                    code="engine_unavailable", kind="server_error"))
    return EngineError(ApiError(400, f"the {kind} engine refused the request: {message}"))


# ---------------------------------------------------------------- transport

class _Stream:
    """One streaming POST to the engine; `close()` from another thread ends it (cancellation)."""

    def __init__(self, kind: str, url: str, path: str, body: dict[str, Any], api_key: str | None):
        self.kind, self.url = kind, url
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=CONNECT_TIMEOUT)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        try:
            self.conn.connect()
            self.conn.sock.settimeout(READ_TIMEOUT)
            self.conn.request("POST", parts.path.rstrip("/") + path, json.dumps(body), headers)
            self.response = self.conn.getresponse()
        except OSError as exc:
            self.close()
            raise _unavailable(kind, f"cannot be reached at {url} ({exc.strerror or exc})") from None
        if self.response.status != 200:
            raw = self.response.read()
            self.close()
            try:
                error = json.loads(raw).get("error")
            except (ValueError, AttributeError):
                error = None
            raise _engine_error(kind, error or raw.decode("utf-8", "replace")[:200], self.response.status)

    def events(self) -> Iterator[dict[str, Any]]:
        """The JSON object of every `data:` line until the stream ends."""
        try:
            for raw in self.response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue  # blank separators and ':' keep-alive pings
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                yield json.loads(data)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise _unavailable(self.kind, f"stopped answering in the middle of a reply ({exc})") from None

    def close(self) -> None:
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conn.close()


def get_json(url: str, path: str, api_key: str | None = None, timeout: float = CONNECT_TIMEOUT) -> tuple[int, Any]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path.rstrip("/") + path, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, None
    finally:
        conn.close()


# ---------------------------------------------------------------- the scheduler

class ExternalScheduler:
    """The local Scheduler's interface (start, submit, close) over an engine: one thread per running
    request streams its reply; a watcher thread ends the streams of cancelled requests."""

    def __init__(self, kind: str, url: str, personas: list[str], stops: list[int], repetition_penalty: float,
                 api_key: str | None = None, log: Callable[[str], None] | None = None):
        if kind not in ENGINES:
            raise UserError(f"--engine must be local or one of {', '.join(ENGINES)}, not {kind!r}")
        self.kind, self.url, self.personas, self.stops = kind, url.rstrip("/"), personas, stops
        self.repetition_penalty, self.api_key = repetition_penalty, api_key
        self.log = log or (lambda line: None)
        self.running: dict[int, tuple[Job, _Stream]] = {}
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.lora_ids: list[str] | None = None  # llama-server: the persona of each loaded adapter, by id
        self.watcher = threading.Thread(target=self._watch, name="personakit-engine-watcher", daemon=True)

    def start(self) -> None:
        self.watcher.start()
        try:
            status, _ = get_json(self.url, "/health", self.api_key)
            self.log(f"serve: {self.kind} at {self.url}: {'ready' if status == 200 else f'health {status}'}")
            if self.kind == "llama-server":
                self._adapters()
        except (OSError, EngineError) as exc:  # the engine may come up later; each request says so until then
            self.log(f"serve: {self.kind} at {self.url} is not answering yet ({exc})")

    def close(self) -> None:
        self.closing.set()
        with self.lock:
            running = list(self.running.values())
        for job, stream in running:
            if job.finish is None:
                job.finish = "error"
                job.emit(("error", ApiError(503, "the server is stopping; send the request again later", kind="server_error")))
            stream.close()

    failure: str | None = None  # an engine's failures are per request (a 503 each); this side has no thread to die

    def alive(self) -> bool:
        return not self.closing.is_set()

    def backlog(self) -> int:
        """Requests the engine is answering now (it queues them itself, beyond its slots)."""
        with self.lock:
            return len(self.running)

    def submit(self, job: Job) -> None:
        threading.Thread(target=self._run, args=(job,), name="personakit-engine-request", daemon=True).start()

    def _adapters(self) -> list[str]:
        """llama-server's adapters (GET /lora-adapters), each matched to its persona by the file name
        export.py --lora-only gives it (<persona>-lora-<quant>.gguf)."""
        if self.lora_ids is None:
            try:
                status, listing = get_json(self.url, "/lora-adapters", self.api_key)
            except OSError as exc:
                raise _unavailable(self.kind, f"cannot be reached at {self.url} ({exc.strerror or exc})") from None
            if status != 200 or not isinstance(listing, list):
                raise _unavailable(self.kind, f"did not list its LoRA adapters (GET /lora-adapters: {status})")
            names = [Path(a.get("path", "")).name.rsplit("-lora-", 1)[0] for a in sorted(listing, key=lambda a: a.get("id", 0))]
            missing = [p for p in self.personas if p not in names]
            if missing:
                raise EngineError(ApiError(503, f"the llama-server engine has no adapter for {', '.join(missing)}; restart it with "
                                           "the command `serve.py --print-engine-command llama-server` prints",
                                           code="engine_unavailable", kind="server_error"))
            self.lora_ids = names
        return self.lora_ids

    def _request(self, job: Job) -> tuple[str, dict[str, Any], Callable[[Iterator[dict[str, Any]]], Iterator[Piece]]]:
        if self.kind == "llama-server":
            return "/completion", llama_server_body(job, self._adapters(), self.repetition_penalty), llama_server_pieces
        from .server import BASE

        return "/v1/completions", vllm_body(job, job.adapter or BASE, self.stops, self.repetition_penalty), vllm_pieces

    def _run(self, job: Job) -> None:
        stream = None
        text = ""
        try:
            path, body, pieces = self._request(job)
            stream = _Stream(self.kind, self.url, path, body, self.api_key)
            with self.lock:
                self.running[id(job)] = (job, stream)
            for piece in pieces(stream.events()):
                if job.cancelled.is_set() or job.finish is not None:
                    break
                text += piece.text
                job.engine_tokens = piece.tokens if piece.tokens is not None else (job.engine_tokens or 0) + (1 if piece.text else 0)
                job.finish = piece.finish
                job.update(lambda _tokens, seen=text: seen)
                if job.finish is not None:
                    break
            if job.finish is None and not job.cancelled.is_set() and not self.closing.is_set():
                raise _unavailable(self.kind, "ended its stream before the reply was complete")
        except Exception as exc:  # the request fails, the server keeps serving
            if isinstance(exc, EngineError):
                error = exc.api
                self.log(f"serve: {self.kind}: {error.message}")
            else:
                traceback.print_exc(file=sys.stderr)
                error = ApiError(500, "the request to the engine failed inside the server; see its log", kind="server_error")
            if job.finish is None and not job.cancelled.is_set() and not self.closing.is_set():
                job.finish = "error"
                job.emit(("error", error))
        finally:
            with self.lock:
                self.running.pop(id(job), None)
            if stream is not None:
                stream.close()  # a stop string or a gone client: the engine stops decoding this reply

    def _watch(self) -> None:
        while not self.closing.is_set():
            with self.lock:
                gone = [stream for job, stream in self.running.values() if job.cancelled.is_set()]
            for stream in gone:
                stream.close()
            time.sleep(0.1)


# ---------------------------------------------------------------- startup and the engine's command line

def base_context(adapters: list[Any], base: Any, max_context: int | None, max_new_tokens: int) -> tuple[Any, int]:
    """The base the personas share (`--base` wins) and the context each request gets, as the local engine computes it."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from ..base_model import resolve_base
    from ..evaluation import base_for
    from ..memory import reply_budget

    ref = resolve_base(base.base or (base_for(adapters, None) if adapters else None), base.cache_dir)
    config = AutoConfig.from_pretrained(ref.folder, trust_remote_code=base.trust_remote_code)
    return ref, reply_budget(SimpleNamespace(config=config), max_context, max_new_tokens)[0]


def load_external_server(kind: str, url: str, engine_key: str | None, adapters: list[Any], base: Any, settings: Any,
                         log: Callable[[str], None] | None = None) -> Any:
    """The Server of serve.py --engine KIND: the training tokenizer and the personas, no model (the engine has it)."""
    import dataclasses

    from transformers import AutoTokenizer

    from ..template import require_chat_template, stop_token_ids
    from .server import Server

    ref, max_context = base_context(adapters, base, settings.max_context, settings.decoding.max_new_tokens)
    tokenizer = AutoTokenizer.from_pretrained(ref.folder, trust_remote_code=base.trust_remote_code)
    require_chat_template(tokenizer)
    settings = dataclasses.replace(settings, max_context=max_context)
    d = settings.decoding
    scheduler = ExternalScheduler(kind, url, [a.name for a in adapters], stop_token_ids(tokenizer), d.repetition_penalty,
                                  engine_key, log)
    server = Server(None, tokenizer, adapters, settings, log, scheduler=scheduler)
    scheduler.log = server.log
    server.log(
        f"serve: {', '.join(server.models)} on {ref.base_id} through {kind} at {url}; {max_context} context tokens, "
        f"memory {'retrieval' if settings.retrieve_k else 'recent'} {settings.memory_turns} exchanges, "
        f"client system messages: {settings.client_system}, user memory: {'on' if settings.conversations_root else 'off'}; "
        + " ".join(f"{k}={v}" for k, v in d.as_dict().items())
    )
    if d.no_repeat_ngram_size:
        server.log(f"serve: {kind} has no no-repeat-ngram control, so --no-repeat-ngram-size {d.no_repeat_ngram_size} is not applied; "
                   f"its own repetition penalty ({d.repetition_penalty}) also counts the prompt's tokens")
    return server


def lora_ggufs(adapters: list[Any], exports_root: Path) -> tuple[Path, list[Path]]:
    """The base GGUF and each persona's LoRA GGUF that `export.py --lora-only --out EXPORTS/<persona>-lora` wrote."""
    found, missing = [], []
    for a in adapters:
        files = sorted((exports_root / f"{a.name}-lora").glob(f"{a.name}-lora-*.gguf"))
        (found.append(files[0]) if files else missing.append(a.name))
    if missing:
        commands = "; ".join(f"python export.py --persona {name} --format gguf --lora-only --out {exports_root / f'{name}-lora'}" for name in missing)
        raise UserError(f"llama-server loads each persona as a LoRA GGUF, and {', '.join(missing)} has none under {exports_root}; "
                        f"write it first: {commands}")
    quant = found[0].stem.rsplit("-lora-", 1)[1]
    base = exports_root / f"base-{adapters[0].base_fingerprint[:12]}-{quant}.gguf"
    if not base.is_file():
        raise UserError(f"{base} (the base GGUF export.py --lora-only writes beside the persona folders) is missing; "
                        f"run export.py --lora-only again for one persona to write it")
    return base, found


def llama_server_binary(cache_dir: str | None) -> str:
    """`make llama-server`'s binary when it is built, else whatever `llama-server` is on the PATH."""
    from ..base_model import default_cache_dir
    from ..exporting import llama_cpp_version

    built = default_cache_dir(cache_dir) / f"llama-server-{llama_cpp_version()}" / "llama-server"
    return str(built) if built.is_file() else "llama-server"


def engine_command(kind: str, adapters: list[Any], base: Any, max_context: int | None, max_new_tokens: int, parallel: int,
                   url: str, exports_root: Path) -> list[str]:
    """The exact command line that starts `kind` with every persona, listening where --engine-url points
    and with the context serve.py --engine KIND gives each request (`parallel` of them at once)."""
    if not adapters:
        raise UserError("there are no adapters to serve; train one with llm.py or pass --adapters-root")
    model, max_context = base_context(adapters, base, max_context, max_new_tokens)
    parts = urllib.parse.urlsplit(url)
    where = ["--host", parts.hostname or "127.0.0.1", "--port", str(parts.port or 80)]
    if kind == "llama-server":
        base_gguf, loras = lora_ggufs(adapters, exports_root)
        # -c is shared by the slots: each of the `parallel` requests gets max_context tokens.
        return [llama_server_binary(base.cache_dir), "-m", str(base_gguf), *[x for f in loras for x in ("--lora", str(f))],
                "--lora-init-without-apply", "-np", str(parallel), "-c", str(max_context * parallel), *where]
    ranks = [json.loads((Path(a.path) / "adapter_config.json").read_text())["r"] for a in adapters]
    rank = next(r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= max(ranks))  # vLLM's allowed --max-lora-rank values
    return ["vllm", "serve", model.base_id if model.from_hub else model.folder, "--served-model-name", "base",
            "--enable-lora", "--max-loras", str(min(len(adapters), parallel)), "--max-lora-rank", str(rank),
            "--lora-modules", *[f"{a.name}={Path(a.path).resolve()}" for a in adapters],
            "--max-model-len", str(max_context), "--max-num-seqs", str(parallel), *where]
