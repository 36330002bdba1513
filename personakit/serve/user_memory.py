"""--user-memory: each (persona, request `user`) pair has its own saved conversation (chat.py's
session files), which gives the request's prompt its memory and receives every completed exchange."""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from ..conversations import ConversationStore
from ..conversations import Exchange as SavedExchange
from ..errors import UserError
from ..memory import Exchange, retrieve
from .protocol import ApiError

KEY_FILE = ".user-key"  # in the conversations folder: the server secret that names the users' files


def user_window(saved: list[Exchange], sent: list[Exchange], message: str, turns: int, retrieve_k: int) -> list[Exchange]:
    """A user's memory: the recent window is the history the client sent, or the last `turns`
    saved exchanges when it sent none; retrieval looks over every saved exchange not in that window."""
    recent = list((sent or saved)[-turns:]) if turns > 0 else []
    earlier = retrieve([e for e in saved if e not in recent], message, retrieve_k) if retrieve_k > 0 else []
    return earlier + recent


def user_key(root: Path) -> bytes:
    """The server secret of a conversations folder: made once (owner-only, written atomically), then read."""
    path = root / KEY_FILE
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            spare = root / f"{KEY_FILE}.{os.getpid()}.tmp"
            fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, secrets.token_hex(32).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(spare, path)  # fails if another server made it first: that one is kept
            except FileExistsError:
                pass
            finally:
                spare.unlink()
        key = path.read_bytes().strip()
    except OSError as exc:
        raise UserError(f"cannot make or read the user-memory key {path} ({exc.strerror}); check the folder's permissions "
                        "or pass another --conversations-root") from None
    if len(key) < 32:
        raise UserError(f"the user-memory key {path} is damaged (under 32 characters); restore it from a backup "
                        "(without it the saved users cannot be found)")
    return key


def user_session(user: str, key: bytes) -> str:
    """The session name of a request's `user`: keyed with the server secret, so that the file name
    tells nothing about who it is, even for ids that can be enumerated (phone numbers, QQ ids)."""
    return "u-" + hmac.new(key, user.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]


def legacy_session(user: str) -> str:
    """The unkeyed name earlier versions gave a user's file; such a file is renamed on the user's next request."""
    return "u-" + hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class UserConversation:
    """One user's saved conversation with one persona; a lock keeps its appends in order."""

    def __init__(self, store: ConversationStore, exchanges: list[Exchange]):
        self.store, self.exchanges, self.lock = store, exchanges, threading.Lock()
        self.users = 0  # requests holding it now (UserMemory.lock)

    def snapshot(self) -> list[Exchange]:
        with self.lock:
            return list(self.exchanges)

    def append(self, message: str, reply: str, speaker: str) -> None:
        with self.lock:
            self.store.append(SavedExchange(message, reply, speaker))  # fsynced before memory uses it
            self.exchanges.append((message, reply))


class UserMemory:
    """--user-memory: conversations/<persona>/u-<keyed hash of user>.jsonl. A request holds its
    user's conversation from `get` to `release`; the file is opened (and flock-ed) on first use and
    stays open while used recently: beyond `max_open`, the least recently used idle one is closed
    (reopened when its user comes back). A conversation that saved nothing is closed when its last
    request ends, so a rejected or failed request leaves no file."""

    def __init__(self, root: Path, log: Callable[[str], None], max_open: int = 256):
        self.root, self.log, self.max_open = root, log, max_open
        self.key = user_key(root)
        self.conversations: OrderedDict[tuple[str, str], UserConversation] = OrderedDict()
        self.lock = threading.Lock()

    def session(self, user: str) -> str:
        return user_session(user, self.key)

    def get(self, persona: str, user: str) -> UserConversation:
        session = self.session(user)
        with self.lock:
            found = self.conversations.get((persona, session))
            if found is None:
                store = ConversationStore(self.root, persona, session)
                old = self.root / persona / f"{legacy_session(user)}.jsonl"
                try:
                    if old.exists() and not store.path.exists():
                        os.replace(old, store.path)
                        self.log(f"serve: user memory: renamed {old.name} to {store.path.name} (files are now named with the key in {KEY_FILE})")
                    saved = store.open()
                except (UserError, OSError) as exc:
                    self.log(f"serve: user memory: {exc}")
                    raise ApiError(503, "this user's saved conversation cannot be opened; see the server log", "user",
                                   kind="server_error") from None
                if saved.skipped:
                    self.log(f"serve: user memory: skipped {len(saved.skipped)} unreadable line(s) of {store.path}; they stay in the file untouched")
                found = self.conversations[(persona, session)] = UserConversation(store, [(e.user, e.reply) for e in saved.exchanges])
            self.conversations.move_to_end((persona, session))
            found.users += 1
            self._close_idle()
            return found

    def release(self, conversation: UserConversation) -> None:
        """A request is done with its conversation."""
        with self.lock:
            conversation.users -= 1
            if conversation.users == 0 and not conversation.exchanges:
                self._close(conversation)
            self._close_idle()

    def _close(self, conversation: UserConversation) -> None:
        with conversation.lock:
            conversation.store.close()  # a file with nothing saved is removed
        self.conversations.pop((conversation.store.persona, conversation.store.session), None)

    def _close_idle(self) -> None:
        idle = [c for c in self.conversations.values() if c.users == 0]  # least recently used first
        for conversation in idle[:max(0, len(self.conversations) - self.max_open)]:
            self._close(conversation)

    def open_files(self) -> int:
        return len(self.conversations)

    def close(self) -> None:
        with self.lock:
            for conversation in list(self.conversations.values()):
                self._close(conversation)
