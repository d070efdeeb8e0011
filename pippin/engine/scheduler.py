"""Continuous batching: requests join and leave the running batch between decode steps.

`BatchScheduler` owns a model and a KV cache of `max_batch` rows: the one generation core that `Engine.generate`,
eval and the server all step. `submit` queues a request (n samples of one prompt, with its own SamplingParams,
seed, stop ids and LoRA adapter). Each `step()` first admits waiting requests into free rows, then prefills: the
admitted prompts run together as one right-padded batch (each in its own row, rows anywhere in the cache), at most
`prefill_chunk` prompt tokens per step, so a long prompt is prefilled over several steps instead of stalling the
rows that decode (Sarathi-style chunked prefill); for n > 1 the row is copied to the sibling rows once its prompt
is in. Then one decode step runs over every decoding row, each at its own position and with its own adapter, and
samples each row with its own parameters. A finished or cancelled row frees its slot at once. Tokens and endings
go to the request's `Sink`, on the thread that calls `step()`.

With `reuse_prefix`, a prompt starts from the longest prefix of it that some row's cache already holds (a chat's
earlier turns, a shared system prompt, under the same adapter): those slots are copied into its row and only the rest
is prefilled, as llama.cpp's server reuses a slot's prompt. A freed row keeps its slots and remembers their tokens
until another request takes the row.

Token ids only: text, stop strings and chat templates belong to the caller (pippin.serve), which can end a
sample from its sink. There are no threads here: the caller runs `step()` in a loop. `submit` and `cancel`
are thread-safe. Follows Orca's iteration-level scheduling (Yu et al., OSDI 2022) and vLLM's scheduler,
without paging: each row owns a contiguous slice of the preallocated cache.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from pippin.adapters.store import AdapterStore
from pippin.engine.generate import decode_step, prefill
from pippin.engine.kv_cache import KVCache
from pippin.engine.sampling import SamplingParams, sample
from pippin.errors import PippinError
from pippin.kernels.decoder import FusedDecoder
from pippin.model.transformer import Transformer

log = logging.getLogger(__name__)


class SchedulerFull(PippinError):
    """Too many requests are running or waiting; the caller should retry later (HTTP 429)."""


class DeadlineExceeded(PippinError):
    """A request's deadline passed before it got a row (HTTP 503: the server is too busy to start it in time)."""


class Sink(Protocol):
    """Where a request's output goes. Called on the stepping thread; keep it quick."""

    def token(self, index: int, token: int) -> bool:
        """A new token of sample `index`. Return False to end that sample here (e.g. a stop string matched)."""
        ...

    def finish(self, index: int, reason: str) -> None:
        """Sample `index` ended: 'stop' (stop token, or the sink said so), 'length' or 'cancelled'."""
        ...

    def fail(self, error: Exception) -> None:
        """The request could not run (e.g. its adapter failed to load); no more calls follow."""
        ...


@dataclass(eq=False, kw_only=True)
class Ticket:
    """One submitted request: n samples of one prompt."""

    prompt: list[int]
    params: SamplingParams
    adapter: str | None
    n: int
    sink: Sink
    cancelled: bool = False
    """Set by `cancel`; the scheduler frees the rows at its next step."""
    overtaken: int = 0
    """Later requests admitted while this one waited (see BatchScheduler.max_overtakes)."""
    stop_ids: frozenset[int] | None = None
    """Token ids that end a sample (None: the scheduler's eos_ids)."""
    deadline: float | None = None
    """time.monotonic() past which the request ends: still waiting, it fails (DeadlineExceeded); running, its samples
    end with what they have ('length')."""


@dataclass(eq=False, kw_only=True)
class _Row:
    ticket: Ticket
    index: int
    """Which of the ticket's n samples this row is."""
    generator: torch.Generator
    history: list[int] | None
    """Prompt plus output, kept only when a repetition penalty needs it."""
    last: int = 0
    """The token to feed at the next decode step."""
    out: list[int] = field(default_factory=list)
    """Tokens sampled so far (all but the last are in the cache)."""
    n_generated: int = 0
    ready: bool = False
    """The prompt is in the cache: the row decodes (before: its prefill runs in chunks)."""


@dataclass(eq=False, kw_only=True)
class _Prefill:
    """A request whose prompt is being written into its first row, chunk by chunk."""

    ticket: Ticket
    rows: list[int]
    done: int = 0
    """Prompt tokens already in the cache."""


@dataclass(kw_only=True)
class SchedulerStats:
    steps: int = 0
    """Decode steps run."""
    prefills: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    """Tokens sampled (stop tokens included)."""
    last_batch: int = 0
    """Rows in the last decode step."""
    busy_s: float = 0.0
    """Time spent in prefill and decode forwards."""
    reused_tokens: int = 0
    """Prompt tokens taken from a cached prefix instead of prefilled (reuse_prefix)."""


class BatchScheduler:
    """Continuous batching over one model: a fixed pool of cache rows, requests admitted between steps."""

    def __init__(
        self,
        model: Transformer,
        *,
        max_batch: int = 8,
        max_len: int | None = None,
        max_queue: int = 64,
        adapters: AdapterStore | None = None,
        eos_ids: Sequence[int] | None = None,
        kv8: bool = False,
        max_overtakes: int = 8,
        kernels: bool = True,
        compile: bool = False,
        prefill_chunk: int = 512,
        reuse_prefix: bool = False,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise PippinError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}.")
        self.model = model.eval()
        self.forward: Transformer | FusedDecoder = FusedDecoder.from_model(model) if kernels and not compile else model
        """What prefill and decode call: the model, or its fused decoder on the CPU kernels (same signature)."""
        self._decode_step = torch.compile(decode_step, dynamic=True) if compile else decode_step
        self.prefill_chunk = prefill_chunk
        """Prompt tokens prefilled per step, all waiting prompts together (decoding rows wait at most this long)."""
        cfg = model.config
        self.max_batch = max_batch
        """Rows generated at once (the cache has this many; a lower value set later leaves the rest unused)."""
        self.max_queue = max_queue
        """Samples that may wait for a row beyond the `max_batch` running ones."""
        self.max_len = min(cfg.max_seq_len, max_len or 4096)
        self.max_overtakes = max_overtakes
        """A waiting request that later ones have overtaken this often (it needs more rows or an adapter slot than are
        free) stops admissions until it fits: rows drain for it instead of being taken one by one forever."""
        self.adapters = adapters
        self.eos_ids = set(cfg.eos_token_ids if eos_ids is None else eos_ids)
        self.cache = KVCache(cfg, batch_size=max_batch, max_len=self.max_len, kv8=kv8)
        self.lengths = torch.zeros(max_batch, dtype=torch.long)
        """Filled cache slots per row (0 for a free row)."""
        self.rows: list[_Row | None] = [None] * max_batch
        self.reuse_prefix = reuse_prefix
        """Start each prompt from the longest prefix of it already in a row's cache (module docstring)."""
        self._kept: list[tuple[str | None, list[int]] | None] = [None] * max_batch
        """Per free row, with reuse_prefix: (adapter, the tokens its slots hold); their count is its `lengths` entry, so
        a decode step that rides the row along writes its dummy after them."""
        self._kept_at = [0] * max_batch  # when each kept prefix was freed (oldest goes first)
        self._clock = 0
        self.stats = SchedulerStats()
        self._waiting: deque[Ticket] = deque()
        self._prefilling: list[_Prefill] = []
        self._n_waiting = 0  # samples, not tickets
        self._lock = threading.Lock()

    # --- called from any thread ---------------------------------------------------------------------

    def check(self, n_prompt: int, params: SamplingParams, n: int = 1) -> None:
        """Raise a PippinError if this request can never run here (it would never leave the queue)."""
        if n_prompt == 0:
            raise PippinError("The prompt is empty; give at least one token of text.")
        if n_prompt + params.max_new_tokens > self.max_len:
            raise PippinError(
                f"The prompt has {n_prompt} tokens and up to {params.max_new_tokens} new tokens were asked for, which "
                f"exceeds the context of {self.max_len} tokens; shorten the prompt or lower the maximum of new tokens."
            )
        if not 1 <= n <= self.max_batch:
            raise PippinError(f"n must be between 1 and {self.max_batch} (the rows generated at once), got {n}.")

    def submit(self, prompt: Sequence[int], params: SamplingParams, *, sink: Sink, adapter: str | None = None, n: int = 1) -> Ticket:
        """Queue a request; raises SchedulerFull past max_batch + max_queue samples in flight."""
        return self.submit_many([(list(prompt), params, adapter, n, sink)])[0]

    def submit_many(
        self,
        requests: Sequence[tuple[list[int], SamplingParams, str | None, int, Sink]],
        *,
        stop_ids: Sequence[int] | None = None,
        deadline: float | None = None,
    ) -> list[Ticket]:
        """Queue several requests all or none (one HTTP call with several prompts). stop_ids: instead of eos_ids;
        deadline: a time.monotonic() by which they must be done (see Ticket.deadline)."""
        for prompt, params, _, n, _ in requests:
            self.check(len(prompt), params, n)
        if adapters := {a for _, _, a, _, _ in requests if a is not None}:
            if self.adapters is None:
                raise PippinError("This model has no adapter store; load it with adapters to use them.")
            in_memory = set(self.adapters.loaded())
            for a in adapters - in_memory:
                self.adapters.path_of(a)  # unknown names fail now, not inside the batch
        stops = frozenset(stop_ids) if stop_ids is not None else None
        tickets = [
            Ticket(prompt=list(p), params=s, adapter=a, n=n, sink=k, stop_ids=stops, deadline=deadline) for p, s, a, n, k in requests
        ]
        with self._lock:
            wanted = sum(t.n for t in tickets)
            if self._n_running() + self._n_waiting + wanted > self.max_batch + self.max_queue:
                raise SchedulerFull(f"The server is at capacity ({self.max_batch} running, {self.max_queue} waiting); retry shortly.")
            self._waiting.extend(tickets)
            self._n_waiting += wanted
        return tickets

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request (client gone); its rows are freed at the next step."""
        ticket.cancelled = True

    @property
    def n_waiting(self) -> int:
        return self._n_waiting

    @property
    def n_running(self) -> int:
        return self._n_running()

    def _n_running(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def has_work(self) -> bool:
        return self._n_waiting > 0 or self._n_running() > 0

    # --- called from the stepping thread -----------------------------------------------------------

    def step(self) -> None:
        """Admit what fits, prefill up to `prefill_chunk` prompt tokens, then one decode step for every decoding row."""
        self._drop_cancelled()
        self._admit()
        if self._prefilling:
            self._prefill()
        if any(r is not None and r.ready for r in self.rows):
            self._decode()

    def _drop_cancelled(self) -> None:
        """Free the rows of cancelled requests and of those past their deadline; fail waiting ones past it."""
        now = time.monotonic()
        late = lambda t: t.deadline is not None and now >= t.deadline  # noqa: E731
        for i, row in enumerate(self.rows):
            if row is not None and row.ticket.cancelled:
                self._finish(i, "cancelled")
            elif row is not None and late(row.ticket):
                self._finish(i, "length")  # out of time: the sample ends with what it has
        with self._lock:
            gone = [t for t in self._waiting if t.cancelled or late(t)]
            for t in gone:
                self._waiting.remove(t)
                self._n_waiting -= t.n
        for t in gone:
            if t.cancelled:
                for k in range(t.n):
                    _call(t, t.sink.finish, k, "cancelled")
            else:
                _call(t, t.sink.fail, DeadlineExceeded("The request waited past its deadline for a free row; retry shortly."))

    def _running_adapters(self) -> set[str]:
        return {r.ticket.adapter for r in self.rows if r is not None and r.ticket.adapter is not None}

    def _admit(self) -> None:
        """Move waiting requests into free rows, first come first served (a request whose adapter cannot get
        a slot next to the running ones waits without blocking the others)."""
        while True:
            free = [i for i, r in enumerate(self.rows[: self.max_batch]) if r is None]
            with self._lock:
                ticket, passed = None, []
                for t in self._waiting:
                    if self._fits(t, len(free)):
                        ticket = t
                        break
                    if t.overtaken >= self.max_overtakes and not t.cancelled:
                        break  # it has waited long enough: hold the free rows for it
                    passed.append(t)
                if ticket is None:
                    return
                for t in passed:
                    t.overtaken += 1
                self._waiting.remove(ticket)
                self._n_waiting -= ticket.n
            self._start(ticket, free[: ticket.n])

    def _fits(self, ticket: Ticket, n_free: int) -> bool:
        if ticket.cancelled or ticket.n > n_free:
            return False
        if ticket.adapter is None or self.adapters is None:
            return True
        return len(self._running_adapters() | {ticket.adapter}) <= self.adapters.n_slots - 1

    def _route(self, names: list[str | None]) -> None:
        if self.adapters is not None:
            self.adapters.route(names, keep=sorted(self._running_adapters()))

    def _route_running(self, hi: int) -> None:
        """Route rows [0, hi) to their adapters. An adapter that can no longer be loaded (unloaded from memory and
        its files gone) fails the requests that use it; the others go on."""
        try:
            self._route([r.ticket.adapter if r is not None else None for r in self.rows[:hi]])
            return
        except PippinError:
            pass
        for name in self._running_adapters():
            try:
                self.adapters.get(name)
            except PippinError as e:
                self._fail_where(lambda t, name=name: t.adapter == name, e)
        self._route([r.ticket.adapter if r is not None else None for r in self.rows[:hi]])

    def _start(self, ticket: Ticket, rows: list[int]) -> None:
        """Give the request its rows (one per sample) and queue its prompt for prefill."""
        p = ticket.params
        if p.max_new_tokens == 0:
            for k in range(ticket.n):
                _call(ticket, ticket.sink.finish, k, "length")
            return
        src, reused = self._longest_prefix(ticket) if self.reuse_prefix else (None, 0)
        if self._kept[rows[0]] is not None and src != rows[0]:
            self._shelve(rows[0], avoid={src, *rows})
        if reused and src != rows[0]:
            self.cache.copy_row(src, rows[0], reused)
        self.stats.reused_tokens += reused
        for k, i in enumerate(rows):
            # Each row owns its generator: seeded rows reproduce, others draw fresh entropy (the global RNG
            # would repeat the same "random" replies after every restart).
            gen = torch.Generator().manual_seed(p.seed + k if p.seed is not None else secrets.randbits(63))
            history = list(ticket.prompt) if p.repetition_penalty != 1.0 else None
            self.rows[i] = _Row(ticket=ticket, index=k, generator=gen, history=history)
            self._kept[i] = None
            self.lengths[i] = 0
        self.lengths[rows[0]] = reused
        self._prefilling.append(_Prefill(ticket=ticket, rows=rows, done=reused))

    def _held(self, i: int) -> tuple[str | None, list[int]] | None:
        """(adapter, tokens) whose keys and values row i's slots hold, or None."""
        row = self.rows[i]
        if row is None:
            return self._kept[i]
        n = int(self.lengths[i])
        return (row.ticket.adapter, (row.ticket.prompt + row.out)[:n]) if n else None

    def _longest_prefix(self, ticket: Ticket) -> tuple[int | None, int]:
        """The row whose slots hold the longest prefix of the prompt under the same adapter, and its length. The
        prompt's last token is always prefilled: its logits give the first sample."""
        prompt, best, src = ticket.prompt, 0, None
        limit = len(prompt) - 1
        for i in range(len(self.rows)):
            held = self._held(i)
            if held is None or held[0] != ticket.adapter:
                continue
            tokens, n = held[1], 0
            stop = min(limit, len(tokens))
            while n < stop and tokens[n] == prompt[n]:
                n += 1
            if n > best:
                best, src = n, i
        return src, best

    def _shelve(self, i: int, avoid: set[int | None]) -> None:
        """Move free row i's kept prefix into the highest free row that holds none (else over an older one), so that
        new requests still take the lowest rows (a decode step runs over rows 0..highest busy) and the prefix stays."""
        spare = [j for j in range(len(self.rows)) if self.rows[j] is None and j != i and j not in avoid]
        empty = [j for j in spare if self._kept[j] is None]
        older = [j for j in spare if self._kept[j] is not None and self._kept_at[j] < self._kept_at[i]]
        dst = empty[-1] if empty else min(older, key=lambda j: self._kept_at[j]) if older else None
        if dst is None:
            return
        n = len(self._kept[i][1])
        self.cache.copy_row(i, dst, n)
        self._kept[dst], self._kept_at[dst] = self._kept[i], self._kept_at[i]
        self.lengths[dst] = n

    def _free(self, i: int) -> None:
        """Free row i; with reuse_prefix it remembers what its slots hold (a dummy decode row writes after them)."""
        held = self._held(i) if self.reuse_prefix else None
        self.rows[i] = None
        if held is not None:
            held = (held[0], held[1][: self.max_len - 1])
        self._kept[i] = held
        self._kept_at[i], self._clock = self._clock, self._clock + 1
        self.lengths[i] = len(held[1]) if held else 0

    def forget_prefixes(self, *adapters: str) -> None:
        """Drop the remembered prefixes: all, or those of these adapters (before a name is reused for other weights)."""
        for i, held in enumerate(self._kept):
            if held is not None and (not adapters or held[0] in adapters):
                self._kept[i] = None
                self.lengths[i] = 0

    def _prefill(self) -> None:
        """The next chunk of every waiting prompt, up to `prefill_chunk` tokens, as one batch; a prompt that is then
        complete is copied to its sibling rows and samples its first token."""
        self._prefilling = [p for p in self._prefilling if self.rows[p.rows[0]] is not None and self.rows[p.rows[0]].ticket is p.ticket]
        group: list[tuple[_Prefill, int]] = []
        budget = self.prefill_chunk
        for p in self._prefilling:
            n = min(len(p.ticket.prompt) - p.done, budget)
            width = max([n] + [c for _, c in group])
            if n <= 0 or any(q.done + width > self.max_len for q, _ in group + [(p, n)]):
                break  # padding the batch to `width` must stay inside every row's context
            group.append((p, n))
            budget -= n
        if not group:
            return
        t0 = time.perf_counter()
        try:
            logits = self._prefill_rows(group)
        except Exception:  # one request's adapter is gone or its prefill hit a bug: find it, fail only that request
            logits = None
        if logits is None:
            for p, n in group:
                try:
                    self._after_prefill(p, n, self._prefill_rows([(p, n)])[0])
                except Exception as e:
                    if not isinstance(e, PippinError):
                        log.exception("A request's prefill failed; failing that request only.")
                    self._fail_where(lambda t, p=p: t is p.ticket, e)
        else:
            for j, (p, n) in enumerate(group):
                self._after_prefill(p, n, logits[j])
        self.stats.busy_s += time.perf_counter() - t0
        self._prefilling = [p for p in self._prefilling if p.done < len(p.ticket.prompt)]

    def _prefill_rows(self, group: list[tuple[_Prefill, int]]) -> torch.Tensor:
        """One forward over the chunks (prefill, n tokens each) in their first rows; logits (len(group), V)."""
        width = max(n for _, n in group)
        tokens = torch.zeros(len(group), width, dtype=torch.long)
        for j, (p, n) in enumerate(group):
            tokens[j, :n] = torch.tensor(p.ticket.prompt[p.done : p.done + n])
        self._route([p.ticket.adapter for p, _ in group])
        view = self.cache.gather([p.rows[0] for p, _ in group])
        start = torch.tensor([p.done for p, _ in group])
        return prefill(self.forward, tokens, torch.tensor([n for _, n in group]), view, start=start)

    def _after_prefill(self, p: _Prefill, n: int, logits: torch.Tensor) -> None:
        p.done += n
        first, T = p.rows[0], len(p.ticket.prompt)
        self.lengths[first] = p.done  # a decode step that rides this row along writes its dummy at the next slot
        self.stats.prompt_tokens += n
        if p.done < T:
            return
        for i in p.rows[1:]:  # n samples share one prefill
            self.cache.copy_row(first, i, T)
        self.lengths[p.rows] = T
        self.stats.prefills += 1
        for i in p.rows:
            if self.rows[i] is not None:
                self.rows[i].ready = True
        for i in p.rows:
            if self.rows[i] is not None and (tok := self._sample(self.rows[i], logits.unsqueeze(0))) >= 0:
                self._emit(i, tok)

    def _decode(self) -> None:
        hi = max(i for i, r in enumerate(self.rows) if r is not None and r.ready) + 1
        self._route_running(hi)
        if not any(r is not None and r.ready for r in self.rows):
            return
        hi = max(i for i, r in enumerate(self.rows) if r is not None and r.ready) + 1
        # Free rows below `hi` ride along as dummies at position 0 (their slots are scratch), rows still prefilling at
        # their next slot (which their next chunk overwrites).
        tokens = torch.tensor([r.last if r is not None and r.ready else 0 for r in self.rows[:hi]])
        view = self.cache.first_rows(hi)
        view.lengths = self.lengths[:hi].clone()
        t0 = time.perf_counter()
        logits = self._decode_step(self.forward, tokens, view)
        self.stats.busy_s += time.perf_counter() - t0
        self.stats.steps += 1
        live = [i for i in range(hi) if self.rows[i] is not None and self.rows[i].ready]
        self.stats.last_batch = len(live)
        self.lengths[live] += 1
        greedy = logits.argmax(-1)
        for i in live:
            row = self.rows[i]
            if row is None:  # its request failed while sampling a sibling row
                continue
            tok = int(greedy[i]) if row.ticket.params.greedy and row.history is None else self._sample(row, logits[i : i + 1])
            if tok >= 0:
                self._emit(i, tok)

    def _sample(self, row: _Row, logits: torch.Tensor) -> int:
        """The row's next token, or -1 after failing its request (e.g. parameters that leave no token to sample)."""
        history = torch.tensor([row.history]) if row.history is not None else None
        try:
            return int(sample(logits, row.ticket.params, generator=row.generator, history=history))
        except RuntimeError as e:
            self._fail_where(lambda t: t is row.ticket, PippinError(f"Sampling failed for these parameters ({e}); check them."))
            return -1

    def _emit(self, i: int, token: int) -> None:
        """Hand a sampled token to the sink and end the row if it is done."""
        row = self.rows[i]
        t = row.ticket
        row.n_generated += 1
        row.out.append(token)
        self.stats.generated_tokens += 1
        if not t.params.ignore_eos and token in (t.stop_ids if t.stop_ids is not None else self.eos_ids):
            self._finish(i, "stop")
            return
        if not _call(t, t.sink.token, row.index, token):
            self._finish(i, "stop" if not t.cancelled else "cancelled")
            return
        if row.n_generated >= t.params.max_new_tokens:
            self._finish(i, "length")
            return
        row.last = token
        if row.history is not None:
            row.history.append(token)

    def _finish(self, i: int, reason: str) -> None:
        row = self.rows[i]
        self._free(i)
        _call(row.ticket, row.ticket.sink.finish, row.index, reason)

    def fail_running(self, error: Exception) -> None:
        """Fail every running request and free all rows (after an unexpected error in a step: no prefix is kept)."""
        self._fail_where(lambda t: True, error)
        self.forget_prefixes()

    def fail_all(self, error: Exception) -> None:
        """Fail the running requests and those still waiting for a row (shutdown)."""
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
            self._n_waiting = 0
        self.fail_running(error)
        for t in waiting:
            _call(t, t.sink.fail, error)

    def _fail_where(self, pred, error: Exception) -> None:  # noqa: ANN001 - a predicate on tickets
        tickets = {}
        for i, r in enumerate(self.rows):
            if r is not None and pred(r.ticket):
                tickets[id(r.ticket)] = r.ticket
                self._free(i)
        for t in tickets.values():
            _call(t, t.sink.fail, error)

    def warm_up(self, prompt: Sequence[int], *, steps: int = 2) -> None:
        """Run one short greedy request to the end and forget it: the first real request then does not pay for the
        kernels' first calls (expanded act8 weights, the decode plan). Call it before any other request; the
        stats start from zero afterwards."""
        if self.has_work:
            raise PippinError("warm_up must run before any request is queued.")
        self.submit(prompt, SamplingParams(max_new_tokens=steps, temperature=0.0, ignore_eos=True), sink=_Discard())
        while self.has_work:
            self.step()
        self.stats = SchedulerStats()

    def uses_adapter(self, name: str) -> int:
        """Requests running or waiting with this adapter."""
        with self._lock:
            waiting = sum(t.adapter == name for t in self._waiting if not t.cancelled)
        return waiting + len({id(r.ticket) for r in self.rows if r is not None and r.ticket.adapter == name})


class _Discard:
    """A Sink that keeps nothing (warm-up); a failure is raised."""

    def token(self, index: int, token: int) -> bool:
        return True

    def finish(self, index: int, reason: str) -> None:
        pass

    def fail(self, error: Exception) -> None:
        raise error


def _call(ticket: Ticket, fn, *args) -> bool:  # noqa: ANN001 - a sink method
    """Call a sink method; a sink that raises cancels its own request, never the batch."""
    try:
        return fn(*args) is not False
    except Exception:  # the sink is the caller's code: isolate it
        log.exception("A request's sink raised; cancelling that request.")
        ticket.cancelled = True
        return False
