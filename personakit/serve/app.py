"""The server's HTTP side: the FastAPI app (routes, SSE streaming, API key), and startup from serve.py's flags."""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time.
import asyncio
import contextlib
import hmac
import json
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..flags import check_args
from ..text import language_of
from .limits import check_sizes, read_json
from .protocol import ApiError, Limits, ServeSettings, parse_request
from .scheduler import Job
from .server import Server, load_server

OWNER = "personakit"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
RETRY_AFTER = 1  # seconds a client told 429 waits: a batch slot frees up every few decoding steps


def host_name(host: str) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def create_app(server: Server) -> Any:
    """The FastAPI app: /health, /v1/models, /v1/chat/completions (plain and streamed)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.close()
            if server.user_memory:
                server.user_memory.close()

    app = FastAPI(title="personakit", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    settings = server.settings
    limits = settings.limits
    languages = {name: language_of(p.system) for name, p in server.personas.items()}
    told: set[str] = set()  # the clients (User-Agent) already told about in the log that their tools are ignored

    class JobStream(StreamingResponse):
        """However the response ends (done, client gone, server stopping), the job stops."""

        def __init__(self, content: Any, job: Job, done: Callable[[], None]):
            super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.job, self.done = job, done

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancelled.set()
                self.done()  # the stream may end before its body ever started

    def error_response(err: ApiError, path: str) -> JSONResponse:
        server.log(f"serve: {path} {err.status} {err.message}")
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {"Retry-After": str(RETRY_AFTER)} if err.status == 429 else None
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
    async def guard(request: Request, call_next: Any) -> Any:
        """What every request must get right before any work is done for it."""
        path = request.url.path
        host = host_name(request.headers.get("host", ""))
        if limits.local_hosts_only and host not in LOOPBACK:
            # A web page can reach a localhost server through a name that resolves to 127.0.0.1 (DNS rebinding).
            return error_response(ApiError(400, f"this server listens on localhost only and does not answer for Host {host!r}; "
                                           "use http://127.0.0.1:<port>, or start serve.py with --host and --api-key"), path)
        if settings.api_key and path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            given = header[7:].strip() if header[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                what = "a wrong API key" if given else "no API key"
                return error_response(ApiError(401, f"this server needs an API key: the request has {what}; send "
                                               "'Authorization: Bearer <key>' with the key the server was started with",
                                               code="invalid_api_key"), path)
        if request.method == "POST":
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                # A web page can send text/plain anywhere without asking; application/json needs CORS's permission.
                return error_response(ApiError(415, f"the request body must be sent as 'Content-Type: application/json', "
                                               f"not {kind or 'none'!r}", code="unsupported_media_type"), path)
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > limits.max_body_bytes:
                return error_response(too_large(), path)
        return await call_next(request)

    def too_large() -> ApiError:
        return ApiError(413, f"the request body is over this server's limit of {limits.max_body_bytes} bytes (--max-body-bytes); "
                        "send a shorter conversation", code="request_too_large")

    async def read_body(request: Request) -> bytes:
        """The body, refused once it passes the limit (a chunked body has no length to check up front)."""
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limits.max_body_bytes:
                raise too_large()
            parts.append(part)
        return b"".join(parts)

    @app.get("/health")
    async def health() -> Any:
        if not server.scheduler.alive():
            reason = server.scheduler.failure or "the decoding thread is not running"
            return JSONResponse({"status": "error", "error": reason}, status_code=503)
        return {"status": "ok", "queued": server.scheduler.backlog()}

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": server.created, "owned_by": OWNER}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in server.models]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> Any:
        if name not in server.models:
            return error_response(ApiError(404, f"no model named {name!r}; this server has: {', '.join(server.models)}",
                                           "model", "model_not_found"), "/v1/models")
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        started = time.perf_counter()
        deadline = started + limits.request_timeout
        path = "/v1/chat/completions"
        conversation = None
        held: list[Any] = []  # the user's conversation while this request uses it

        def release() -> None:
            while held:
                server.user_memory.release(held.pop())

        try:
            raw = await read_body(request)
            req = await run_in_threadpool(checked_request, raw, request.headers.get("x-user") or None)
            if not server.scheduler.alive():
                raise ApiError(503, f"the server cannot answer: its decoding thread has stopped ({server.scheduler.failure}); "
                               "restart the server", kind="server_error")
            if server.scheduler.backlog() >= limits.max_queue:
                raise ApiError(429, f"the server is busy: {limits.max_queue} requests are waiting already (--max-queue); "
                               f"try again in {RETRY_AFTER} s", code="rate_limit_exceeded", kind="rate_limit_error")
            client = request.headers.get("user-agent", "a client without a User-Agent")[:200]
            if req.ignored and client not in told and len(told) < 1000:
                told.add(client)
                server.log(f"serve: {client} sends {', '.join(req.ignored)}; answered as plain text, since the personas "
                           "have no tools (--tools reject refuses such requests)")
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[tuple] = asyncio.Queue()

            def emit(event: tuple) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, event)
                except RuntimeError:  # the loop is gone: the server is stopping
                    pass

            conversation = await run_in_threadpool(server.conversation, req)
            if conversation is not None:
                held.append(conversation)
            job = await run_in_threadpool(server.prepare, req, emit, conversation)
        except ApiError as err:
            release()
            return error_response(err, path)
        except BaseException:  # cancelled (the client left) or a bug: the conversation must not stay held
            release()
            raise

        async def remember(reply: str) -> None:
            """A complete reply joins the user's saved conversation before the client sees its end."""
            if conversation is None or not reply:
                return
            try:
                await run_in_threadpool(conversation.append, req.message, reply, req.model)
            except (OSError, RuntimeError) as exc:  # the reply still goes out; the log says what was lost
                server.log(f"serve: user memory: could not save the exchange to {conversation.store.path} ({exc})")

        async def next_event() -> tuple:
            """The job's next event, or its end as an error once the request's deadline has passed."""
            left = deadline - time.perf_counter()
            try:
                return await asyncio.wait_for(events.get(), timeout=max(left, 0.001))
            except TimeoutError:
                job.cancelled.set()
                return ("error", ApiError(504, f"the reply did not end within this server's {limits.request_timeout:g} s per request "
                                               "(--request-timeout); ask for fewer max_tokens or try again later",
                                          code="timeout", kind="server_error"))

        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def finished(status: str) -> None:
            ttft = f", first token {1000 * (job.first_token_at - started):.0f} ms" if job.first_token_at else ""
            server.log(f"serve: {req.model} {status}: {len(job.prompt)} prompt + {job.reply_tokens()} reply tokens, "
                       f"{1000 * (time.perf_counter() - started):.0f} ms{ttft}{', stream' if req.stream else ''}")

        def usage() -> dict[str, int]:
            return {"prompt_tokens": len(job.prompt), "completion_tokens": job.reply_tokens(),
                    "total_tokens": len(job.prompt) + job.reply_tokens()}

        server.scheduler.submit(job)
        if not req.stream:
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(next_event(), timeout=0.5)
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
                await remember(event[2])
            finally:
                job.cancelled.set()  # a no-op once finished; stops the job if this handler is cancelled
                release()
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
                    event = await next_event()
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
                release()
                finished(status)

        return JobStream(sse(), job, release)

    def checked_request(raw: bytes, header_user: str | None) -> Any:
        """The body read, bounded and checked into a ChatRequest (on a worker thread: a big body must not stall the streams)."""
        body = read_json(raw)
        check_sizes(body, limits)
        req = parse_request(body, server.models, settings, languages)
        if header_user is not None and (limits.trust_user_header or not req.user):
            req.user = header_user  # the proxy's header wins when trusted; else it fills in a missing `user`
        return req

    if limits.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        # Outermost, so that a browser's preflight is answered before the key is asked for.
        app.add_middleware(CORSMiddleware, allow_origins=list(limits.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-User"], max_age=600)

    return app


def server_from_args(args: Any, log: Callable[[str], None] | None = None) -> Server:
    """serve.py's flags as typed settings, then `load_server`."""
    from ..evaluation import pick_adapters
    from ..flags import decoding_from_args
    from ..loading import BaseOptions

    settings = ServeSettings(
        decoding=decoding_from_args(args), max_context=args.max_context, memory_turns=args.memory_turns,
        retrieve_k=args.retrieve_k if args.memory == "retrieval" else 0, client_system=args.client_system,
        api_key=args.api_key, max_batch=args.max_batch, mix_personas=args.batching == "mixed",
        conversations_root=Path(args.conversations_root) if args.user_memory else None,
        limits=Limits(max_body_bytes=args.max_body_bytes, max_messages=args.max_messages, max_message_chars=args.max_message_chars,
                      max_queue=args.max_queue, request_timeout=args.request_timeout, max_open_users=args.max_open_users,
                      trust_user_header=args.trust_user_header, local_hosts_only=args.host in LOOPBACK,
                      cors_origins=tuple(args.cors_origin or ())),
        tools=args.tools,
    )
    adapters = pick_adapters(args.adapters_root, names=args.personas, paths=args.adapters)
    if args.engine != "local":
        from .external import DEFAULT_URLS, load_external_server

        return load_external_server(args.engine, args.engine_url or DEFAULT_URLS[args.engine], args.engine_api_key, adapters,
                                    BaseOptions.from_args(args), settings, log)
    return load_server(adapters, BaseOptions.from_args(args), settings, log)


def print_engine_command(args: Any) -> int:
    """serve.py --print-engine-command KIND: the command that starts KIND with every persona, for --engine KIND."""
    import shlex

    from ..evaluation import pick_adapters
    from ..loading import BaseOptions
    from .external import DEFAULT_URLS, engine_command

    kind = args.print_engine_command
    adapters = pick_adapters(args.adapters_root, names=args.personas, paths=args.adapters)
    print(shlex.join(engine_command(kind, adapters, BaseOptions.from_args(args), args.max_context, args.max_new_tokens,
                                    args.max_batch, args.engine_url or DEFAULT_URLS[kind], Path(args.exports_root))))
    return 0


def check_serve_args(args: Any) -> None:
    """serve.py's flags that cannot work together, each as one sentence."""
    check_args(args)
    if args.min_reply_chars:
        raise UserError("--min-reply-chars cannot work in a server: a streamed reply cannot be taken back to ask again; leave it out")
    if args.repetition_scope != "reply":
        raise UserError("serve.py applies the repetition controls to the reply only (a batch's padding would count under 'all'); leave --repetition-scope out")


def serve(args: Any) -> int:
    """serve.py: check flags, load everything once, serve until Ctrl-C."""
    import signal
    import socket

    import uvicorn

    check_serve_args(args)
    if args.print_engine_command:
        return print_engine_command(args)
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise UserError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}); pick another --port or stop what uses it") from None
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this machine can use every persona; "
              "set --api-key or PERSONAKIT_API_KEY", file=sys.stderr, flush=True)
    server = server_from_args(args)
    app = create_app(server)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {', '.join(server.models)} at http://{shown}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    # uvicorn shuts down gracefully on Ctrl-C or SIGTERM (replies get --shutdown-grace seconds to end, the
    # user files are closed), then raises the signal again: these handlers make that second one a clean exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning",
                    timeout_graceful_shutdown=args.shutdown_grace)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
