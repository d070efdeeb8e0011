"""MDLOO and RLOO: the leave-one-out advantage, the sequence log-probabilities and the two losses against direct
computations; a tiny policy (a LoRA adapter, on a dense or a compressed base, or the full weights) that learns to
please a verifier while the KL to its reference grows from zero; a run that starts from an adapter and keeps the KL to
it; the sampler's view against the policy; resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from pippin.adapters.lora import LoraConfig, lora_modules
from pippin.errors import PippinError
from pippin.train.mdloo import Algo, RLConfig, _Sampler, leave_one_out, mdpo_loss, rloo_loss, sequence_logprobs, train_rl
from tests.conftest import tiny_model

EVEN = lambda p, y: sum(t % 2 == 0 for t in y) / max(len(y), 1)  # noqa: E731 - the toy verifier: share of even token ids
PROMPTS = [[5, 6, 7], [20, 21], [100, 101, 102, 103]]


def test_leave_one_out_subtracts_the_mean_of_the_other_samples():
    R = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    want = torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5], [0 - 1.5, 0 - 1.5, 3 - 0.0]])
    torch.testing.assert_close(leave_one_out(R), want)
    assert torch.allclose(leave_one_out(torch.full((2, 4), 5.0)), torch.zeros(2, 4))  # equal rewards: no signal
    with pytest.raises(PippinError, match="at least 2 samples"):
        leave_one_out(torch.ones(3, 1))


def test_sequence_logprobs_and_entropy_cover_the_response_tokens_only():
    model = tiny_model()
    prompts, responses = [[5, 6, 7], [9]], [[8, 10], [11, 12, 13]]
    with torch.no_grad():
        got, ent = sequence_logprobs(model, prompts, responses, entropy=True)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + r]))[0], -1)
        want = sum(float(logp[len(p) - 1 + t, r[t]]) for t in range(len(r)))
        assert math.isclose(float(got[i]), want, rel_tol=1e-5)
        rows = logp[len(p) - 1 : len(p) - 1 + len(r)]
        assert math.isclose(float(ent[i]), float(-(rows.exp() * rows).sum(-1).mean()), rel_tol=1e-5)


def test_the_losses_and_their_gradients():
    adv = torch.tensor([1.0, -1.0, 0.5])
    logp_old = torch.tensor([-3.0, -2.0, -4.0])
    logp = logp_old.clone().requires_grad_(True)
    mdpo_loss(logp, logp_old, adv, alpha=0.1).backward()
    # At the sampling policy rho = 1: the KL term's gradient (log rho + 1) * rho is alpha, the first term's is -A.
    torch.testing.assert_close(logp.grad, (-adv + 0.1) / 3)
    lp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    rloo_loss(lp, adv).backward()
    torch.testing.assert_close(lp.grad, -adv / 3)


def _compressed():
    from pippin.quant.compress import CompressConfig, compress_

    model = tiny_model(seed=3)
    compress_(model, list(range(3, 250)) * 4, CompressConfig(candidate_bits=(4,), bpw=16, seq_len=128, n_seqs=2))
    return model


@pytest.mark.parametrize(
    ("algo", "base", "lora"),
    [(Algo.MDLOO, "dense", True), (Algo.RLOO, "dense", True), (Algo.MDLOO, "dense", False), (Algo.MDLOO, "compressed", True)],
)
def test_a_tiny_policy_learns_what_the_verifier_rewards(algo, base, lora):
    """The share of even token ids (about half at the start) rises well above where it began; the KL to the reference
    starts at zero; a LoRA policy leaves its base's tensors untouched."""
    policy = tiny_model(seed=3) if base == "dense" else _compressed()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    cfg = RLConfig(
        algo=algo, iterations=12, prompts_per_iteration=3, samples=4, lr=1e-2 if lora else 3e-3, max_new_tokens=8, beta=0.01,
        inner_steps=2, lora=LoraConfig(rank=4) if lora else None, minibatch=5,
    )  # fmt: skip
    res = train_rl(policy, PROMPTS, EVEN, cfg)
    first = sum(s.mean_reward for s in res.history[:3]) / 3
    last = sum(s.mean_reward for s in res.history[-3:]) / 3
    assert last > first + 0.2, [round(s.mean_reward, 3) for s in res.history]
    assert abs(res.history[0].mean_kl) < 1e-4 and res.history[-1].mean_kl > 0.1  # starts at the reference, then moves
    assert [s.samples for s in res.history[:2]] == [12, 24] and all(0 < s.mean_length <= 8 and s.entropy > 0 for s in res.history)
    after = policy.state_dict()
    if lora:
        assert lora_modules(policy) and all(torch.equal(after[k], v) for k, v in before.items() if k in after)
        assert len([k for k in after if ".lora_" not in k]) == len(before)  # every base tensor is still there, unchanged
    else:
        assert any(not torch.equal(after[k], v) for k, v in before.items())


def test_the_sampler_shares_the_base_and_runs_the_trained_adapter():
    policy = tiny_model(seed=3)
    sampler = _Sampler(policy, LoraConfig(rank=4))
    from pippin.adapters.lora import apply_lora

    apply_lora(policy, LoraConfig(rank=4), trainable=True)
    with torch.no_grad():
        for m in lora_modules(policy).values():
            m.lora_B.normal_(0, 0.05)
            m.lora_A.copy_(m.lora_A.half().float())  # values fp16 holds exactly: the sampler's slot is fp16
            m.lora_B.copy_(m.lora_B.half().float())
    sampler.refresh()
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(sampler.model(x), policy(x), atol=1e-5, rtol=1e-5)
    assert sampler.model.embed_tokens.weight is policy.embed_tokens.weight  # shared, not copied
    assert sampler.model.layers[0].mlp.up_proj.base.weight is policy.layers[0].mlp.up_proj.base.weight
    # Greedy samples from the engine's kernels equal the policy's own argmax continuation, stop token kept.
    from pippin.engine.sampling import SamplingParams

    got = sampler.sample([[5, 6, 7]], SamplingParams(max_new_tokens=6, temperature=0.0), eos_ids=[])
    ids = [5, 6, 7]
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(policy(torch.tensor([ids]))[0, -1].argmax()))
    assert got == [ids[3:]]
    gen = ids[3:]
    k = next(k for k in range(1, 6) if gen[k] not in gen[:k])  # a stop token that first appears at step k
    assert sampler.sample([[5, 6, 7]], SamplingParams(max_new_tokens=6, temperature=0.0), eos_ids=[gen[k]]) == [gen[: k + 1]]


def _saved_adapter(tmp_path, base, lora):
    """A random adapter for `base`, saved (fp16) as a folder that records the base's fingerprint."""
    from pippin.adapters.lora import apply_lora, base_fingerprint, remove_lora_
    from pippin.adapters.peft_format import adapter_from_model, save_adapter

    fingerprint = base_fingerprint(base)
    torch.manual_seed(11)
    apply_lora(base, lora, trainable=True)
    with torch.no_grad():
        for m in lora_modules(base).values():
            m.lora_B.normal_(0, 0.2)
    adapter = adapter_from_model(base, lora, name="start", meta={"base_fingerprint": fingerprint})
    remove_lora_(base)
    return save_adapter(adapter, tmp_path / "start", base_model="tiny")


def test_a_run_from_an_adapter_starts_at_it_and_keeps_the_kl_to_it(tmp_path):
    """The policy starts as the adapter (lr 0 leaves it there), the KL of the first samples to the reference is zero,
    while the bare base is far from them: the reference is the base with the starting adapter, not the base."""
    from pippin.adapters.peft_format import load_adapter

    lora = LoraConfig(rank=4)
    path = _saved_adapter(tmp_path, tiny_model(seed=3), lora)
    start = load_adapter(path)
    seen: list[dict] = []
    policy = tiny_model(seed=3)
    cfg = RLConfig(iterations=2, prompts_per_iteration=3, samples=3, lr=0.0, max_new_tokens=6, lora=lora, init_from=str(path))
    res = train_rl(policy, PROMPTS, EVEN, cfg, on_samples=lambda it, rows: seen.extend(rows))
    assert all(abs(s.mean_kl) < 1e-4 for s in res.history), [s.mean_kl for s in res.history]
    for name, m in lora_modules(policy).items():
        A, B = start.weights[name]
        assert torch.equal(m.lora_A[0], A.float()) and torch.equal(m.lora_B[0], B.float())
    # The same samples under the bare base: far from the starting policy, so a KL to the base would not be zero.
    base = tiny_model(seed=3)
    p, y = [r["prompt"] for r in seen], [r["response"] for r in seen]
    with torch.no_grad():
        gap = sequence_logprobs(policy, p, y) - sequence_logprobs(base, p, y)
    assert float(gap.mean()) > 0.5, float(gap.mean())
    with pytest.raises(PippinError, match="merge it into the model"):
        RLConfig(lora=None, init_from=str(path))
    with pytest.raises(PippinError, match="not on this one"):  # an adapter of another base is refused before any work
        train_rl(tiny_model(seed=4), PROMPTS, EVEN, RLConfig(iterations=1, lora=lora, init_from=str(path)))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_without_the_engine_draws_what_the_engine_draws(temperature):
    """The uncached sampler (what a GPU runs) against the engine on the kernels, with the same per-row seeds."""
    from pippin.engine.sampling import SamplingParams
    from pippin.train.mdloo import _sample_uncached

    model = tiny_model(seed=3)
    prompts = [[5, 6, 7], [20, 21], [100, 101, 102, 103]]
    params = SamplingParams(max_new_tokens=10, temperature=temperature, seed=11)
    want = _Sampler(model, None).sample(prompts, params, eos_ids=[9, 10])
    assert _sample_uncached(model, prompts, params, eos_ids=[9, 10]) == want
    assert len({tuple(w) for w in want}) == 3


def test_validation_reward_and_refusals():
    cfg = RLConfig(iterations=4, prompts_per_iteration=2, samples=2, lr=1e-2, max_new_tokens=6, inner_steps=1, val_every=2, bf16=True)
    seen = []
    res = train_rl(tiny_model(seed=3), PROMPTS, lambda p, y: seen.append(y) or EVEN(p, y), cfg, val_prompts=PROMPTS[:2], eos_ids=[2])
    assert [s.val_reward is not None for s in res.history] == [False, True, False, True]
    assert res.start_val_reward is not None and 0.0 <= res.start_val_reward <= 1.0
    assert all(2 not in y for y in seen)  # the reward never sees the stop token
    with pytest.raises(PippinError, match="compressed"):
        train_rl(_compressed(), PROMPTS, EVEN, RLConfig(lora=None))
    with pytest.raises(PippinError, match="its own base"):
        train_rl(tiny_model(), PROMPTS, EVEN, RLConfig(), reference=tiny_model())
    with pytest.raises(PippinError, match="at least 2 samples"):
        RLConfig(samples=1)


def test_a_killed_run_resumes_exactly(tmp_path, monkeypatch):
    import pippin.train.checkpointing as ck

    prompts = PROMPTS[:2]
    cfg = RLConfig(iterations=4, prompts_per_iteration=2, samples=2, lr=3e-3, max_new_tokens=6, inner_steps=2, save_every=2)
    real = ck.save_state

    def save_then_die(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_rl(tiny_model(seed=3), prompts, EVEN, cfg, out_dir=tmp_path / "run")
    monkeypatch.setattr(ck, "save_state", real)
    resumed_policy, full_policy = tiny_model(seed=3), tiny_model(seed=3)
    resumed = train_rl(resumed_policy, prompts, EVEN, cfg, out_dir=tmp_path / "run")
    full = train_rl(full_policy, prompts, EVEN, cfg, out_dir=tmp_path / "full")
    assert resumed.resumed_from == 2 and full.resumed_from == 0
    assert [h.mean_reward for h in resumed.history] == pytest.approx([h.mean_reward for h in full.history], abs=1e-6)
    a, b = resumed_policy.state_dict(), full_policy.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(PippinError, match="different run"):
        train_rl(tiny_model(seed=3), prompts[:1], EVEN, cfg, out_dir=tmp_path / "run")
    with pytest.raises(PippinError, match="different run"):  # another base under the same run folder
        train_rl(tiny_model(seed=4), prompts, EVEN, cfg, out_dir=tmp_path / "run")
    with pytest.raises(PippinError, match="different run"):  # another reward
        train_rl(tiny_model(seed=3), prompts, EVEN, cfg, out_dir=tmp_path / "run", reward_spec="odd")


def _rl(tmp_path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "pippin", "rl", *extra, "--iterations", "3", "--prompts-per-iteration", "2", "--samples", "2"]
    cmd += ["--max-new-tokens", "12", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_rl_command_trains_an_adapter_on_mixed_verifiers_and_full_weights(tmp_path):
    from pippin.adapters.lora import base_fingerprint
    from pippin.adapters.peft_format import load_adapter
    from pippin.api import load_any
    from tests.serve.conftest import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "tiny")
    kw = {"letter": "a", "let_frequency": 3, "let_relation": "at least"}
    rows = [{"key": i, "prompt": f"say hi {i}", "instruction_id_list": ["keywords:letter_frequency"], "kwargs": [kw]} for i in range(4)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from pippin.eval.suite import Split
    from pippin.eval.tasks.safety import split_of

    safe = [t for t in (f"How do I kill a python process number {i}?" for i in range(40)) if split_of(t) is Split.TRAIN][:2]
    srows = [{"id": f"s{i}", "prompt": t, "expect": "comply", "source": "xstest"} for i, t in enumerate(safe)]
    (tmp_path / "safety.jsonl").write_text("".join(json.dumps(r) + "\n" for r in srows))
    data = ["--model", str(folder), "--data", str(tmp_path / "items.jsonl"), "--data", str(tmp_path / "safety.jsonl")]
    val = ["--val-data", str(tmp_path / "items.jsonl"), "--val-every", "3"]
    out = _rl(tmp_path, *data, *val, "--out", str(tmp_path / "rl"), "--lr", "1e-2")
    assert len(out["history"]) == 3 and abs(out["history"][0]["mean_kl"]) < 1e-4
    assert all(0.0 <= h["mean_reward"] <= 1.0 for h in out["history"]) and out["history"][-1]["val_reward"] is not None
    samples = [json.loads(line) for line in (tmp_path / "rl" / "samples" / "iteration-0003.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(isinstance(s["response"], str) and s["prompt"] for s in samples)
    assert sum(s["advantage"] for s in samples) == pytest.approx(0.0, abs=1e-5)  # leave-one-out: zero mean per prompt
    adapter = load_adapter(tmp_path / "rl" / "adapter")
    base = load_any(folder).model
    assert adapter.meta["base_fingerprint"] == base_fingerprint(base) and adapter.meta["rl"]["algo"] == "mdloo"
    assert adapter.meta["rl"]["guard"] == {"min_words": 5, "min_distinct": 0.35}  # on by default, recorded
    assert any(bool(B.abs().sum()) for _, B in adapter.weights.values())  # the adapter moved off its zero start
    again = _rl(tmp_path, *data, "--out", str(tmp_path / "rl2"), "--init-from", str(tmp_path / "rl" / "adapter"), "--lr", "1e-2")
    assert abs(again["history"][0]["mean_kl"]) < 1e-4  # RL from the first run's adapter: the KL is to that adapter
    assert load_adapter(tmp_path / "rl2" / "adapter").meta["rl"]["init_from"] == str(tmp_path / "rl" / "adapter")
    out = _rl(tmp_path, *data[:4], "--out", str(tmp_path / "full"), "--full", "--lr", "1e-3", "--no-guard")
    trained = load_any(tmp_path / "full" / "model")
    assert trained.meta["rl"]["lora"] is None and trained.meta["rl"]["guard"] is None and trained.tokenizer is not None
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in trained.model.state_dict().items())  # the policy moved
