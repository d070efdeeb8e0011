"""The Engine: owns a model and its preallocated KV cache, and generates token ids for batches of prompts.

Rows may have different prompt lengths (right-padded prefill, per-row decode positions) and finish at
different times (stop tokens, per-row). `generate` is a generator yielding one `Step` per produced
token position, so callers can stream; it checks limits up front (prompt plus max_new_tokens must fit
the context) and raises a `PippinError` that says what to do. Each row may name its own LoRA adapter
(`adapters=[...]`): the engine's AdapterStore makes them resident and routes rows to them, so one batch
mixes adapters in one forward pass. Text and stop strings are the job of pippin.engine.stream.
`kernels=True` (the default) runs few-token steps on pippin's CPU kernels (`FusedDecoder`, built from the model
here; the model itself where the kernels do not apply); `compile=True` compiles the model's decode step with
torch.compile instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from pippin.adapters.store import AdapterStore
from pippin.engine.generate import decode_step, prefill
from pippin.engine.kv_cache import KVCache
from pippin.engine.sampling import SamplingParams, sample
from pippin.errors import PippinError
from pippin.kernels.decoder import FusedDecoder
from pippin.model.transformer import Transformer


@dataclass(kw_only=True)
class Step:
    """One generation step: the new token of every row, and which rows are finished."""

    tokens: torch.Tensor
    """(B,) token ids produced at this step (meaningless for rows already done before it)."""
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
    """Batched generation over one model with an engine-owned, in-place KV cache."""

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
        self.kernels = kernels and not compile
        """Few-token steps run on the CPU kernels (where they apply to this model)."""
        self.forward: Transformer | FusedDecoder = FusedDecoder.from_model(model) if self.kernels else model
        """What prefill and decode call: the model, or its fused decoder (same signature)."""
        self.adapters = adapters
        """Where per-row adapter names are resolved; None: the engine serves the base model only."""
        cfg = model.config
        self.max_len = min(cfg.max_seq_len, max_len or 4096)
        self.kv8 = kv8
        """Keys and values stored in 8 bits (see KVCache)."""
        self.cache = KVCache(cfg, batch_size=max_batch, max_len=self.max_len, kv8=kv8)
        self.eos_ids = list(cfg.eos_token_ids)
        self._decode = torch.compile(decode_step, dynamic=True) if compile else decode_step
        self.last_stats: GenerationStats | None = None

    def cache_for(self, batch: int) -> KVCache:
        """A cache view over the first `batch` rows (the buffer grows once when a bigger batch comes)."""
        if batch > self.cache.batch_size:  # grow once; later calls reuse the bigger buffer
            self.cache = KVCache(self.model.config, batch_size=batch, max_len=self.max_len, kv8=self.kv8)
        return self.cache.first_rows(batch)

    def check_prompt(self, n_prompt: int, max_new_tokens: int) -> None:
        if n_prompt == 0:
            raise PippinError("The prompt is empty; give at least one token of text.")
        if n_prompt + max_new_tokens > self.max_len:
            raise PippinError(
                f"The prompt has {n_prompt} tokens and max_new_tokens is {max_new_tokens}, which exceeds the "
                f"context of {self.max_len} tokens; shorten the prompt or lower max_new_tokens."
            )

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
        """Yield one Step per generated position until every row is done. Stats land in `last_stats`.

        adapters: one adapter name (or None for the base) per row; all None when omitted.
        """
        B = len(prompts)
        if B == 0:
            return
        for p in prompts:
            self.check_prompt(len(p), params.max_new_tokens)
        self.use_adapters(adapters, B)
        if params.max_new_tokens == 0:
            self.last_stats = GenerationStats(
                prompt_tokens=sum(map(len, prompts)),
                generated_tokens=0,
                ttft_s=0.0,
                prefill_tok_s=0.0,
                decode_tok_s=0.0,
                total_s=0.0,
                finish_reasons=["length"] * B,
            )
            return
        stop = torch.tensor([] if params.ignore_eos else list(stop_ids if stop_ids is not None else self.eos_ids), dtype=torch.long)
        lengths = torch.tensor([len(p) for p in prompts])
        T = int(lengths.max())
        tokens = torch.zeros(B, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        # Repetition-penalty history: pad with each row's first token so padding adds nothing new.
        history = torch.where(torch.arange(T) < lengths.unsqueeze(1), tokens, tokens[:, :1]) if params.repetition_penalty != 1.0 else None

        cache = self.cache_for(B)
        t0 = time.perf_counter()
        logits = prefill(self.forward, tokens, lengths, cache)
        done = torch.zeros(B, dtype=torch.bool)
        n_gen = torch.zeros(B, dtype=torch.long)
        reasons = ["length"] * B
        t_first = t0
        try:
            for step in range(params.max_new_tokens):
                nxt = sample(logits, params, generator=gen, history=history)
                active = ~done
                n_gen += active.long()
                hit = active & torch.isin(nxt, stop)
                for i in hit.nonzero().flatten().tolist():
                    reasons[i] = "stop"
                done = done | hit
                if step == 0:
                    t_first = time.perf_counter()
                if step == params.max_new_tokens - 1:
                    done = torch.ones_like(done)
                yield Step(tokens=nxt, done=done.clone(), active=active)
                if bool(done.all()):
                    break
                if history is not None:
                    history = torch.cat([history, nxt.unsqueeze(1)], dim=1)
                logits = self._decode(self.forward, nxt, cache)
        finally:  # also when the caller stops early (stop string, client gone): stats stay truthful
            t_end = time.perf_counter()
            n_decode = int(n_gen.max()) - 1
            self.last_stats = GenerationStats(
                prompt_tokens=int(lengths.sum()),
                generated_tokens=int(n_gen.sum()),
                ttft_s=t_first - t0,
                prefill_tok_s=float(lengths.sum()) / max(t_first - t0, 1e-9),
                decode_tok_s=n_decode / (t_end - t_first) if n_decode > 0 else 0.0,
                total_s=t_end - t0,
                finish_reasons=reasons,
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
