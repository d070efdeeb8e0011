"""Online RL from a reward: MDLOO (AFM §3.4) and RLOO, with the whole response as one action.

For each prompt the current policy samples K responses. Each gets the KL-regularized reward
    R = r - beta * log(pi(y|x) / pi_ref(y|x))
and the leave-one-out advantage A_i = R_i - mean_{j != i} R_j ("how much better than a typical response").
- RLOO: REINFORCE with that baseline, loss = -mean(A * log pi_theta(y|x)), one gradient step per batch.
- MDLOO: a mirror-descent step (MDPO, Tomar et al. 2020) in place of PPO's clipping: several minibatch steps on
      -mean(rho * A) + alpha * mean(rho * log rho),   rho = pi_theta(y|x) / pi_k(y|x),
  whose second term estimates KL(pi_theta || pi_k) from the samples of pi_k, the policy that sampled them.
The report does not give K, alpha, beta or the KL direction; these are settings here (`RLConfig`). Log-probabilities
are sums over the response tokens; the prompt is context only.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

import torch
import torch.nn.functional as F

from pippin.engine.engine import Engine
from pippin.engine.sampling import SamplingParams
from pippin.errors import PippinError
from pippin.model.transformer import Transformer


class Algo(StrEnum):
    MDLOO = "mdloo"
    RLOO = "rloo"


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """(n, K) rewards -> advantages A_i = R_i - mean of the other K - 1 rewards of the same prompt."""
    K = rewards.shape[-1]
    if K < 2:
        raise PippinError(f"The leave-one-out advantage needs at least 2 samples per prompt, got {K}.")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (K - 1)


def sequence_logprobs(model: Transformer, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B,) sum of log pi(response token | everything before) for each prompt + response (right-padded batch)."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    T = max(map(len, seqs))
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T - 1)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        tokens[i, : len(s)] = torch.tensor(s)
        mask[i, len(p) - 1 : len(s) - 1] = 1.0  # logits at t predict token t + 1: the response tokens
    logp = F.log_softmax(model(tokens[:, :-1]).float(), dim=-1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def mdpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, alpha: float) -> torch.Tensor:
    """-mean(rho A) + alpha mean(rho log rho), rho = exp(logp - logp_old): the mirror-descent policy step."""
    log_rho = logp - logp_old
    rho = log_rho.exp()
    return -(rho * advantages).mean() + alpha * (rho * log_rho).mean()


def rloo_loss(logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    return -(advantages * logp).mean()


@dataclass(kw_only=True)
class RLConfig:
    algo: Algo = Algo.MDLOO
    iterations: int = 20
    prompts_per_iteration: int = 8
    samples: int = 4
    """K: responses per prompt."""
    beta: float = 0.05
    """Weight of the KL to the reference policy inside the reward."""
    alpha: float = 0.1
    """MDLOO: weight of the KL to the sampling policy in each mirror-descent step."""
    inner_steps: int = 4
    """MDLOO: gradient steps per iteration on the same samples (RLOO: 1)."""
    lr: float = 1e-5
    max_new_tokens: int = 64
    temperature: float = 1.0
    save_every: int = 5
    """Iterations between checkpoints (with an out_dir): a killed run resumes from the last one."""
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class RLStats:
    iteration: int
    mean_reward: float
    """Mean r over the iteration's samples (before the KL term)."""
    mean_kl: float
    """Mean log(pi / pi_ref) of the samples: how far the policy has moved."""


@dataclass(kw_only=True)
class RLResult:
    history: list[RLStats] = field(default_factory=list)
    resumed_from: int = 0


def train_rl(
    policy: Transformer,
    reference: Transformer,
    prompts: Sequence[Sequence[int]],
    reward: Callable[[Sequence[int], Sequence[int]], float],
    config: RLConfig,
    *,
    eos_ids: Sequence[int] = (),
    on_iteration: Callable[[RLStats], None] | None = None,
    out_dir: str | Path | None = None,
) -> RLResult:
    """Train `policy` in place; `reference` stays frozen. reward(prompt ids, response ids) -> r, e.g. a verifier or a
    reward model. Each iteration samples K responses for `prompts_per_iteration` prompts with the current policy.
    With `out_dir`, the policy and optimizer are checkpointed every `save_every` iterations and a killed run
    resumes from the last checkpoint (the same config and prompts only)."""
    from pippin.train.checkpointing import resume, save_state

    if len(prompts) == 0:
        raise PippinError("RL needs at least one prompt.")
    algo = Algo(config.algo)
    reference.eval().requires_grad_(False)
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=0.0)
    result = RLResult()
    run = {"config": config.to_dict(), "prompts": hashlib.sha256(json.dumps([list(p) for p in prompts]).encode()).hexdigest()[:16]}
    ckpt = Path(out_dir) / "checkpoint" if out_dir is not None else None
    if ckpt is not None and (meta := resume(ckpt, run=run, params=params, optimizer=opt)) is not None:
        result.history = [RLStats(**h) for h in meta["history"]]
        result.resumed_from = meta["step"]
    max_len = max(map(len, prompts)) + config.max_new_tokens
    for it in range(result.resumed_from, config.iterations):
        rng = random.Random(config.seed * 1_000_003 + it)  # each iteration's prompts from its own seed: a resume is exact
        batch = [prompts[rng.randrange(len(prompts))] for _ in range(config.prompts_per_iteration)]
        policy.eval()
        engine = Engine(policy, max_batch=len(batch), max_len=max_len, kernels=False)
        engine.eos_ids = list(eos_ids)
        responses: list[list[list[int]]] = []  # [prompt][sample]
        for k in range(config.samples):
            sampling = SamplingParams(
                max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=config.seed * 7919 + it * 131 + k
            )
            responses.append(engine.generate_ids(batch, sampling))
        flat_p = [p for p in batch for _ in range(config.samples)]
        flat_r = [responses[k][i] for i in range(len(batch)) for k in range(config.samples)]
        r = torch.tensor([reward(p, y) for p, y in zip(flat_p, flat_r)], dtype=torch.float32)
        with torch.no_grad():
            logp_old = sequence_logprobs(policy, flat_p, flat_r)
            logp_ref = sequence_logprobs(reference, flat_p, flat_r)
        kl = logp_old - logp_ref
        R = (r - config.beta * kl).view(len(batch), config.samples)
        adv = leave_one_out(R).flatten()
        policy.train()
        for _ in range(config.inner_steps if algo is Algo.MDLOO else 1):
            logp = sequence_logprobs(policy, flat_p, flat_r)
            loss = mdpo_loss(logp, logp_old, adv, config.alpha) if algo is Algo.MDLOO else rloo_loss(logp, adv)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
        stats = RLStats(iteration=it, mean_reward=float(r.mean()), mean_kl=float(kl.mean()))
        result.history.append(stats)
        if on_iteration is not None:
            on_iteration(stats)
        if ckpt is not None and (it + 1) % config.save_every == 0 and it + 1 < config.iterations:
            history = [asdict(h) for h in result.history]
            save_state(ckpt, step=it + 1, params=params, optimizer=opt, extra={"run": run, "history": history})
    policy.eval()
    return result
