"""Saved conversations: one append-only JSONL file per persona and session, locked while in use.

    conversations/<persona>/<session>.jsonl

Each line is one record: an exchange `{"user", "reply", "speaker", "at"}`, or the running note of
summary memory `{"note", "covers", "at"}` (the latest one wins; `covers` = exchanges it condenses).
Every record is appended, flushed and fsynced as it happens, so a killed process loses at most the
reply in progress. A half-written or corrupt line is skipped on load and reported, never rewritten.
The file is locked (flock) for the life of the store, so two processes never interleave writes;
serve.py --user-memory holds one store per (persona, user): session `u-<hash of user>`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

_NAME = re.compile(r"^[\w][\w.-]{0,99}$")


@dataclass
class Exchange:
    user: str
    reply: str
    speaker: str


@dataclass
class Saved:
    """What a session file holds: its exchanges, the latest note, and the lines that could not be read."""

    exchanges: list[Exchange] = field(default_factory=list)
    note: str = ""
    covers: int = 0
    skipped: list[int] = field(default_factory=list)  # 1-based line numbers


@dataclass
class SessionInfo:
    name: str
    exchanges: int
    modified: float


def check_name(name: str, what: str) -> str:
    """A session or persona name becomes a file name: letters, digits, `_`, `-`, `.` only."""
    if not _NAME.match(name) or name in (".", ".."):
        raise UserError(f"{what} name {name!r} cannot be a file name; use letters, digits, '_', '-' or '.' (e.g. --session work)")
    return name


def _parse(line: str) -> Exchange | tuple[str, int] | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("user"), str) and isinstance(obj.get("reply"), str):
        return Exchange(obj["user"], obj["reply"], str(obj.get("speaker", "")))
    if isinstance(obj.get("note"), str) and isinstance(obj.get("covers"), int):
        return obj["note"], obj["covers"]
    return None


def read_session(path: Path) -> Saved:
    """Everything readable in a session file; unreadable lines are listed in `skipped`."""
    saved = Saved()
    if not path.exists():
        return saved
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = _parse(raw.decode("utf-8"))
            except UnicodeDecodeError:
                record = None
            if record is None:
                saved.skipped.append(number)
            elif isinstance(record, Exchange):
                saved.exchanges.append(record)
            else:
                saved.note, saved.covers = record
    # A note can only cover exchanges that were saved (lines may have been lost since).
    saved.covers = min(saved.covers, len(saved.exchanges))
    return saved


def list_sessions(root: str | Path, persona: str) -> list[SessionInfo]:
    """The saved sessions of `persona` under `root`, most recently used first."""
    folder = Path(root) / persona
    found = [
        SessionInfo(p.stem, len(read_session(p).exchanges), p.stat().st_mtime)
        for p in folder.glob("*.jsonl") if p.is_file()
    ]
    return sorted(found, key=lambda s: (-s.modified, s.name))


class ConversationStore:
    """One session file, opened and locked until `close()`; use as a context manager."""

    def __init__(self, root: str | Path, persona: str, session: str):
        self.persona = check_name(persona, "persona")
        self.session = check_name(session, "session")
        self.path = Path(root) / persona / f"{session}.jsonl"
        self._fd: int | None = None

    def __enter__(self) -> ConversationStore:
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> Saved:
        """Take the lock and read what the session holds; refuse if another process has it open."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise UserError(f"cannot open the session file {self.path} ({exc.strerror}); pass another --conversations-root or --no-save") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"session {self.session!r} of {self.persona} is open in another chat ({self.path} is locked); "
                f"close that one, or pick another --session or --no-save"
            ) from None
        self._fd = fd
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # A killed writer left half a line: end it, so that it stays one skipped line and the
            # next record starts on a line of its own.
            self._write(b"\n")
        return read_session(self.path)

    def close(self) -> None:
        if self._fd is None:
            return
        if os.fstat(self._fd).st_size == 0:
            self.path.unlink(missing_ok=True)  # a session where nothing was said leaves no file
        os.close(self._fd)  # releases the lock
        self._fd = None

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            raise RuntimeError("the conversation store is not open")
        size = os.fstat(self._fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError:
            # A torn record (disk full half-way) is cut off again, so the next one starts on a clean line.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise

    def _append(self, record: dict[str, Any]) -> None:
        self._write((json.dumps({**record, "at": round(time.time(), 3)}, ensure_ascii=False) + "\n").encode("utf-8"))

    def append(self, exchange: Exchange) -> None:
        self._append({"user": exchange.user, "reply": exchange.reply, "speaker": exchange.speaker})

    def append_note(self, note: str, covers: int) -> None:
        self._append({"note": note, "covers": covers})

    def forget(self) -> None:
        """Delete every saved record of this session (the lock stays held)."""
        if self._fd is None:
            raise RuntimeError("the conversation store is not open")
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
