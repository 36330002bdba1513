"""The server's request schema: what a /v1/chat/completions body may hold, checked into a ChatRequest,
and OpenAI-shaped errors; the server settings a request is checked against."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine import Sampling
from ..generation import Decoding
from ..memory import Exchange
from ..text import language_of

# Parameters that change what the model would produce and that this server cannot honour.
UNSUPPORTED = {
    "logprobs": "logprobs", "top_logprobs": "logprobs", "logit_bias": "logit_bias", "audio": "audio output",
    "prediction": "predicted outputs", "response_format": "response_format", "web_search_options": "web search",
    "reasoning_effort": "reasoning_effort",
}
# Tool calling, and the shape each parameter must have. A persona has no tools: under `--tools ignore`
# (the default) bots that always send their plugins' tools get the persona's plain reply.
TOOLS = {"tools": list, "tool_choice": (str, dict), "parallel_tool_calls": bool, "functions": list, "function_call": (str, dict)}
# Accepted because they do not change the reply: who asks, bookkeeping, transport.
HARMLESS = {"user", "metadata", "store", "service_tier", "stream_options", "modalities", "safety_identifier", "prompt_cache_key"}
# Content parts the persona cannot see become the placeholder chat exports write for them (personakit/exports.py),
# in the persona's language; text parts are kept.
MEDIA_PARTS = {"image_url": "image", "input_image": "image", "input_audio": "voice", "file": "file"}
PLACEHOLDERS = {"zh": {"image": "[图片]", "voice": "[语音]", "file": "[文件]"},
                "en": {"image": "[image]", "voice": "[voice]", "file": "[file]"}}
# Below this a temperature is greedy: dividing the logits by it overflows float32 long before 1e-300.
MIN_TEMPERATURE = 1e-5
ROLES = {"system", "developer", "user", "assistant"}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (serve.py's "limits" flags; see serve/limits.py)."""

    max_body_bytes: int = 4_000_000
    max_messages: int = 1_000
    max_message_chars: int = 100_000
    max_stop_chars: int = 64
    max_queue: int = 64  # requests waiting for a batch; beyond, 429
    request_timeout: float = 300.0  # seconds from arrival to the reply's end
    max_open_users: int = 256  # --user-memory conversations kept open
    trust_user_header: bool = False  # X-User (set by a proxy) wins over the body's `user`
    local_hosts_only: bool = False  # bound to loopback: only a loopback Host header is served
    cors_origins: tuple[str, ...] = ()


@dataclass
class ServeSettings:
    decoding: Decoding  # the persona's defaults, the same flags as chat.py
    max_context: int | None  # tokens for prompt plus reply (None: the base's own, capped; see load_server)
    memory_turns: int
    retrieve_k: int
    client_system: str  # "ignore" or "append"
    api_key: str | None
    max_batch: int
    mix_personas: bool = True  # --batching mixed
    conversations_root: Path | None = None  # set = --user-memory on
    limits: Limits = field(default_factory=Limits)
    tools: str = "ignore"  # --tools: "ignore" answers requests with tools as plain text, "reject" refuses them


class ApiError(Exception):
    """An error the client receives in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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
    ignored: list[str] = field(default_factory=list)  # tool-calling parameters sent and answered without (--tools ignore)


def _number(body: dict[str, Any], name: str, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, not {json.dumps(value)}", name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' is {value}, outside the allowed range {low:g} to {high:g}", name)
    return value if integer else float(value)  # JSON from JavaScript sends 1.0 as 1; the samplers want floats


def _text(content: Any, where: str, language: str) -> str:
    """Message content as text: a string, or a list of parts (images, audio and files become their placeholder)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind in MEDIA_PARTS:
                mark = PLACEHOLDERS[language][MEDIA_PARTS[kind]]
                if not "".join(parts).endswith(mark):  # AstrBot sends "[图片]" as text before a lone image
                    parts.append(mark)
            else:
                raise ApiError(400, f"{where} has a content part of type {json.dumps(kind)}; send text, image_url, "
                               "input_audio or file parts", where)
        return "".join(parts)
    raise ApiError(400, f"{where} content must be a string or a list of content parts", where)


def _conversation(messages: Any, language: str | None) -> tuple[str | None, list[Exchange], str]:
    """OpenAI messages -> (client system text, earlier exchanges, the last user message).

    Consecutive messages of one role join with a newline (group bots send several); assistant
    messages before the first user message have no question to pair with and are left out. Tool
    calls and tool results (another model's, since no persona calls tools) are left out too: an
    assistant turn keeps only its text. `language`: the placeholders' (None: the messages' own).
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    if language is None:
        contents = [m.get("content") for m in messages if isinstance(m, dict)]
        language = language_of([c for c in contents if isinstance(c, str)] + [
            p["text"] for c in contents if isinstance(c, list) for p in c if isinstance(p, dict) and isinstance(p.get("text"), str)])
    system: list[str] = []
    turns: list[list[Any]] = []  # [role, [texts]]
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role in ("tool", "function"):
            continue
        if role not in ROLES:
            raise ApiError(400, f"{where} has role {json.dumps(role)}; use system, user or assistant", f"{where}.role")
        text = _text(m.get("content"), where, language) if m.get("content") is not None else ""
        if role == "assistant" and not text.strip() and (m.get("tool_calls") or m.get("function_call")):
            continue
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


def parse_request(body: Any, models: list[str], settings: ServeSettings, languages: dict[str, str] | None = None) -> ChatRequest:
    """Check a /v1/chat/completions body; every problem is an ApiError that says what to change.
    `languages`: each persona's language ("zh" or "en"), which its media placeholders are written in."""
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
    ignored = []
    for name, kind in TOOLS.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) is not (kind is bool) or not isinstance(value, kind):
            raise ApiError(400, f"'{name}' must be {'true or false' if kind is bool else 'a list' if kind is list else 'a string or an object'}", name)
        if value not in (False, [], "none"):
            if settings.tools == "reject":
                raise ApiError(400, f"'{name}' is not supported by this server (tool calling: the personas have no tools); "
                               "leave it out", name, "unsupported_parameter")
            ignored.append(name)
    known = {"model", "messages", "stream", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens",
             "seed", "stop", "n", "presence_penalty", "frequency_penalty"} | HARMLESS | set(UNSUPPORTED) | set(TOOLS)
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
    if temperature is not None and temperature < MIN_TEMPERATURE:
        temperature = 0.0
    presence = _number(body, "presence_penalty", -2, 2)
    frequency = _number(body, "frequency_penalty", -2, 2)
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
    system, history, message = _conversation(body.get("messages"), (languages or {}).get(model))
    return ChatRequest(
        model=model, system=system, history=history, message=message, stream=stream,
        include_usage=bool(options.get("include_usage")),
        sampling=Sampling(do_sample=(temperature if temperature is not None else d.temperature if d.do_sample else 0) > 0,
                          temperature=temperature if temperature else d.temperature, top_p=top_p or d.top_p,
                          top_k=d.top_k if top_k is None else top_k,
                          presence_penalty=presence or 0.0, frequency_penalty=frequency or 0.0),
        max_tokens=max_tokens or d.max_new_tokens,
        seed=None if seed is None else seed % 2 ** 63, stop=stops, user=user or None, ignored=ignored,
    )
