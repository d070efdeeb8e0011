"""Speculative decoding: a small draft model proposes k tokens, the target model checks them in one forward.

Greedy: the target keeps the longest prefix of the draft that equals its own argmax, then adds its own
next token, so the output is the target's plain greedy output. Sampling: draft token d is accepted with
probability min(1, p(d) / q(d)); at the first rejection the next token is drawn from the residual
norm(max(0, p - q)); if all k are accepted a bonus token comes from p. The output then follows the
target's distribution exactly (Leviathan et al. 2023, Chen et al. 2023). p and q are the filtered
distributions of SamplingParams (temperature, top-k, top-p, min-p) for both models.

On rejection both KV caches are trimmed by setting `lengths`: slots past a row's length are never
attended, so nothing is copied. One sequence at a time (B = 1); the draft is any model over the same
vocabulary: a smaller model, or the same model compressed to 2 bits (self-speculation).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from pippin.engine.generate import prefill
from pippin.engine.kv_cache import KVCache
from pippin.engine.sampling import SamplingParams, filter_logits
from pippin.errors import PippinError
from pippin.kernels.decoder import FusedDecoder
from pippin.model.transformer import Transformer


@dataclass(kw_only=True)
class SpeculativeStats:
    proposed: int = 0
    """Draft tokens offered to the target."""
    accepted: int = 0
    """Draft tokens the target kept."""
    target_forwards: int = 0
    draft_forwards: int = 0
    generated: int = 0
    total_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.generated / self.target_forwards if self.target_forwards else 0.0


def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the sampler draws from: (..., V) logits -> (..., V) probabilities."""
    shape = logits.shape
    return filter_logits(logits.reshape(-1, shape[-1]).float(), params).softmax(-1).reshape(shape)


def verify_greedy(target_logits: torch.Tensor, drafts: torch.Tensor) -> tuple[int, int]:
    """Target logits (k+1, V) after each prefix, draft tokens (k,) -> (n accepted, the target's next token)."""
    best = target_logits.argmax(-1)
    k = drafts.shape[0]
    n = int((best[:k] == drafts).long().cumprod(0).sum())
    return n, int(best[n])


def verify_sampled(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, *, generator: torch.Generator | None = None) -> tuple[int, int]:
    """Target probs p (k+1, V), draft probs q (k, V), draft tokens (k,) -> (n accepted, next token).

    Accept draft j with probability min(1, p_j(d) / q_j(d)); on rejection draw from norm(max(0, p_j - q_j)).
    """
    k = drafts.shape[0]
    u = torch.rand(k, generator=generator)
    for j in range(k):
        d = int(drafts[j])
        if float(u[j]) * float(q[j, d]) < float(p[j, d]):  # u < p/q without dividing by a tiny q
            continue
        residual = (p[j] - q[j]).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q: cannot happen after a rejection, barring rounding
            residual = p[j]
        return j, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))


@torch.inference_mode()
def forward_at(model: Transformer | FusedDecoder, tokens: list[int], cache: KVCache, start: int) -> torch.Tensor:
    """Run T tokens at positions start..start+T-1 of a one-row cache; logits (T, V) at every position."""
    x = torch.tensor([tokens])
    positions = torch.arange(start, start + len(tokens)).unsqueeze(0)
    cache.begin(positions)
    logits = model(x, positions=positions, cache=cache, mask=cache.attention_mask(positions))
    cache.lengths = torch.tensor([start + len(tokens)])
    return logits[0]


class SpeculativeDecoder:
    """Generate with a target model, k tokens at a time proposed by a draft model."""

    def __init__(self, target: Transformer, draft: Transformer, *, k: int = 4, max_len: int | None = None, kernels: bool = True) -> None:
        if target.config.vocab_size != draft.config.vocab_size:
            raise PippinError(
                f"The draft's vocabulary ({draft.config.vocab_size}) differs from the target's ({target.config.vocab_size}); "
                "use a draft with the same tokenizer."
            )
        if k < 1:
            raise PippinError(f"k (draft tokens per step) must be >= 1, got {k}.")
        self.target, self.draft, self.k = target.eval(), draft.eval(), k
        fwd = FusedDecoder.from_model if kernels else (lambda m: m)
        self.target_forward, self.draft_forward = fwd(self.target), fwd(self.draft)
        """What the steps call: each model, or its fused decoder on the CPU kernels (same signature)."""
        self.max_len = min(target.config.max_seq_len, draft.config.max_seq_len, max_len or 4096)
        self.eos_ids = set(target.config.eos_token_ids)
        self.tcache = KVCache(target.config, batch_size=1, max_len=self.max_len)
        self.dcache = KVCache(draft.config, batch_size=1, max_len=self.max_len)
        self.stats = SpeculativeStats()

    @torch.inference_mode()
    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Yield generated token ids (stop tokens excluded); statistics accumulate in `self.stats`."""
        if params.repetition_penalty != 1.0:
            raise PippinError("Speculative decoding does not support a repetition penalty; set it to 1.")
        if not prompt or len(prompt) + params.max_new_tokens > self.max_len:
            raise PippinError(
                f"The prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) must be non-empty and fit "
                f"the context of {self.max_len} tokens."
            )
        if params.max_new_tokens == 0:
            return
        st = self.stats
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        stop = set() if params.ignore_eos else self.eos_ids
        ids = list(prompt)
        logits = prefill(self.target_forward, torch.tensor([ids]), torch.tensor([len(ids)]), self.tcache)[0]
        st.target_forwards += 1
        first = int(logits.argmax()) if params.greedy else int(torch.multinomial(probs(logits, params), 1, generator=gen))
        d_len = 0  # tokens of `ids` the draft cache holds
        produced = [first]
        n_out = 0
        try:
            while True:
                for tok in produced:
                    if tok in stop:
                        return
                    ids.append(tok)
                    st.generated += 1
                    n_out += 1
                    yield tok
                    if n_out >= params.max_new_tokens:
                        return
                left = params.max_new_tokens - n_out
                # The target cache holds ids[:-1]; the verify forward feeds ids[-1] plus k drafts.
                k = max(0, min(self.k, left - 1, self.max_len - len(ids)))
                drafts, q = self._propose(ids, d_len, k, params, gen)
                if k:
                    d_len = len(ids) + k - 1  # the draft was fed ids and all drafts but the last
                tl = forward_at(self.target_forward, [ids[-1], *drafts], self.tcache, len(ids) - 1)  # (k+1, V)
                st.target_forwards += 1
                dt = torch.tensor(drafts, dtype=torch.long)
                if params.greedy:
                    n, nxt = verify_greedy(tl, dt)
                else:
                    n, nxt = verify_sampled(probs(tl, params), q, dt, generator=gen)
                st.proposed += k
                st.accepted += n
                # Trim: the target keeps ids + accepted drafts; the draft keeps what it saw of them.
                self.tcache.lengths = torch.tensor([len(ids) + n])
                d_len = min(d_len, len(ids) + n)
                produced = [*drafts[:n], nxt]
        finally:
            st.total_s += time.perf_counter() - t0

    def _propose(self, ids: list[int], d_len: int, k: int, params: SamplingParams, gen: torch.Generator | None):  # noqa: ANN202
        """k draft tokens after `ids` (the draft first catches up on ids[d_len:]) and their draft probs (k, V)."""
        if k == 0:
            return [], None
        st = self.stats
        logits = prefill(self.draft_forward, torch.tensor([ids[d_len:]]), torch.tensor([len(ids) - d_len]), self.dcache, start=d_len)[0]
        st.draft_forwards += 1
        drafts, qs = [], []
        for j in range(k):
            if params.greedy:
                tok = int(logits.argmax())
            else:
                qj = probs(logits, params)
                tok = int(torch.multinomial(qj, 1, generator=gen))
                qs.append(qj)
            drafts.append(tok)
            if j < k - 1:
                logits = forward_at(self.draft_forward, [tok], self.dcache, len(ids) + j)[0]
                st.draft_forwards += 1
        return drafts, (torch.stack(qs) if qs else None)
