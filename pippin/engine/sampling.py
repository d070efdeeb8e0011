"""Sampling: turn a row of logits into the next token.

Greedy, temperature, top-k, top-p (nucleus), min-p, HF-style repetition penalty, and a seed for
reproducibility (each request owns a `torch.Generator`). The filters compose in the order HF and
llama.cpp apply them: penalty, temperature, top-k, top-p, min-p. Works on (B, V) fp32 logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pippin.errors import PippinError


@dataclass(kw_only=True)
class SamplingParams:
    max_new_tokens: int = 256
    """Upper bound on generated tokens."""
    temperature: float = 0.0
    """0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability sums to at least p; 1 disables."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0 disables."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the prompt or output (HF semantics); 1 disables."""
    seed: int | None = None
    """Seed for the sampler; the same seed and prompt give the same text."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the stop string itself is not returned."""
    ignore_eos: bool = False
    """Keep going past end-of-sequence tokens (benchmarks)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        checks = [
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, msg in checks:
            if not ok:
                raise PippinError(f"Invalid sampling parameters: {msg}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scale logits of tokens seen in `history` (B, L): divide positive ones, multiply negative ones."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature plus top-k / top-p / min-p; removed tokens get -inf. Returns new (B, V) logits."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (always keeps the first).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop_sorted[:, 0] = False  # the most likely token always stays (a tiny top_p must not drop everything)
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    generator: torch.Generator | None = None,
    history: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    logits = logits.float()
    if history is not None:
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, params).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
