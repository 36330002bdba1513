"""Every persona behind an OpenAI-compatible API: request checks, a batching scheduler, the FastAPI app.

One scheduler thread owns the model and batches continuously: the running requests form one
left-padded batch with its KV cache (a lane); a new request joins at the next decoding step, its
prompt prefilled after the cached KV of its persona's system prompt, and each row leaves, KV cache
included, as soon as its reply ends, its client goes away or its own token limit is reached.
Personas share the lane, each row with its own adapter (personakit/mixed_lora.py); adapters that
are not plain LoRA, or `--batching per-persona`, give one lane per persona, taking turns step by
step. On the embedded base (busy CPU, one thread) one decoding step of 8 rows of two personas took
167 ms mixed against 2 x 100 ms as two lanes of 4. Prompts are rendered with the training template
code and each persona's own system prompt; long conversations are cut with chat.py's memory code.
With --user-memory, each (persona, request `user`) pair has its own saved conversation (chat.py's
session files), which gives the prompt its memory and receives every completed exchange.
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time.
import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import queue
import random
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .conversations import ConversationStore
from .conversations import Exchange as SavedExchange
from .engine import PER_BATCH, PER_ROW, PREFIXES, Batch, Engine, Sampling, TextRow, joinable
from .errors import UserError
from .flags import check_args
from .generation import Decoding
from .memory import Exchange, context_size, fit_to_budget, memory_window, retrieve
from .persona import AdapterInfo
from .template import build_messages, prompt_ids

BASE = "base"  # the model name that serves the base with every adapter off
MIN_SHARED = 8  # a shorter common prompt start is not worth a cached prefix
OWNER = "personakit"
# Parameters that change what the model would produce and that this server cannot honour.
UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "parallel_tool_calls": "tool calling", "logprobs": "logprobs",
    "top_logprobs": "logprobs", "logit_bias": "logit_bias", "audio": "audio output", "prediction": "predicted outputs",
    "response_format": "response_format", "presence_penalty": "presence_penalty (the persona's --repetition-penalty applies)",
    "frequency_penalty": "frequency_penalty (the persona's --repetition-penalty applies)",
    "web_search_options": "web search", "reasoning_effort": "reasoning_effort",
}
# Accepted because they do not change the reply: who asks, bookkeeping, transport.
HARMLESS = {"user", "metadata", "store", "service_tier", "stream_options", "modalities", "safety_identifier", "prompt_cache_key"}
ROLES = {"system", "developer", "user", "assistant"}


@dataclass
class ServeSettings:
    decoding: Decoding  # the persona's defaults, the same flags as chat.py
    max_context: int  # tokens for prompt plus reply
    memory_turns: int
    retrieve_k: int
    client_system: str  # "ignore" or "append"
    api_key: str | None
    max_batch: int
    mix_personas: bool = True  # --batching mixed
    conversations_root: Path | None = None  # set = --user-memory on


class ApiError(Exception):
    """An error the client receives in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- request checking -------------------------------------------------------------------------

@dataclass
class ChatRequest:
    model: str
    system: str | None  # the client's system message, if any
    history: list[Exchange]
    message: str
    stream: bool
    include_usage: bool
    sampling: Sampling  # its seed: `seed`, or one the server draws
    max_tokens: int
    seed: int | None
    stop: list[str]
    user: str | None = None  # OpenAI's `user` field (or the X-User header): whose saved conversation


def _number(body: dict[str, Any], name: str, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, not {json.dumps(value)}", name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' is {value}, outside the allowed range {low:g} to {high:g}", name)
    return value


def _text(content: Any, where: str) -> str:
    """Message content as text: a string, or a list of text parts (images and audio are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"{where} has a content part of type {kind!r}; only text parts are supported", where)
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where} content must be a string or a list of text parts", where)


def _conversation(messages: Any) -> tuple[str | None, list[Exchange], str]:
    """OpenAI messages -> (client system text, earlier exchanges, the last user message).

    Consecutive messages of one role join with a newline (group bots send several); assistant
    messages before the first user message have no question to pair with and are left out.
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    system: list[str] = []
    turns: list[list[Any]] = []  # [role, [texts]]
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise ApiError(400, f"{where} is a tool message or tool call; tool calling is not supported", where)
        if role not in ROLES:
            raise ApiError(400, f"{where} has role {json.dumps(role)}; use system, user or assistant", f"{where}.role")
        text = _text(m.get("content"), where) if m.get("content") is not None else ""
        if role in ("system", "developer"):
            if text.strip():
                system.append(text)
        elif turns and turns[-1][0] == role:
            turns[-1][1].append(text)
        elif role == "user" or turns:
            turns.append([role, [text]])
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the conversation must end with a user message for the persona to answer", "messages")
    joined = ["\n".join(texts) for _, texts in turns]
    if not joined[-1].strip():
        raise ApiError(400, "the last user message is empty; send some text to answer", "messages")
    history = [(joined[i], joined[i + 1]) for i in range(0, len(joined) - 1, 2)]
    return ("\n\n".join(system) or None), history, joined[-1]


def parse_request(body: Any, models: list[str], settings: ServeSettings) -> ChatRequest:
    """Check a /v1/chat/completions body; every problem is an ApiError that says what to change."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"'model' is required: one of {', '.join(models)}", "model")
    if model not in models:
        raise ApiError(404, f"no model named {model!r}; this server has: {', '.join(models)}", "model", "model_not_found")
    for name, what in UNSUPPORTED.items():
        value = body.get(name)
        if value not in (None, False, 0, [], {}) and not (name == "response_format" and isinstance(value, dict) and value.get("type") == "text"):
            raise ApiError(400, f"'{name}' is not supported by this server ({what}); leave it out", name, "unsupported_parameter")
    known = {"model", "messages", "stream", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens",
             "seed", "stop", "n"} | HARMLESS | set(UNSUPPORTED)
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, f"unrecognized request argument {unknown[0]!r}; this server cannot honour it, so leave it out", unknown[0])
    n = _number(body, "n", 1, 128, integer=True)
    if n not in (None, 1):
        raise ApiError(400, f"'n' is {n}; this server returns one choice per request, so send n=1 (or several requests)", "n")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")

    d = settings.decoding
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    if top_p == 0:
        raise ApiError(400, "'top_p' must be above 0", "top_p")
    top_k = _number(body, "top_k", 0, 1_000_000, integer=True)
    limit = settings.max_context - 1
    max_tokens = _number(body, "max_tokens", 1, limit, integer=True)
    max_tokens = _number(body, "max_completion_tokens", 1, limit, integer=True) or max_tokens
    seed = _number(body, "seed", -(2 ** 63), 2 ** 64 - 1, integer=True)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 non-empty strings", "stop")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, "'user' must be a string that identifies the end user", "user")
    system, history, message = _conversation(body.get("messages"))
    return ChatRequest(
        model=model, system=system, history=history, message=message, stream=stream,
        include_usage=bool(options.get("include_usage")),
        sampling=Sampling(do_sample=(temperature if temperature is not None else d.temperature if d.do_sample else 0) > 0,
                          temperature=temperature if temperature else d.temperature, top_p=top_p or d.top_p,
                          top_k=d.top_k if top_k is None else top_k),
        max_tokens=max_tokens or d.max_new_tokens,
        seed=None if seed is None else seed % 2 ** 63, stop=stops, user=user or None,
    )


def system_prompt(persona: AdapterInfo | None, client: str | None, mode: str) -> str | None:
    """The persona's training system prompt always; the client's is dropped or appended (`mode`).
    The base has no training prompt, so it takes the client's as given."""
    if persona is None:
        return client
    if client and mode == "append":
        return f"{persona.system}\n\n{client}"
    return persona.system


def user_window(saved: list[Exchange], sent: list[Exchange], message: str, turns: int, retrieve_k: int) -> list[Exchange]:
    """A user's memory: the recent window is the history the client sent, or the last `turns`
    saved exchanges when it sent none; retrieval looks over every saved exchange not in that window."""
    recent = list((sent or saved)[-turns:]) if turns > 0 else []
    earlier = retrieve([e for e in saved if e not in recent], message, retrieve_k) if retrieve_k > 0 else []
    return earlier + recent


def fit_prompt(tokenizer: Any, system: str | None, req: ChatRequest, settings: ServeSettings,
               saved: list[Exchange] | None = None) -> tuple[list[int], int]:
    """Prompt token ids with the recent exchanges that fit `--max-context` minus the reply
    (chat.py's memory code, oldest dropped first); returns them and how many exchanges were kept.
    `saved`: the user's saved exchanges under --user-memory (see `user_window`)."""
    def render(memory: list[Exchange]) -> list[int]:
        return prompt_ids(tokenizer, build_messages({"instruction": req.message, "history": [list(p) for p in memory]}, system))

    budget = settings.max_context - req.max_tokens
    if saved is None:
        window = memory_window(req.history, req.message, settings.memory_turns, settings.retrieve_k)
    else:
        window = user_window(saved, req.history, req.message, settings.memory_turns, settings.retrieve_k)
    kept = fit_to_budget(window, lambda memory: len(render(memory)), budget)
    ids = render(kept)
    if len(ids) > budget:
        raise ApiError(
            400, f"the last message makes a {len(ids)}-token prompt, over the {budget} tokens left by a reply of "
            f"{req.max_tokens} in this server's context of {settings.max_context}; shorten it or lower max_tokens",
            "messages", "context_length_exceeded",
        )
    return ids, len(kept)


# ---- the scheduler ------------------------------------------------------------------------------

@dataclass(eq=False)
class Job(TextRow):
    """One request inside the scheduler: an engine row whose text goes back to the request's event
    loop through `emit`: ("delta", text), ("end", finish, text) or ("error", ApiError)."""

    emit: Callable[[tuple], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    first_token_at: float | None = None

    def __post_init__(self) -> None:
        self.on_text = lambda piece: self.emit(("delta", piece))

    def update(self, decode: Callable[[list[int]], str]) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        super().update(decode)
        if self.finish is not None:
            self.emit(("end", self.finish, self.sent))

    def abandoned(self) -> bool:
        return self.cancelled.is_set()


class Scheduler:
    """The thread that owns the engine and decodes every running request, batched continuously.

    A request joins its lane (the one mixed batch, or its persona's) at the next step, up to
    `max_batch` rows: the engine prefills its prompt and stacks its cache rows onto the lane's. It
    leaves as soon as its reply ends. Lanes take one decoding step each in turn.
    """

    def __init__(self, model: Any, tokenizer: Any, decoding: Decoding, max_batch: int, tokenizer_lock: threading.Lock,
                 mix_personas: bool = True):
        self.engine = Engine(model, tokenizer, repetition_penalty=decoding.repetition_penalty,
                             no_repeat_ngram_size=decoding.no_repeat_ngram_size, routing=PER_ROW if mix_personas else PER_BATCH,
                             tokenizer_lock=tokenizer_lock)
        self.max_batch = max_batch
        self.pending: queue.Queue[Job | None] = queue.Queue()
        self.waiting: list[Job] = []  # taken off `pending`, not yet in a lane
        self.lanes: dict[str | None, Batch] = {}
        self.thread = threading.Thread(target=self._loop, name="personakit-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self.pending.put(job)

    def _collect(self) -> bool:
        """Move arrived requests to `waiting` (blocking while there is nothing to do); False once the server is stopping."""
        arrived = [self.pending.get()] if not self.waiting and not self.lanes else []
        while True:
            try:
                arrived.append(self.pending.get_nowait())
            except queue.Empty:
                break
        if None in arrived:  # close(): fail everything still running or waiting
            stopping = ApiError(503, "the server is stopping; send the request again later", kind="server_error")
            for job in [j for lane in self.lanes.values() for j in lane.rows] + self.waiting + arrived:
                if job is not None and job.finish is None:
                    job.emit(("error", stopping))
            return False
        self.waiting = [j for j in self.waiting + arrived if not j.cancelled.is_set()]
        return True

    def _loop(self) -> None:
        while self._collect():
            self._admit()
            for key in list(self.lanes):
                try:
                    lane = self.engine.step(self.lanes[key])
                except Exception:  # the thread must survive: fail this lane, keep serving
                    lane = None
                    self._fail(self.lanes[key].rows)
                if lane is None:
                    del self.lanes[key]
                else:
                    self.lanes[key] = lane

    def _fail(self, jobs: list[Any]) -> None:
        traceback.print_exc(file=sys.stderr)
        for job in jobs:
            if job.finish is None:
                job.finish = "error"
                job.emit(("error", ApiError(500, "generation failed inside the server; see its log", kind="server_error")))

    def _admit(self) -> None:
        """Start the waiting requests, oldest first, in their lane while it has room."""
        key_of = self.engine.adapters.key
        for key in dict.fromkeys(key_of(j.adapter) for j in self.waiting):
            lane = self.lanes.get(key)
            if lane is not None and not joinable(lane.cache):
                continue
            room = self.max_batch - (len(lane.rows) if lane else 0)
            jobs = [j for j in self.waiting if key_of(j.adapter) == key][:room]
            if not jobs:
                continue
            taken = {id(j) for j in jobs}
            self.waiting = [j for j in self.waiting if id(j) not in taken]
            lane = self.engine.add(lane, jobs, failed=self._fail)
            if lane is None:
                self.lanes.pop(key, None)
            else:
                self.lanes[key] = lane


# ---- per-user memory -----------------------------------------------------------------------------

def user_session(user: str) -> str:
    """The session name of a request's `user`: a hash, so that the file name tells nothing about who it is."""
    return "u-" + hashlib.sha256(user.encode("utf-8")).hexdigest()[:16]


class UserConversation:
    """One user's saved conversation with one persona; a lock keeps its appends in order."""

    def __init__(self, store: ConversationStore, exchanges: list[Exchange]):
        self.store, self.exchanges, self.lock = store, exchanges, threading.Lock()

    def snapshot(self) -> list[Exchange]:
        with self.lock:
            return list(self.exchanges)

    def append(self, message: str, reply: str, speaker: str) -> None:
        with self.lock:
            self.store.append(SavedExchange(message, reply, speaker))  # fsynced before memory uses it
            self.exchanges.append((message, reply))


class UserMemory:
    """--user-memory: conversations/<persona>/u-<hash of user>.jsonl, each opened (and flock-ed) on
    the user's first request and kept open until `close()`, the server's shutdown."""

    def __init__(self, root: Path, log: Callable[[str], None]):
        self.root, self.log = root, log
        self.conversations: dict[tuple[str, str], UserConversation] = {}
        self.lock = threading.Lock()

    def get(self, persona: str, user: str) -> UserConversation:
        session = user_session(user)
        with self.lock:
            found = self.conversations.get((persona, session))
            if found is None:
                store = ConversationStore(self.root, persona, session)
                try:
                    saved = store.open()
                except UserError as exc:
                    self.log(f"serve: user memory: {exc}")
                    raise ApiError(503, "this user's saved conversation cannot be opened; see the server log", "user",
                                   kind="server_error") from None
                if saved.skipped:
                    self.log(f"serve: user memory: skipped {len(saved.skipped)} unreadable line(s) of {store.path}; they stay in the file untouched")
                found = self.conversations[(persona, session)] = UserConversation(store, [(e.user, e.reply) for e in saved.exchanges])
            return found

    def close(self) -> None:
        with self.lock:
            for conversation in self.conversations.values():
                with conversation.lock:
                    conversation.store.close()
            self.conversations.clear()


# ---- the HTTP API -------------------------------------------------------------------------------

class Server:
    """The loaded model, the personas on it, the settings and the scheduler behind the app."""

    def __init__(self, model: Any, tokenizer: Any, personas: list[AdapterInfo], settings: ServeSettings,
                 log: Callable[[str], None] | None = None):
        self.tokenizer, self.settings = tokenizer, settings
        self.personas = {p.name: p for p in personas}
        self.models = [*self.personas, BASE]
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.lock = threading.Lock()
        self.scheduler = Scheduler(model, tokenizer, settings.decoding, settings.max_batch, self.lock, settings.mix_personas)
        self.seeds = random.Random(settings.decoding.seed)  # unseeded requests: reproducible per server run, new per request
        self.created = int(time.time())
        self.starts: dict[str | None, list[int]] = {}  # system prompt -> the prompt start every request with it has
        root = settings.conversations_root
        self.user_memory = UserMemory(root, self.log) if root is not None else None

    def prompt_start(self, system: str | None) -> list[int]:
        """The tokens every prompt with this system prompt starts with under the chat template:
        what two renderings with unlike messages have in common (checked against each prompt)."""
        if system not in self.starts:
            if len(self.starts) >= PREFIXES * 4:  # clients that append their own system prompts: keep it bounded
                self.starts.clear()
            a, b = (prompt_ids(self.tokenizer, build_messages({"instruction": text, "history": []}, system)) for text in ("Hello", "?"))
            self.starts[system] = a[:next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))]
        return self.starts[system]

    def conversation(self, req: ChatRequest) -> UserConversation | None:
        """The saved conversation of the request's user with its persona (--user-memory and a `user` only)."""
        if self.user_memory is None or not req.user:
            return None
        return self.user_memory.get(req.model, req.user)

    def prepare(self, req: ChatRequest, emit: Callable[[tuple], None], conversation: UserConversation | None = None) -> Job:
        persona = self.personas.get(req.model)
        saved = conversation.snapshot() if conversation else None
        system = system_prompt(persona, req.system, self.settings.client_system)
        with self.lock:
            ids, _ = fit_prompt(self.tokenizer, system, req, self.settings, saved)
            start = self.prompt_start(system)
        return Job(
            shared=len(start) if len(start) >= MIN_SHARED and len(start) < len(ids) and ids[:len(start)] == start else 0,
            adapter=persona.name if persona else None, prompt=ids, max_tokens=req.max_tokens, stop=req.stop, emit=emit,
            sampling=dataclasses.replace(req.sampling, seed=req.seed if req.seed is not None else self.seeds.randrange(2 ** 63)),
        )


def create_app(engine: Server) -> Any:
    """The FastAPI app: /health, /v1/models, /v1/chat/completions (plain and streamed)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        engine.scheduler.start()
        try:
            yield
        finally:
            engine.scheduler.close()
            if engine.user_memory:
                engine.user_memory.close()

    app = FastAPI(title="personakit", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    settings = engine.settings

    class JobStream(StreamingResponse):
        """However the response ends (done, client gone, server stopping), the job stops."""

        def __init__(self, content: Any, job: Job):
            super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.job = job

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancelled.set()

    def error_response(err: ApiError, path: str) -> JSONResponse:
        engine.log(f"serve: {path} {err.status} {err.message}")
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind=kind), request.url.path)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        traceback.print_exception(exc, file=sys.stderr)
        return error_response(ApiError(500, "internal server error; see the server log", kind="server_error"), request.url.path)

    @app.middleware("http")
    async def require_key(request: Request, call_next: Any) -> Any:
        if settings.api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            given = header[7:].strip() if header[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                what = "a wrong API key" if given else "no API key"
                return error_response(ApiError(401, f"this server needs an API key: the request has {what}; send "
                                               "'Authorization: Bearer <key>' with the key the server was started with",
                                               code="invalid_api_key"), request.url.path)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": engine.created, "owned_by": OWNER}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in engine.models]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> Any:
        if name not in engine.models:
            return error_response(ApiError(404, f"no model named {name!r}; this server has: {', '.join(engine.models)}",
                                           "model", "model_not_found"), "/v1/models")
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        started = time.perf_counter()
        path = "/v1/chat/completions"
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"the request body is not valid JSON ({exc}); send a JSON object") from None
            req = parse_request(body, engine.models, settings)
            req.user = req.user or request.headers.get("x-user") or None
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[tuple] = asyncio.Queue()

            def emit(event: tuple) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, event)
                except RuntimeError:  # the loop is gone: the server is stopping
                    pass

            conversation = await run_in_threadpool(engine.conversation, req)
            job = await run_in_threadpool(engine.prepare, req, emit, conversation)
        except ApiError as err:
            return error_response(err, path)

        async def remember(reply: str) -> None:
            """A complete reply joins the user's saved conversation before the client sees its end."""
            if conversation is None or not reply:
                return
            try:
                await run_in_threadpool(conversation.append, req.message, reply, req.model)
            except (OSError, RuntimeError) as exc:  # the reply still goes out; the log says what was lost
                engine.log(f"serve: user memory: could not save the exchange to {conversation.store.path} ({exc})")

        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def finished(status: str) -> None:
            ttft = f", first token {1000 * (job.first_token_at - started):.0f} ms" if job.first_token_at else ""
            engine.log(f"serve: {req.model} {status}: {len(job.prompt)} prompt + {len(job.tokens)} reply tokens, "
                       f"{1000 * (time.perf_counter() - started):.0f} ms{ttft}{', stream' if req.stream else ''}")

        def usage() -> dict[str, int]:
            return {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.tokens),
                    "total_tokens": len(job.prompt) + len(job.tokens)}

        engine.scheduler.submit(job)
        if not req.stream:
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(events.get(), timeout=0.5)
                    except TimeoutError:
                        if await request.is_disconnected():
                            job.cancelled.set()
                            finished("client gone")
                            return JSONResponse({}, status_code=499)
                        continue
                    if event[0] == "error":
                        finished("failed")
                        return error_response(event[1], path)
                    if event[0] == "end":
                        break
            finally:
                job.cancelled.set()  # a no-op once finished; stops the job if this handler is cancelled
            await remember(event[2])
            finished(event[1])
            return {
                "id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": event[2]},
                             "finish_reason": event[1], "logprobs": None}],
                "usage": usage(),
            }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def sse() -> Any:
            status = "client gone"
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    event = await events.get()
                    if event[0] == "delta":
                        yield chunk({"content": event[1]})
                    elif event[0] == "error":
                        status = "failed"
                        yield f"data: {json.dumps(event[1].body())}\n\n"
                        break
                    else:
                        status = event[1]
                        await remember(event[2])
                        yield chunk({}, event[1])
                        if req.include_usage:
                            data = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                    "model": req.model, "choices": [], "usage": usage()}
                            yield f"data: {json.dumps(data)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()
                finished(status)

        return JobStream(sse(), job)

    return app


def engine_from_args(args: Any, log: Callable[[str], None] | None = None) -> Server:
    """Load the base once, attach every adapter serve.py's flags name, and build the engine."""
    from .evaluation import base_for, pick_adapters
    from .flags import decoding_from_args
    from .loading import attach_adapters, load_base
    from .template import require_chat_template

    adapters = pick_adapters(args.adapters_root, names=args.personas, paths=args.adapters)
    loaded = load_base(base_for(adapters, args.base), cache_dir=args.cache_dir, load_in_4bit=args.load_in_4bit,
                       trust_remote_code=args.trust_remote_code, cpu_dtype=args.cpu_dtype)
    require_chat_template(loaded.tokenizer)
    model = attach_adapters(loaded, adapters, args.allow_base_mismatch)
    max_context = context_size(loaded.model, args.max_context)
    if max_context <= args.max_new_tokens:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} fills the whole context of {max_context} tokens; lower it or raise --max-context")
    settings = ServeSettings(
        decoding=decoding_from_args(args), max_context=max_context, memory_turns=args.memory_turns,
        retrieve_k=args.retrieve_k if args.memory == "retrieval" else 0, client_system=args.client_system,
        api_key=args.api_key, max_batch=args.max_batch, mix_personas=args.batching == "mixed",
        conversations_root=Path(args.conversations_root) if args.user_memory else None,
    )
    engine = Server(model, loaded.tokenizer, adapters, settings, log)
    mixed = engine.scheduler.engine.adapters.mixed is not None
    engine.log(
        f"serve: {', '.join(engine.models)} on {loaded.ref.base_id} ({loaded.device}{', 4-bit' if loaded.quantized else ''}); "
        f"{max_context} context tokens, memory {args.memory} {args.memory_turns} exchanges, batches of up to {args.max_batch} ({'personas mixed' if mixed else 'one persona each'}), "
        f"client system messages: {args.client_system}, "
        f"user memory: {f'on, saved under {args.conversations_root}' if args.user_memory else 'off'}; " + " ".join(f"{k}={v}" for k, v in settings.decoding.as_dict().items())
    )
    return engine


def check_serve_args(args: Any) -> None:
    """serve.py's flags that cannot work together, each as one sentence."""
    check_args(args)
    if args.min_reply_chars:
        raise UserError("--min-reply-chars cannot work in a server: a streamed reply cannot be taken back to ask again; leave it out")
    if args.repetition_scope != "reply":
        raise UserError("serve.py applies the repetition controls to the reply only (a batch's padding would count under 'all'); leave --repetition-scope out")


def serve(args: Any) -> int:
    """serve.py: check flags, load everything once, serve until Ctrl-C."""
    import socket

    import uvicorn

    check_serve_args(args)
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise UserError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}); pick another --port or stop what uses it") from None
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this machine can use every persona; "
              "set --api-key or PERSONAKIT_API_KEY", file=sys.stderr, flush=True)
    if args.user_memory:
        import resource

        # Every user seen keeps one session file open (and locked); the usual soft limit of 1024 files would cap a bot's users.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    engine = engine_from_args(args)
    app = create_app(engine)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {', '.join(engine.models)} at http://{shown}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0
