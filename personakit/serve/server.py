"""The served personas on one loaded base: the model names, each request's prompt (the persona's
system prompt, memory, the token budget) and job, the scheduler and per-user memory behind the app."""
from __future__ import annotations

import copy
import dataclasses
import random
import sys
import threading
import time
from typing import Any, Callable

from ..engine import PREFIXES
from ..loading import BaseOptions
from ..memory import PromptTooLong, fit_prompt, memory_window, reply_budget
from ..persona import AdapterInfo
from ..template import build_messages, prompt_ids
from .protocol import ApiError, ChatRequest, ServeSettings
from .scheduler import Job, Scheduler
from .user_memory import UserConversation, UserMemory, user_window

BASE = "base"  # the model name that serves the base with every adapter off
MIN_SHARED = 8  # a shorter common prompt start is not worth a cached prefix


def system_prompt(persona: AdapterInfo | None, client: str | None, mode: str) -> str | None:
    """The persona's training system prompt always; the client's is dropped or appended (`mode`).
    The base has no training prompt, so it takes the client's as given."""
    if persona is None:
        return client
    if client and mode == "append":
        return f"{persona.system}\n\n{client}"
    return persona.system


class Server:
    """The loaded model, the personas on it, the settings and the scheduler behind the app."""

    def __init__(self, model: Any, tokenizer: Any, personas: list[AdapterInfo], settings: ServeSettings,
                 log: Callable[[str], None] | None = None, scheduler: Any = None):
        """`scheduler`: an external engine's (serve/external.py) instead of our own engine on `model`."""
        self.tokenizer, self.settings = tokenizer, settings
        self.personas = {p.name: p for p in personas}
        self.models = [*self.personas, BASE]
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.lock = threading.Lock()  # the decoder's tokenizer, taken for every token
        # Prompts are built on a copy of the tokenizer with its own lock, so that a long history
        # being tokenized never holds up the streams being decoded.
        self.prompt_tokenizer, self.prompt_lock = copy.deepcopy(tokenizer), threading.Lock()
        self.scheduler = scheduler or Scheduler(model, tokenizer, settings.decoding, settings.max_batch, self.lock, settings.mix_personas)
        self.seeds = random.Random(settings.decoding.seed)  # unseeded requests: reproducible per server run, new per request
        self.created = int(time.time())
        self.starts: dict[str | None, list[int]] = {}  # system prompt -> the prompt start every request with it has
        root = settings.conversations_root
        self.user_memory = UserMemory(root, self.log, settings.limits.max_open_users) if root is not None else None

    def prompt_start(self, system: str | None) -> list[int]:
        """The tokens every prompt with this system prompt starts with under the chat template:
        what two renderings with unlike messages have in common (checked against each prompt)."""
        if system not in self.starts:
            if len(self.starts) >= PREFIXES * 4:  # clients that append their own system prompts: keep it bounded
                self.starts.clear()
            a, b = (prompt_ids(self.prompt_tokenizer, build_messages({"instruction": text, "history": []}, system)) for text in ("Hello", "?"))
            self.starts[system] = a[:next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))]
        return self.starts[system]

    def conversation(self, req: ChatRequest) -> UserConversation | None:
        """The saved conversation of the request's user with its persona (--user-memory and a `user` only)."""
        if self.user_memory is None or not req.user:
            return None
        return self.user_memory.get(req.model, req.user)

    def prepare(self, req: ChatRequest, emit: Callable[[tuple], None], conversation: UserConversation | None = None) -> Job:
        """The request's job: its prompt with the memory that fits `--max-context` minus its reply
        (`conversation`: the user's saved exchanges under --user-memory, see `user_window`)."""
        persona = self.personas.get(req.model)
        saved = conversation.snapshot() if conversation else None
        system = system_prompt(persona, req.system, self.settings.client_system)
        settings = self.settings
        if saved is None:
            window = memory_window(req.history, req.message, settings.memory_turns, settings.retrieve_k)
        else:
            window = user_window(saved, req.history, req.message, settings.memory_turns, settings.retrieve_k)
        budget = settings.max_context - req.max_tokens
        with self.prompt_lock:
            try:
                ids = fit_prompt(self.prompt_tokenizer, req.message, window, system, budget).ids
            except PromptTooLong as exc:
                raise ApiError(
                    400, f"the last message makes a {exc.size}-token prompt, over the {budget} tokens left by a reply of "
                    f"{req.max_tokens} in this server's context of {settings.max_context}; shorten it or lower max_tokens",
                    "messages", "context_length_exceeded",
                ) from None
            start = self.prompt_start(system)
        return Job(
            shared=len(start) if len(start) >= MIN_SHARED and len(start) < len(ids) and ids[:len(start)] == start else 0,
            adapter=persona.name if persona else None, prompt=ids, max_tokens=req.max_tokens, stop=req.stop, emit=emit,
            sampling=dataclasses.replace(req.sampling, seed=req.seed if req.seed is not None else self.seeds.randrange(2 ** 63)),
        )


def load_server(adapters: list[AdapterInfo], base: BaseOptions, settings: ServeSettings, log: Callable[[str], None] | None = None) -> Server:
    """Load the base once with every adapter attached; `settings.max_context` None: the base's own, capped."""
    from ..evaluation import base_for
    from ..loading import load_for_chat

    loaded, model = load_for_chat(base, adapters, base_for(adapters, base.base))
    max_context, _ = reply_budget(loaded.model, settings.max_context, settings.decoding.max_new_tokens)
    settings = dataclasses.replace(settings, max_context=max_context)
    server = Server(model, loaded.tokenizer, adapters, settings, log)
    mixed = server.scheduler.engine.adapters.mixed is not None
    root = settings.conversations_root
    server.log(
        f"serve: {', '.join(server.models)} on {loaded.ref.base_id} ({loaded.device}{', 4-bit' if loaded.quantized else ''}); "
        f"{max_context} context tokens, memory {'retrieval' if settings.retrieve_k else 'recent'} {settings.memory_turns} exchanges, "
        f"batches of up to {settings.max_batch} ({'personas mixed' if mixed else 'one persona each'}), "
        f"client system messages: {settings.client_system}, user memory: {f'on, saved under {root}' if root else 'off'}; "
        + " ".join(f"{k}={v}" for k, v in settings.decoding.as_dict().items())
    )
    return server
