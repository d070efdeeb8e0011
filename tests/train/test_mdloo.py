"""MDLOO and RLOO: the leave-one-out advantage, the sequence log-probabilities and the two losses against direct
computations, and a tiny policy that learns to please a verifier while the KL to its reference grows from zero."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pippin.errors import PippinError
from pippin.train.mdloo import Algo, RLConfig, leave_one_out, mdpo_loss, rloo_loss, sequence_logprobs, train_rl
from tests.conftest import tiny_model


def test_leave_one_out_subtracts_the_mean_of_the_other_samples():
    R = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    want = torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5], [0 - 1.5, 0 - 1.5, 3 - 0.0]])
    torch.testing.assert_close(leave_one_out(R), want)
    assert torch.allclose(leave_one_out(torch.full((2, 4), 5.0)), torch.zeros(2, 4))  # equal rewards: no signal
    with pytest.raises(PippinError, match="at least 2 samples"):
        leave_one_out(torch.ones(3, 1))


def test_sequence_logprobs_sum_the_response_tokens_only():
    model = tiny_model()
    prompts, responses = [[5, 6, 7], [9]], [[8, 10], [11, 12, 13]]
    with torch.no_grad():
        got = sequence_logprobs(model, prompts, responses)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids)[0], -1)
        want = sum(float(logp[len(p) - 1 + t, r[t]]) for t in range(len(r)))
        assert math.isclose(float(got[i]), want, rel_tol=1e-5)


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


@pytest.mark.parametrize("algo", [Algo.MDLOO, Algo.RLOO])
def test_a_tiny_policy_learns_what_the_verifier_rewards(algo):
    """Reward: the share of the response's tokens with an even id (about half at the start). The policy's mean reward
    rises well above where it began."""
    torch.manual_seed(0)
    policy = tiny_model(seed=3)
    reference = copy.deepcopy(policy)
    prompts = [[5, 6, 7], [20, 21], [100, 101, 102, 103]]
    reward = lambda p, y: sum(t % 2 == 0 for t in y) / max(len(y), 1)  # noqa: E731
    cfg = RLConfig(algo=algo, iterations=12, prompts_per_iteration=3, samples=4, lr=3e-3, max_new_tokens=8, beta=0.01, inner_steps=2)
    res = train_rl(policy, reference, prompts, reward, cfg)
    first = sum(s.mean_reward for s in res.history[:3]) / 3
    last = sum(s.mean_reward for s in res.history[-3:]) / 3
    assert last > first + 0.2, [round(s.mean_reward, 3) for s in res.history]
    assert abs(res.history[0].mean_kl) < 1e-4 and res.history[-1].mean_kl > 0.1  # starts at the reference, then moves


def test_a_killed_run_resumes_exactly(tmp_path, monkeypatch):
    import pippin.train.checkpointing as ck

    prompts = [[5, 6, 7], [20, 21]]
    reward = lambda p, y: sum(t % 2 == 0 for t in y) / max(len(y), 1)  # noqa: E731
    cfg = RLConfig(iterations=4, prompts_per_iteration=2, samples=2, lr=3e-3, max_new_tokens=6, inner_steps=2, save_every=2)
    real = ck.save_state

    def save_then_die(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    policy = tiny_model(seed=3)
    ref = copy.deepcopy(policy)
    monkeypatch.setattr(ck, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_rl(policy, ref, prompts, reward, cfg, out_dir=tmp_path / "run")
    monkeypatch.setattr(ck, "save_state", real)
    resumed = train_rl(tiny_model(seed=3), copy.deepcopy(ref), prompts, reward, cfg, out_dir=tmp_path / "run")
    full = train_rl(tiny_model(seed=3), copy.deepcopy(ref), prompts, reward, cfg, out_dir=tmp_path / "full")
    assert resumed.resumed_from == 2 and full.resumed_from == 0
    assert [h.mean_reward for h in resumed.history] == pytest.approx([h.mean_reward for h in full.history], abs=1e-6)
    with pytest.raises(PippinError, match="different run"):
        train_rl(tiny_model(seed=3), ref, prompts[:1], reward, cfg, out_dir=tmp_path / "run")


def test_the_rl_command_trains_a_policy_against_the_verifier(tmp_path):
    import json
    import subprocess
    import sys

    from pippin.api import load_any
    from tests.serve.conftest import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "tiny")
    kw = {"letter": "a", "let_frequency": 3, "let_relation": "at least"}
    rows = [{"key": i, "prompt": f"say hi {i}", "instruction_id_list": ["keywords:letter_frequency"], "kwargs": [kw]} for i in range(4)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [
        sys.executable,
        "-m",
        "pippin",
        "rl",
        "--model",
        str(folder),
        "--data",
        str(tmp_path / "items.jsonl"),
        "--out",
        str(tmp_path / "rl"),
    ]
    cmd += ["--iterations", "3", "--prompts-per-iteration", "2", "--samples", "2", "--max-new-tokens", "12", "--lr", "1e-3", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["history"]) == 3 and abs(out["history"][0]["mean_kl"]) < 1e-4
    assert all(0.0 <= h["mean_reward"] <= 1.0 for h in out["history"])
    trained = load_any(tmp_path / "rl" / "model")
    assert trained.meta["rl"]["algo"] == "mdloo" and trained.tokenizer is not None
    before = load_any(folder).model.state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in trained.model.state_dict().items())  # the policy moved
