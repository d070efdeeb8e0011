"""Speculative decoding: greedy equals plain greedy; accept/reject keeps the target's distribution."""

from __future__ import annotations

import pytest
import torch

from pippin.engine.engine import Engine
from pippin.engine.sampling import SamplingParams
from pippin.engine.speculative import SpeculativeDecoder, probs, verify_greedy, verify_sampled
from pippin.errors import PippinError
from tests.conftest import tiny_model


def near_copy(model, noise: float, seed: int = 5):
    """A draft that mostly agrees with `model`: its weights plus noise (stands in for a low-bit copy)."""
    draft = tiny_model(0)
    draft.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
    return draft


@pytest.mark.parametrize(("k", "noise"), [(1, 0.0), (3, 0.3), (5, 1.0)])
def test_greedy_output_equals_plain_greedy(k, noise):
    target = tiny_model(0)
    draft = near_copy(target, noise) if noise else tiny_model(1)  # noise 0 -> an unrelated draft
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    engine = Engine(target, max_len=128)
    spec = SpeculativeDecoder(target, draft, k=k, max_len=128)
    for prompt in ([100, 3, 77], list(range(30, 52)), [9]):
        assert list(spec.generate(prompt, params)) == engine.generate_ids([prompt], params)[0]
    st = spec.stats
    assert st.generated == 72 and 0 <= st.accepted <= st.proposed
    assert st.target_forwards < st.generated or st.acceptance_rate == 0


def test_identical_draft_accepts_everything_and_stops_at_eos_and_max_tokens():
    target = tiny_model(0)
    spec = SpeculativeDecoder(target, near_copy(target, 0.0), k=4, max_len=128)
    out = list(spec.generate([100, 3, 77], SamplingParams(max_new_tokens=21, ignore_eos=True)))
    assert len(out) == 21 and spec.stats.acceptance_rate == 1.0
    assert spec.stats.target_forwards == 1 + 4  # the prefill, then 5 tokens per verify (4 drafts + 1 bonus)
    spec.eos_ids = {out[6]}
    stopped = list(spec.generate([100, 3, 77], SamplingParams(max_new_tokens=21)))
    assert stopped == out[: out.index(out[6])]


def test_accept_reject_keeps_the_target_distribution():
    """Tokens from verify_sampled follow p exactly, whatever q proposes (two positions, tiny vocab)."""
    g = torch.Generator().manual_seed(0)
    V, trials = 5, 8000
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.1, 0.3, 0.4], [0.2] * 5])
    q = torch.tensor([[0.05, 0.05, 0.1, 0.4, 0.4], [0.3, 0.3, 0.2, 0.1, 0.1]])
    first = torch.zeros(V)
    second = torch.zeros(V)  # the token after an accepted first draft, given that draft == 0
    n_after0 = 0
    for _ in range(trials):
        drafts = torch.stack([torch.multinomial(q[j], 1, generator=g)[0] for j in range(2)])
        n, nxt = verify_sampled(p, q, drafts, generator=g)
        tok0 = int(drafts[0]) if n >= 1 else nxt
        first[tok0] += 1
        if n >= 1 and tok0 == 0:
            n_after0 += 1
            second[int(drafts[1]) if n == 2 else nxt] += 1
    # p[1] does not depend on the first token here, so the second token must follow p[1] too.
    for counts, total, want in ((first, trials, p[0]), (second, n_after0, p[1])):
        freq = counts / total
        sd = (want * (1 - want) / total).sqrt()
        assert (freq - want).abs().max() < 5 * sd.max(), (freq, want)


def test_verify_greedy_takes_the_longest_agreeing_prefix():
    logits = torch.full((4, 6), -1.0)
    for j, t in enumerate([2, 4, 1, 5]):
        logits[j, t] = 1.0
    assert verify_greedy(logits, torch.tensor([2, 4, 3])) == (2, 1)
    assert verify_greedy(logits, torch.tensor([2, 4, 1])) == (3, 5)
    assert verify_greedy(logits, torch.tensor([0, 4, 1])) == (0, 2)


def test_sampled_generation_keeps_the_target_distribution_of_the_second_token():
    """End to end on a tiny vocab: the second token (the first one the draft proposes) has the target's marginal
    sum_x1 p(x1) p(x2 | x1), although the draft is an unrelated model."""
    target, draft = tiny_model(0, vocab_size=8), tiny_model(3, vocab_size=8)
    with torch.no_grad():  # a spread-out target; the draft (unscaled) almost always repeats the last token
        target.embed_tokens.weight.mul_(0.3)
    params = SamplingParams(max_new_tokens=3, temperature=1.0, ignore_eos=True)
    prompt = [1, 2, 3]
    with torch.no_grad():
        p1 = probs(target(torch.tensor([prompt]))[0, -1], params)
        p2 = sum(p1[x] * probs(target(torch.tensor([[*prompt, x]]))[0, -1], params) for x in range(8))
    spec = SpeculativeDecoder(target, draft, k=2, max_len=32)
    n = 800
    counts = torch.zeros(8)
    for i in range(n):
        out = list(spec.generate(prompt, SamplingParams(max_new_tokens=3, temperature=1.0, seed=i, ignore_eos=True)))
        assert len(out) == 3
        counts[out[1]] += 1
    freq = counts / n
    sd = (p2 * (1 - p2) / n).sqrt()
    assert (freq - p2).abs().max() < 5 * sd.max(), (freq, p2)
    assert 0.05 < spec.stats.acceptance_rate < 0.95  # the draft was really used, and really rejected


def test_refuses_mismatched_vocab_and_repetition_penalty():
    with pytest.raises(PippinError, match="vocabulary"):
        SpeculativeDecoder(tiny_model(0), tiny_model(0, vocab_size=128))
    spec = SpeculativeDecoder(tiny_model(0), tiny_model(1))
    with pytest.raises(PippinError, match="repetition"):
        list(spec.generate([1, 2], SamplingParams(repetition_penalty=1.2)))
