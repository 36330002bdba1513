"""The server's scheduler: one thread owns the decoding engine; requests queue, join a running batch
(a lane) at the next step while it has room, stream their text back and leave when done or cancelled."""
from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine import PER_BATCH, PER_ROW, Batch, Engine, TextRow, joinable
from ..generation import Decoding
from .protocol import ApiError


@dataclass(eq=False)
class Job(TextRow):
    """One request inside the scheduler: an engine row whose text goes back to the request's event
    loop through `emit`: ("delta", text), ("end", finish, text) or ("error", ApiError)."""

    emit: Callable[[tuple], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    first_token_at: float | None = None
    engine_tokens: int | None = None  # reply tokens counted by an external engine (serve/external.py), which streams text

    def reply_tokens(self) -> int:
        return len(self.tokens) if self.engine_tokens is None else self.engine_tokens

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


class RowSafeEngine(Engine):
    """The engine with a failure that belongs to one row (its sampling, its text going out) ending
    that row alone, with an error; the other rows of its batch decode on."""

    def __init__(self, *args: Any, failed: Callable[[list[Any]], None], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.failed = failed

    def _pick(self, row: Any, scores: Any) -> int:
        try:
            return super()._pick(row, scores)
        except Exception:
            self.failed([row])
            return 0

    def _advance(self, row: Any, token: int) -> bool:
        if row.finish == "error":
            return True
        try:
            return super()._advance(row, token)
        except Exception:
            self.failed([row])
            return True


class Scheduler:
    """The thread that owns the engine and decodes every running request, batched continuously.

    A request joins its lane (the one mixed batch, or its persona's) at the next step, up to
    `max_batch` rows: the engine prefills its prompt and stacks its cache rows onto the lane's. It
    leaves as soon as its reply ends. Lanes take one decoding step each in turn. A failure fails
    the rows it belongs to (a row's own, a prefill's group, a lane's step); should the thread
    itself die, `failure` says why and every request, queued or new, gets a 503 at once.
    """

    def __init__(self, model: Any, tokenizer: Any, decoding: Decoding, max_batch: int, tokenizer_lock: threading.Lock,
                 mix_personas: bool = True):
        self.engine = RowSafeEngine(model, tokenizer, repetition_penalty=decoding.repetition_penalty,
                                    no_repeat_ngram_size=decoding.no_repeat_ngram_size,
                                    routing=PER_ROW if mix_personas else PER_BATCH, tokenizer_lock=tokenizer_lock, failed=self._fail)
        self.max_batch = max_batch
        self.pending: queue.Queue[Job | None] = queue.Queue()
        self.waiting: list[Job] = []  # taken off `pending`, not yet in a lane
        self.lanes: dict[str | None, Batch] = {}
        self.failure: str | None = None  # why the thread died
        self.thread = threading.Thread(target=self._loop, name="personakit-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join(timeout=30)

    def alive(self) -> bool:
        return self.thread.is_alive() and self.failure is None

    def backlog(self) -> int:
        """Requests submitted and not yet decoding (read from other threads: a close estimate is enough)."""
        return self.pending.qsize() + len(self.waiting)

    def submit(self, job: Job) -> None:
        self.pending.put(job)
        if self.failure is not None:
            self._drain()

    def _dead(self) -> ApiError:
        return ApiError(503, f"the server's decoding thread has stopped ({self.failure}); restart the server", kind="server_error")

    def _drain(self) -> None:
        while True:
            try:
                job = self.pending.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.finish is None:
                job.finish = "error"
                job.emit(("error", self._dead()))

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
        try:
            while self._collect():
                self._admit()
                self._step()
        except BaseException as exc:  # whatever it was, no request may wait on a dead thread
            traceback.print_exc(file=sys.stderr)
            self.failure = f"{type(exc).__name__}: {exc}"[:200]
            for job in [j for lane in self.lanes.values() for j in lane.rows] + self.waiting:
                if job.finish is None:
                    job.finish = "error"
                    job.emit(("error", self._dead()))
            self.lanes, self.waiting = {}, []
            self._drain()

    def _step(self) -> None:
        for key in list(self.lanes):
            try:
                lane = self.engine.step(self.lanes[key])
            except Exception:  # a failed forward pass belongs to every row of its lane: fail them, keep serving
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
            running = list(lane.rows) if lane else []
            try:
                lane = self.engine.add(lane, jobs, failed=self._fail)
            except Exception:  # joining broke the lane's cache half-way: its rows and the newcomers fail together
                self._fail(running + jobs)
                lane = None
            if lane is None:
                self.lanes.pop(key, None)
            else:
                self.lanes[key] = lane
