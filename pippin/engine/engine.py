"""The Engine: owns a model and its generation core (a `BatchScheduler` with the one KV cache), and generates token ids
for batches of prompts.

`generate` submits every prompt to the core and steps it until all rows are done: prompts are prefilled together
(in chunks when long), rows decode at their own positions and finish at different times (stop tokens, per row).
It is a generator yielding a `Step` per new token position of the rows, so callers can stream; it checks limits
up front (prompt plus max_new_tokens must fit the context) and raises a `PippinError` that says what to do. Each row
may name its own LoRA adapter (`adapters=[...]`): the engine's AdapterStore makes them resident and routes rows to
them, so one batch mixes adapters in one forward pass. Text and stop strings are the job of pippin.engine.stream.
`kernels=True` (the default) runs few-token steps on pippin's CPU kernels (`FusedDecoder`, built from the model
here; the model itself where the kernels do not apply); `compile=True` compiles the model's decode step with
torch.compile instead.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from pippin.adapters.store import AdapterStore
from pippin.engine.kv_cache import KVCache
from pippin.engine.sampling import SamplingParams
from pippin.engine.scheduler import BatchScheduler
from pippin.errors import PippinError
from pippin.kernels.decoder import FusedDecoder
from pippin.model.transformer import Transformer


@dataclass(kw_only=True)
class Step:
    """One generation step: the new token of every row, and which rows are finished."""

    tokens: torch.Tensor
    """(B,) token ids produced at this step (meaningful where `active`; a row that ended on a stop token shows it)."""
    done: torch.Tensor
    """(B,) bool: the row has finished (at this step or before)."""
    active: torch.Tensor
    """(B,) bool: the row produced a real token at this step."""


@dataclass(kw_only=True)
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    """Time to first token: prefill plus the first sample."""
    prefill_tok_s: float
    decode_tok_s: float
    """Tokens per second after the first token, per row."""
    total_s: float
    finish_reasons: list[str] = field(default_factory=list)
    """Per row: 'stop' (stop token or string) or 'length' (max_new_tokens)."""


class Engine:
    """Batched generation over one model, on the generation core that eval and the server step too."""

    def __init__(
        self,
        model: Transformer,
        *,
        max_batch: int = 1,
        max_len: int | None = None,
        compile: bool = False,
        adapters: AdapterStore | None = None,
        kv8: bool = False,
        kernels: bool = True,
    ) -> None:
        self.model = model.eval()
        self.adapters = adapters
        """Where per-row adapter names are resolved; None: the engine serves the base model only."""
        cfg = model.config
        self.max_len = min(cfg.max_seq_len, max_len or 4096)
        self.kv8 = kv8
        """Keys and values stored in 8 bits (see KVCache)."""
        self.kernels = kernels and not compile
        """Few-token steps run on the CPU kernels (where they apply to this model)."""
        self.compile = compile
        self.eos_ids = list(cfg.eos_token_ids)
        self.core = self._new_core(max_batch, 0)
        self.last_stats: GenerationStats | None = None

    def _new_core(self, max_batch: int, max_queue: int) -> BatchScheduler:
        return BatchScheduler(
            self.model, max_batch=max_batch, max_len=self.max_len, max_queue=max_queue, adapters=self.adapters,
            eos_ids=self.eos_ids, kv8=self.kv8, kernels=self.kernels, compile=self.compile,
        )  # fmt: skip

    @property
    def forward(self) -> Transformer | FusedDecoder:
        """What prefill and decode call: the model, or its fused decoder (same signature)."""
        return self.core.forward

    @property
    def cache(self) -> KVCache:
        return self.core.cache

    def scheduler(self, *, max_batch: int = 1, max_queue: int = 0) -> BatchScheduler:
        """The generation core, idle, set to run `max_batch` rows at once with room for `max_queue` waiting samples (its
        cache is rebuilt bigger only when it has fewer rows)."""
        core = self.core
        if core.has_work:
            raise PippinError("The engine is already generating; finish or close the other generation first.")
        if max_batch > core.cache.batch_size:
            self.core = core = self._new_core(max_batch, max_queue)
        core.max_batch, core.max_queue = max_batch, max_queue
        return core

    def cache_for(self, batch: int) -> KVCache:
        """A cache view over the first `batch` rows of the core's cache, for forwards run outside the core
        (forced-choice scoring)."""
        return self.scheduler(max_batch=batch).cache.first_rows(batch)

    def check_prompt(self, n_prompt: int, max_new_tokens: int) -> None:
        self.core.check(n_prompt, SamplingParams(max_new_tokens=max_new_tokens))

    def use_adapters(self, names: Sequence[str | None] | None, batch: int) -> None:
        """Route each of `batch` rows to its adapter (validated, loaded on demand) before a forward pass."""
        if names is not None and len(names) != batch:
            raise PippinError(f"Got {len(names)} adapter names for {batch} prompts; give one per prompt (None for the base).")
        if self.adapters is None:
            if names is not None and any(n is not None for n in names):
                raise PippinError("This engine has no adapter store; load the model with adapters to use them.")
            return
        self.adapters.route(list(names) if names is not None else [None] * batch)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        stop_ids: Sequence[int] | None = None,
        adapters: Sequence[str | None] | None = None,
    ) -> Iterator[Step]:
        """Yield a Step per new token position of the rows until every row is done. Stats land in `last_stats`.

        adapters: one adapter name (or None for the base) per row; all None when omitted. Each row samples with its own
        generator seeded from `params.seed`, so a row's reply does not depend on the others.
        """
        B = len(prompts)
        if B == 0:
            return
        for p in prompts:
            self.check_prompt(len(p), params.max_new_tokens)
        if adapters is not None and len(adapters) != B:
            raise PippinError(f"Got {len(adapters)} adapter names for {B} prompts; give one per prompt (None for the base).")
        if self.adapters is None and adapters is not None and any(a is not None for a in adapters):
            raise PippinError("This engine has no adapter store; load the model with adapters to use them.")
        stop = list(stop_ids if stop_ids is not None else self.eos_ids)
        core = self.scheduler(max_batch=B)
        rows = [_RowSink() for _ in range(B)]
        names = list(adapters) if adapters is not None else [None] * B
        t0 = time.perf_counter()
        tickets = core.submit_many([(list(p), params, a, 1, sink) for p, a, sink in zip(prompts, names, rows)], stop_ids=stop)
        t_first = None
        done = torch.zeros(B, dtype=torch.bool)
        n_gen = torch.zeros(B, dtype=torch.long)
        try:
            while core.has_work:
                core.step()
                # A step can give a row two tokens (its first after the prefill, then a decode): one Step each.
                while (step := _next_step(rows, done, stop)) is not None:
                    t_first = t_first or time.perf_counter()
                    n_gen += step.active.long()
                    done = step.done
                    yield step
            for r in rows:
                if r.error is not None:
                    raise r.error
        finally:  # also when the caller stops early (stop string, client gone): stats stay truthful, rows are freed
            for t in tickets:
                core.cancel(t)
            try:
                while core.has_work:
                    core.step()
            except Exception as e:  # a failed step left rows behind: free them, the first error is the one raised
                core.fail_all(e)
            t_end = time.perf_counter()
            t_first = t_first or t_end
            n_decode = int(n_gen.max()) - 1
            n_prompt = sum(map(len, prompts))
            self.last_stats = GenerationStats(
                prompt_tokens=n_prompt,
                generated_tokens=int(n_gen.sum()),
                ttft_s=t_first - t0,
                prefill_tok_s=n_prompt / max(t_first - t0, 1e-9),
                decode_tok_s=n_decode / (t_end - t_first) if n_decode > 0 else 0.0,
                total_s=t_end - t0,
                finish_reasons=["stop" if r.reason in ("stop", "stop shown") else "length" for r in rows],
            )

    def generate_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams, **kw) -> list[list[int]]:
        """All generated ids per row (stop tokens excluded)."""
        out: list[list[int]] = [[] for _ in prompts]
        stop_ids = kw.get("stop_ids")
        stop = set() if params.ignore_eos else set(stop_ids if stop_ids is not None else self.eos_ids)
        for st in self.generate(prompts, params, **kw):
            for i in st.active.nonzero().flatten().tolist():
                t = int(st.tokens[i])
                if t not in stop:
                    out[i].append(t)
        return out


def _next_step(rows: list[_RowSink], done: torch.Tensor, stop: list[int]) -> Step | None:
    """The next token of every row that has one waiting (a row that ended on a stop token shows one), or None."""
    tokens, active, finished = [0] * len(rows), [False] * len(rows), done.clone()
    for i, r in enumerate(rows):
        if done[i]:
            continue
        if r.pending:
            tokens[i], active[i] = r.pending.popleft(), True
        elif r.reason == "stop":
            tokens[i], active[i], r.reason = (stop[0], True, "stop shown") if stop else (0, False, "stop shown")
        finished[i] = r.reason is not None and not r.pending and r.reason != "stop"
    if not any(active):
        return None
    return Step(tokens=torch.tensor(tokens), done=finished, active=torch.tensor(active))


class _RowSink:
    """One row of `Engine.generate`: tokens not yet handed out, how the row ended, or its error."""

    def __init__(self) -> None:
        self.pending: deque[int] = deque()
        self.reason: str | None = None
        self.error: Exception | None = None

    def token(self, index: int, token: int) -> bool:
        self.pending.append(token)
        return True

    def finish(self, index: int, reason: str) -> None:
        self.reason = reason

    def fail(self, error: Exception) -> None:
        self.error, self.reason = error, "error"
