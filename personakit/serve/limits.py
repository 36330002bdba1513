"""What one request may ask of the server, checked before any work is done for it: the body as
JSON (any malformed, hostile or oversized input is an OpenAI-shaped 4xx, never a 500), and the
sizes a body may have (--max-messages, --max-message-chars; stop strings)."""
from __future__ import annotations

import json
from typing import Any

from .protocol import ApiError, Limits

MAX_DEPTH = 32  # a chat request nests 5 levels; anything deeper is not one


def read_json(raw: bytes) -> Any:
    """The request body as JSON; every way it can be wrong is a 400 that says which."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc}); send a JSON object") from None
    except RecursionError:
        raise ApiError(400, f"the request body nests too deeply to be a chat request (at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise ApiError(400, f"the request body has a number too large to read ({exc})") from None
    todo = [(body, 1, "body")]
    while todo:
        value, depth, where = todo.pop()
        if depth > MAX_DEPTH:
            raise ApiError(400, f"the request body nests more than {MAX_DEPTH} levels deep; a chat request needs a few")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{where} has a lone UTF-16 surrogate (such as \\ud800), which is not text; "
                               "send the characters as valid UTF-8", where) from None
        elif isinstance(value, dict):
            todo += [(k, depth + 1, where) for k in value]
            todo += [(v, depth + 1, k if where == "body" else f"{where}.{k}") for k, v in value.items()]
        elif isinstance(value, list):
            todo += [(v, depth + 1, f"{where}[{i}]") for i, v in enumerate(value)]
    return body


def _chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text") or "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def check_sizes(body: Any, limits: Limits) -> None:
    """The sizes of a parsed body within `limits` (its meaning is parse_request's to check)."""
    if not isinstance(body, dict):
        return
    messages = body.get("messages")
    if isinstance(messages, list):
        if len(messages) > limits.max_messages:
            raise ApiError(400, f"'messages' has {len(messages)} messages, over this server's limit of {limits.max_messages} "
                           "(--max-messages); send the recent part of the conversation", "messages", "too_many_messages")
        for i, m in enumerate(messages):
            size = _chars(m.get("content")) if isinstance(m, dict) else 0
            if size > limits.max_message_chars:
                raise ApiError(400, f"messages[{i}] has {size} characters, over this server's limit of {limits.max_message_chars} "
                               "(--max-message-chars); shorten it", f"messages[{i}]", "message_too_long")
    stop = body.get("stop")
    for s in [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []:
        if isinstance(s, str) and len(s) > limits.max_stop_chars:
            raise ApiError(400, f"a stop string has {len(s)} characters, over the limit of {limits.max_stop_chars}; "
                           "use a shorter one", "stop")
