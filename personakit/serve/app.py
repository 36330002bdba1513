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
from .protocol import ApiError, ServeSettings, parse_request
from .scheduler import Job
from .server import Server, load_server

OWNER = "personakit"


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
            engine.log(f"serve: {req.model} {status}: {len(job.prompt)} prompt + {job.reply_tokens()} reply tokens, "
                       f"{1000 * (time.perf_counter() - started):.0f} ms{ttft}{', stream' if req.stream else ''}")

        def usage() -> dict[str, int]:
            return {"prompt_tokens": len(job.prompt), "completion_tokens": job.reply_tokens(),
                    "total_tokens": len(job.prompt) + job.reply_tokens()}

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
    if args.user_memory:
        import resource

        # Every user seen keeps one session file open (and locked); the usual soft limit of 1024 files would cap a bot's users.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = server_from_args(args)
    app = create_app(server)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {', '.join(server.models)} at http://{shown}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0
