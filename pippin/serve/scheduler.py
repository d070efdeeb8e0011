"""The serving loop: one background thread owns the models and runs continuous batching; requests wait on asyncio queues.

`Worker` is the only thread that touches a model, its KV cache or its adapter slots (`pippin serve` loads the models on
it too: one thread making OpenMP calls keeps libgomp's barriers spinning; see Service.from_config). It steps every
base model's `BatchScheduler` (pippin.engine.scheduler) while any has work, and sleeps on a condition
variable otherwise; control calls (adapter load/unload) run on it between steps. An unexpected error in
a step fails the requests of that step and the loop goes on.

`Generation` is one HTTP request seen from the event loop: a sink per prompt turns token ids into text
(pippin.engine.stream.TextStream, stop strings included) on the worker thread and posts events to an asyncio queue
with `call_soon_threadsafe`. Cancelling it (client gone) frees its rows at the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pippin.engine.sampling import SamplingParams
from pippin.engine.scheduler import BatchScheduler, Ticket
from pippin.engine.stream import TextStream
from pippin.model.tokenizer import Tokenizer
from pippin.serve.metrics import Metrics
from pippin.serve.protocol import ApiError

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TextDelta:
    index: int
    text: str
    tokens: int
    """The choice's completion tokens so far, this text's included."""


@dataclass(kw_only=True)
class ChoiceDone:
    index: int
    finish_reason: str
    """'stop', 'length' or 'cancelled'."""


@dataclass(kw_only=True)
class Failed:
    error: Exception


Event = TextDelta | ChoiceDone | Failed


class Generation:
    """One request's samples (n per prompt, choice index = prompt * n + sample), streamed to the event loop."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        tokenizer: Tokenizer,
        stop: tuple[str, ...],
        n: int,
        prompt_tokens: list[int],
        metrics: Metrics,
        interval_s: float = 0.0,
    ) -> None:
        self.loop = loop
        self.interval_s = interval_s
        self.n = n
        self.n_choices = n * len(prompt_tokens)
        self.prompt_tokens = sum(prompt_tokens)
        self.streams = [TextStream(tokenizer, stop) for _ in range(self.n_choices)]
        self.completion_tokens = [0] * self.n_choices
        self.held = [""] * self.n_choices  # text not sent yet (stream_interval_ms)
        self.sent_at = [-math.inf] * self.n_choices
        self.finish_reasons: list[str | None] = [None] * self.n_choices
        self.metrics = metrics
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.cancel_hook: Callable[[], None] | None = None
        self._finished = False

    # --- worker thread ----------------------------------------------------------------------------------

    def sink(self, prompt_index: int) -> _PromptSink:
        return _PromptSink(self, prompt_index)

    def _post(self, ev: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

    # --- event loop ---------------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Text deltas and endings until every choice is done; a Failed event ends it early."""
        done = 0
        try:
            while done < self.n_choices:
                ev = await self.queue.get()
                yield ev
                if isinstance(ev, Failed):
                    return
                if isinstance(ev, ChoiceDone):
                    done += 1
        finally:
            self.close()

    def close(self) -> None:
        """Cancel what is still running (a no-op once every choice is done) and record the metrics once."""
        if self._finished:
            return
        self._finished = True
        if self.cancel_hook is not None:
            self.cancel_hook()
        total = time.perf_counter() - self.t_submit
        ttft = self.t_first - self.t_submit if self.t_first is not None else None
        self.metrics.generation_done(
            prompt_tokens=self.prompt_tokens, ttft_s=ttft, total_s=total, completion_tokens=sum(self.completion_tokens)
        )

    @property
    def usage(self) -> dict[str, int]:
        c = sum(self.completion_tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": c, "total_tokens": self.prompt_tokens + c}


class _PromptSink:
    """The scheduler's Sink for one prompt of a Generation (runs on the worker thread)."""

    def __init__(self, gen: Generation, prompt_index: int) -> None:
        self.gen = gen
        self.base = prompt_index * gen.n

    def token(self, index: int, token: int) -> bool:
        g, i = self.gen, self.base + index
        if g.t_first is None:
            g.t_first = time.perf_counter()
        g.completion_tokens[i] += 1
        g.metrics.tokens(1)
        stream = g.streams[i]
        if text := stream.push(token):
            g.held[i] += text
            now = time.perf_counter()
            if now - g.sent_at[i] >= g.interval_s:
                g._post(TextDelta(index=i, text=g.held[i], tokens=g.completion_tokens[i]))
                g.held[i], g.sent_at[i] = "", now
        return not stream.stopped

    def finish(self, index: int, reason: str) -> None:
        g, i = self.gen, self.base + index
        rest = g.held[i] + (g.streams[i].flush() if reason != "cancelled" else "")
        if rest:
            g._post(TextDelta(index=i, text=rest, tokens=g.completion_tokens[i]))
        g.finish_reasons[i] = reason
        g._post(ChoiceDone(index=i, finish_reason=reason))

    def fail(self, error: Exception) -> None:
        self.gen._post(Failed(error=error))


class Worker:
    """The thread that runs every scheduler's steps, and control calls between them."""

    def __init__(self, schedulers: Sequence[BatchScheduler], *, request_timeout_s: float | None = None) -> None:
        self.schedulers = list(schedulers)
        self.request_timeout_s = request_timeout_s
        """Each submitted request's deadline from now (None: none)."""
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def serve(self, schedulers: Sequence[BatchScheduler]) -> None:
        """The schedulers to step from now on (a worker may start first, to load the models on its own thread)."""
        with self._cv:
            self.schedulers = list(schedulers)
            self._cv.notify_all()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pippin-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def submit(
        self, scheduler: BatchScheduler, prompts: list[list[int]], params: SamplingParams, *, adapter: str | None, n: int, gen: Generation
    ) -> list[Ticket]:
        """Queue every prompt of a Generation (all or none; SchedulerFull past the limits)."""
        if not self.alive:
            raise ApiError("The server is shutting down; retry in a moment.", status=503)
        timeout = self.request_timeout_s
        deadline = time.monotonic() + timeout if timeout is not None else None
        tickets = scheduler.submit_many([(p, params, adapter, n, gen.sink(i)) for i, p in enumerate(prompts)], deadline=deadline)
        if self._stop:  # the loop stopped while this was queued: answer now rather than never
            scheduler.fail_all(ApiError("The server is shutting down; retry in a moment.", status=503))

        def cancel() -> None:
            for t in tickets:
                scheduler.cancel(t)
            self.wake()

        gen.cancel_hook = cancel
        self.wake()
        return tickets

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the worker thread between steps (it may touch the models); returns its Future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stop:  # nobody would ever run it
                fut.set_exception(ApiError("The server is shutting down; retry in a moment.", status=503))
                return fut
            self._calls.append((fn, fut))
            self._cv.notify_all()
        return fut

    def _run_calls(self) -> None:
        while self._calls:
            fn, fut = self._calls.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:  # handed to the caller, who turns it into an HTTP error
                    fut.set_exception(e)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # a bug outside a step: nobody may be left waiting on a dead thread
            log.exception("The worker loop died; failing every request and refusing new ones.")
            with self._cv:
                self._stop = True
        finally:
            self._shut_down()

    def _loop(self) -> None:
        while not self._stop:
            self._run_calls()
            busy = False
            for s in self.schedulers:
                if not s.has_work:
                    continue
                busy = True
                try:
                    s.step()
                except Exception as e:  # a bug or an out-of-memory in one step must not stop the server
                    log.exception("A scheduler step failed; failing the requests it was running.")
                    s.fail_running(ApiError(f"Generation failed inside the server ({type(e).__name__}: {e}).", status=500))
            if not busy:
                with self._cv:
                    if not self._calls and not self._stop and not any(s.has_work for s in self.schedulers):
                        self._cv.wait(timeout=1.0)

    def _shut_down(self) -> None:
        """Whoever still waits gets an answer instead of hanging."""
        for s in self.schedulers:
            s.fail_all(ApiError("The server is shutting down.", status=503))
        with self._cv:
            while self._calls:
                _, fut = self._calls.popleft()
                fut.cancel()
