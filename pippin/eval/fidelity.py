"""Fidelity to a reference model (full precision): what compression or an adapter costs in the model's answers.

Three measures, llama.cpp's `--kl-divergence` report plus the checks a user makes by hand:
- perplexity on held-out text of three domains: news (XSum articles), dialogue (DialogSum test rows 0-99, which
  no adapter trains on) and technical prose (the Python language reference that ships with CPython,
  `pydoc_data.topics`); non-overlapping windows, every token after each window's first scored;
- on chat transcripts (MT-Bench first turns answered greedily by the reference), the mean KL(reference || model)
  of the next-token distributions over the reply tokens, and how often both pick the same top-1 token;
- a chat smoke set of short instructions with checkable answers (`data/chat_smoke.jsonl`): accuracy and the rate
  of empty replies.
`GateConfig` turns these and IFEval into the pass/fail check of what `make run` serves. Models are called as
`forward(ids (1, T)) -> logits (1, T, V)`; nothing here knows about kernels, adapters or quantization.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pippin.errors import PippinError

Forward = Callable[[torch.Tensor], torch.Tensor]
DOMAINS = ("news", "dialogue", "technical")
SMOKE_PATH = Path(__file__).with_name("data") / "chat_smoke.jsonl"


@dataclass(kw_only=True)
class FidelityConfig:
    n_tokens: int = 8192
    """Tokens scored per domain (in windows of `window`)."""
    window: int = 512
    n_chat: int = 80
    """Chat transcripts for KL and top-1 agreement (MT-Bench has 80 first turns)."""
    chat_tokens: int = 128
    """Length of the reference's greedy reply in each transcript."""
    smoke_tokens: int = 64
    """Greedy reply length for the smoke set."""


@dataclass(kw_only=True)
class GateConfig:
    """What a compressed model must meet to be served by default (issue: quality at the bit budget)."""

    min_top1: float = 90.0
    """Top-1 agreement with the reference on chat transcripts, percent."""
    max_ppl_increase: float = 0.10
    """Perplexity at most this much above the reference's, on every domain."""
    max_extra_empty: float = 0.0
    """Empty smoke replies: at most this many percentage points more than the reference."""
    max_ifeval_drop: float = 1.5
    """IFEval prompt-level strict accuracy: at most this many points below the reference."""

    def failures(self, m: dict[str, Any], ref: dict[str, Any]) -> list[str]:
        """Why the metrics `m` fail the gate against the reference's `ref` (empty: it passes). A measure that
        is missing is a failure, never a pass."""
        out = []
        top1 = m.get("top-1 %")
        if top1 is None or top1 < self.min_top1:
            out.append(f"top-1 agreement {_num(top1)} % < {self.min_top1:g} %")
        for d in DOMAINS:
            p, r = m.get(f"ppl {d}"), ref.get(f"ppl {d}")
            if p is None or r is None or p > r * (1 + self.max_ppl_increase):
                out.append(f"{d} perplexity {_num(p)} > {_num(r)} + {self.max_ppl_increase:.0%}")
        e, re_ = m.get("empty %"), ref.get("empty %")
        if e is None or re_ is None or e > re_ + self.max_extra_empty:
            out.append(f"empty replies {_num(e)} % > the reference's {_num(re_)} %")
        if "ifeval prompt strict %" in ref:
            i, ri = m.get("ifeval prompt strict %"), ref["ifeval prompt strict %"]
            if i is None or ri is None or i < ri - self.max_ifeval_drop:
                out.append(f"IFEval prompt strict {_num(i)} < {_num(ri)} - {self.max_ifeval_drop:g}")
        return out


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


# --- held-out text --------------------------------------------------------------------------------------------


def domain_text(domain: str, data_dir: Path) -> str:
    """The held-out text of one domain (see the module docstring)."""
    if domain == "technical":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    path = data_dir / ("xsum/test.jsonl" if domain == "news" else "dialogsum/dialogsum.test.jsonl")
    if not path.is_file():
        raise PippinError(f"{path} does not exist; pass --data with the folder that holds the evaluation data sets.")
    key, n = ("document", 400) if domain == "news" else ("dialogue", 100)
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[:n]:
        try:
            rows.append(json.loads(line)[key])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PippinError(f"{path}: a row without a {key!r} string ({e}); fix or replace the file.") from None
    return "\n\n".join(rows)


def token_windows(ids: Sequence[int], *, window: int, n_tokens: int) -> list[list[int]]:
    """Non-overlapping windows of `window` tokens, at most `n_tokens` tokens in all (the last window may be short)."""
    ids = list(ids[:n_tokens])
    return [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]


@torch.no_grad()
def perplexity(forward: Forward, windows: Sequence[Sequence[int]]) -> float:
    nll, n = 0.0, 0
    for w in windows:
        x = torch.tensor([list(w)])
        logits = forward(x)[0, :-1].float()
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        n += len(w) - 1
    return math.exp(nll / n)


# --- KL and top-1 on chat transcripts -------------------------------------------------------------------------


@dataclass(kw_only=True)
class Transcript:
    ids: list[int]
    """Prompt (chat template) + the reference's reply + end of turn."""
    start: int
    """Index of the first reply token: positions start-1 .. len-2 predict the reply."""


@dataclass(kw_only=True)
class Agreement:
    kl: float
    """Mean KL(reference || model) per reply token, nats."""
    top1: float
    """Percent of reply positions where both models' most likely next token is the same."""
    kl_p99: float
    """99th percentile of the per-token KL (llama.cpp reports the tail too)."""
    n_tokens: int


@torch.no_grad()
def agreement(ref: Forward, models: Sequence[Forward], transcripts: Sequence[Transcript]) -> list[Agreement]:
    """KL and top-1 agreement of each model with `ref`; the reference runs once per transcript for all models."""
    kls: list[list[torch.Tensor]] = [[] for _ in models]
    same = [0] * len(models)
    n = 0
    for t in transcripts:
        x = torch.tensor([t.ids])
        sl = slice(t.start - 1, len(t.ids) - 1)
        lr = F.log_softmax(ref(x)[0, sl].float(), -1)
        n += lr.shape[0]
        for i, f in enumerate(models):
            lp = F.log_softmax(f(x)[0, sl].float(), -1)
            kls[i].append((lr.exp() * (lr - lp)).sum(-1).clamp_min(0))
            same[i] += int((lp.argmax(-1) == lr.argmax(-1)).sum())
    out = []
    for i in range(len(models)):
        k = torch.cat(kls[i]) if kls[i] else torch.zeros(1)
        out.append(
            Agreement(kl=float(k.mean()), top1=100.0 * same[i] / max(n, 1), kl_p99=float(torch.quantile(k.double(), 0.99)), n_tokens=n)
        )
    return out


def transcript(tokenizer: Any, messages: list[dict[str, str]], reply: str) -> Transcript | None:
    """The token ids of a chat turn and its reply (None for an empty reply: nothing to score)."""
    if not reply.strip():
        return None
    prompt = tokenizer.encode_chat(messages)
    end = tokenizer.eos_ids[:1]
    return Transcript(ids=prompt + tokenizer.encode(reply, add_bos=False) + end, start=len(prompt))


# --- the chat smoke set ---------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SmokeItem:
    """A short instruction and how to check its reply (every condition given must hold)."""

    id: str
    prompt: str
    any: list[str] = field(default_factory=list)
    """At least one of these regexes matches."""
    all: list[str] = field(default_factory=list)
    """Every one of these regexes matches."""
    none: list[str] = field(default_factory=list)
    """None of these regexes matches."""
    case: bool = False
    """Regexes are case-sensitive."""
    at_least: int = 0
    of: list[str] = field(default_factory=list)
    """At least `at_least` different words that start with one of these."""
    primes_above: int | None = None
    count: int = 0
    """At least `count` different primes above `primes_above`, and no other number (list markers aside)."""
    evens: int = 0
    """At least this many different even numbers, and no odd one (list markers aside)."""

    def check(self, reply: str) -> bool:
        flags = 0 if self.case else re.IGNORECASE
        text = reply.strip()
        if not text:
            return False
        if self.any and not any(re.search(p, text, flags) for p in self.any):
            return False
        if any(not re.search(p, text, flags) for p in self.all):
            return False
        if any(re.search(p, text, flags) for p in self.none):
            return False
        words = set(re.findall(r"[a-z]+", text.lower()))
        if self.at_least and len({o for o in self.of if any(w.startswith(o) for w in words)}) < self.at_least:
            return False
        # Numbers named in the reply, without list markers ("1. ", "2) " at a line's start): counting to 20 is no answer.
        numbers = {int(s) for s in re.findall(r"\b\d{1,6}\b", re.sub(r"(?m)^\s*\d+[.)]\s", "", text))}
        if self.primes_above is not None:
            good = {v for v in numbers if v > self.primes_above and _is_prime(v)}
            if len(good) < self.count or numbers - good:
                return False
        return not (self.evens and (len({v for v in numbers if v % 2 == 0}) < self.evens or any(v % 2 for v in numbers)))


def _is_prime(v: int) -> bool:
    return v > 1 and all(v % d for d in range(2, int(v**0.5) + 1))


def load_smoke(path: Path = SMOKE_PATH) -> list[SmokeItem]:
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                items.append(SmokeItem(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise PippinError(f"{path}:{n}: not a smoke item ({e}).") from None
    return items


def summary(model_dir: Path) -> str | None:
    """One line on a model folder's stored fidelity report (`OUT/fidelity/results.json`, written by `pippin compress`):
    its top-1 agreement, worst perplexity ratio and empty replies, and whether they meet the gate. None if absent."""
    from pippin.eval.report import load_result

    path = Path(model_dir) / "fidelity" / "results.json"
    if not path.is_file():
        return None
    try:
        result = load_result(path)
        ref, this = list(result.metrics.values())[:2]
    except (PippinError, ValueError, KeyError) as e:
        return f"unreadable fidelity report {path} ({e})"
    reasons = GateConfig().failures(this, ref)
    head = f"top-1 {_num(this.get('top-1 %'))} %, worst perplexity {_num(this.get('worst ppl ×'))}×, empty {_num(this.get('empty %'))} %"
    return f"{head}: " + ("meets the quality gate's fidelity checks" if not reasons else "FAILS the quality gate: " + "; ".join(reasons))
