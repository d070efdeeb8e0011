"""Forced-choice decoding: continue a prompt through fixed text and closed sets of options.

A small model asked to "explain, then end with `[[rating]]`" rarely ends in the asked format, so its answer
cannot be parsed. Constraining the answer instead of parsing it always gives a verdict, as multiple-choice
scoring in lm-evaluation-harness does. An answer form is a list of segments: forced tokens (written as given)
and choices (one token sequence per option). At a choice every option's full log-likelihood is computed (all
options in one batched forward over a copy of the cache), the most likely option is written, and its probability
among the options is returned with the others, so a caller can also take an expected score (as G-Eval does)
instead of the argmax. The options of a choice must be prefix-free as token sequences (no option's tokens begin
another's), so that each option is a complete answer: end them with a delimiter ("1]]" and "10]]", not "1"
and "10").

It runs one row at a time through the engine's KV cache: one prefill of the prompt, one of each forced
segment and chosen option, and one small batched forward per choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pippin.engine.engine import Engine
from pippin.engine.generate import prefill
from pippin.engine.kv_cache import KVCache
from pippin.errors import PippinError
from pippin.model.transformer import Transformer

Segment = list[int] | list[list[int]]
"""Forced token ids (list of int), or a choice: one token-id list per option (list of lists)."""


def is_choice(segment: Segment) -> bool:
    return bool(segment) and isinstance(segment[0], list)


def check_prefix_free(options: Sequence[Sequence[int]], names: Sequence[str] | None = None) -> None:
    """Raise PippinError when an option is empty or its tokens begin another option's tokens."""
    label = list(names) if names is not None else [str(list(o)) for o in options]
    if len(options) < 2:
        raise PippinError(f"A choice needs at least two options, got {label}.")
    for i, a in enumerate(options):
        if not a:
            raise PippinError(f"Option {label[i]!r} is empty after tokenization.")
        for j, b in enumerate(options):
            if i != j and len(a) <= len(b) and list(b[: len(a)]) == list(a):
                raise PippinError(
                    f"Option {label[i]!r} is a token prefix of {label[j]!r}; end the options with a delimiter "
                    "(e.g. '1]]' and '10]]') so each one is complete on its own."
                )


def form_length(segments: Sequence[Segment]) -> int:
    """The most tokens a form can add (forced tokens plus the longest option of each choice)."""
    return sum(max(map(len, s)) if is_choice(s) else len(s) for s in segments)


@dataclass(frozen=True)
class Chosen:
    index: int
    """The most likely option."""
    probs: list[float]
    """Each option's probability, normalised over the options."""


@torch.inference_mode()
def option_logprobs(model: Transformer, cache: KVCache, logits: torch.Tensor, options: Sequence[Sequence[int]]) -> torch.Tensor:
    """Log-likelihood (n,) of each option continuing cache row 0, whose next-token logits (V,) are `logits`."""
    n, m = len(options), max(map(len, options))
    start = int(cache.lengths[0])
    branch = cache.branch(0, n, m)
    tokens = torch.zeros(n, m, dtype=torch.long)
    for i, o in enumerate(options):
        tokens[i, : len(o)] = torch.tensor(list(o))
    positions = (torch.arange(m) + start).expand(n, m)
    branch.begin(positions)
    later = torch.log_softmax(model(tokens, positions=positions, cache=branch, mask=branch.attention_mask(positions)).float(), dim=-1)
    first = torch.log_softmax(logits.float(), dim=-1)
    out = torch.empty(n)
    for i, o in enumerate(options):
        out[i] = first[o[0]] + sum(later[i, t - 1, o[t]] for t in range(1, len(o)))
    return out


@torch.inference_mode()
def choose(engine: Engine, prompt: Sequence[int], segments: Sequence[Segment], *, adapter: str | None = None) -> list[Chosen]:
    """Continue `prompt` through `segments`, writing the most likely option at each choice; one Chosen per choice."""
    for s in segments:
        if is_choice(s):
            check_prefix_free(s)
    engine.check_prompt(len(prompt), form_length(segments))
    engine.use_adapters([adapter], 1)
    model = engine.model
    cache = engine.cache_for(1)
    logits = prefill(model, torch.tensor([list(prompt)]), torch.tensor([len(prompt)]), cache)[0]
    out: list[Chosen] = []
    for seg in segments:
        if not seg:
            continue
        if is_choice(seg):
            engine.use_adapters([adapter] * len(seg), len(seg))  # the options run as rows of one batch
            logp = option_logprobs(model, cache, logits, seg)
            engine.use_adapters([adapter], 1)
            pick = int(torch.argmax(logp))
            out.append(Chosen(pick, torch.softmax(logp, dim=0).tolist()))
            seg = seg[pick]
        logits = prefill(model, torch.tensor([list(seg)]), torch.tensor([len(seg)]), cache, start=int(cache.lengths[0]))[0]
    return out
