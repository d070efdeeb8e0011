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
