"""--user-memory: each (persona, request `user`) pair has its own saved conversation (chat.py's
session files), which gives the request's prompt its memory and receives every completed exchange."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Callable

from ..conversations import ConversationStore
from ..conversations import Exchange as SavedExchange
from ..errors import UserError
from ..memory import Exchange, retrieve
from .protocol import ApiError


def user_window(saved: list[Exchange], sent: list[Exchange], message: str, turns: int, retrieve_k: int) -> list[Exchange]:
    """A user's memory: the recent window is the history the client sent, or the last `turns`
    saved exchanges when it sent none; retrieval looks over every saved exchange not in that window."""
    recent = list((sent or saved)[-turns:]) if turns > 0 else []
    earlier = retrieve([e for e in saved if e not in recent], message, retrieve_k) if retrieve_k > 0 else []
    return earlier + recent


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
