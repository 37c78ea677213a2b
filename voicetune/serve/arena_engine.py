"""One generation worker for the arena's web server: every request waits its turn.

MLX is not to be driven from several threads at once, and one copy of the base weights
serves both ``base`` and ``lora`` (the adapters switched off and on, ``ChatModels``): so
answers are generated one at a time by a single worker thread, in the order asked. A request
made while others are waiting learns its place in the queue, which the page shows.

The web side is asyncio: ``Engine.answer`` is an async iterator of events, fed from the
worker thread through the event loop. A request whose page went away is cancelled: the
worker stops its answer at the next token.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

# answer_fn(model name, messages, settings, write) -> generate_batched's record; ``write``
# receives the answer's text piece by piece and may raise to stop it
AnswerFn = Callable[[str, list, object, Callable[[str], None]], dict]


class Cancelled(Exception):
    """Raised inside the worker when the page that asked for an answer went away."""


@dataclass
class _Job:
    number: int
    name: str
    messages: list
    settings: object
    emit: Callable[[tuple], None]
    cancel: threading.Event = field(default_factory=threading.Event)


def mlx_answer_fn(models) -> AnswerFn:
    """The real thing: ``models`` is a ChatModels; the chat's own streaming answer."""
    from voicetune.serve.chat import stream_answer

    def answer(name, messages, settings, write):
        model, tokenizer = models.get(name)
        return stream_answer(model, tokenizer, messages, settings, write)
    return answer


class Engine:
    def __init__(self, answer_fn: AnswerFn):
        self.answer_fn = answer_fn
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._waiting: list[int] = []  # job numbers in queue order, not yet started
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._thread = threading.Thread(target=self._work, name="arena-generation", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._waiting.remove(job.number)
            if job.cancel.is_set():
                continue
            job.emit(("start", None))

            def write(text: str, job=job) -> None:
                if job.cancel.is_set():
                    raise Cancelled
                job.emit(("text", text))
            try:
                record = self.answer_fn(job.name, job.messages, job.settings, write)
            except Cancelled:
                continue
            except Exception as err:  # one bad request must not stop the server
                job.emit(("error", f"{type(err).__name__}: {err}"))
                continue
            job.emit(("done", record))

    def ahead_of(self, number: int) -> int:
        """How many answers will be generated before job ``number`` starts (one may be running)."""
        with self._lock:
            return self._waiting.index(number) if number in self._waiting else 0

    async def answer(self, name: str, messages: list, settings,
                     poll: float = 0.5) -> AsyncIterator[tuple]:
        """Events for one answer: ("queued", n ahead) while it waits (every ``poll`` s),
        ("start", None), ("text", piece)..., then ("done", record) or ("error", message).
        Leaving the iteration early (the page went away) cancels the answer."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = _Job(next(self._numbers), name, messages, settings,
                   lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        with self._lock:
            self._waiting.append(job.number)
        self._jobs.put(job)
        try:
            started = False
            yield ("queued", self.ahead_of(job.number))
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=poll)
                except asyncio.TimeoutError:
                    if not started:
                        yield ("queued", self.ahead_of(job.number))
                    continue
                started = started or event[0] == "start"
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            job.cancel.set()  # a no-op when it finished; otherwise the worker drops it

    def close(self) -> None:
        self._jobs.put(None)
