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
