"""Online RL from a reward: MDLOO (AFM §3.4) and RLOO, with the whole response as one action.

For each prompt the current policy samples K responses. Each gets the KL-regularized reward
    R = r - beta * log(pi(y|x) / pi_ref(y|x))
and the leave-one-out advantage A_i = R_i - mean_{j != i} R_j ("how much better than a typical response").
- RLOO: REINFORCE with that baseline, loss = -mean(A * log pi_theta(y|x)), one gradient step per batch.
- MDLOO: a mirror-descent step (MDPO, Tomar et al. 2020) in place of PPO's clipping: several minibatch steps on
      -mean(rho * A) + alpha * mean(rho * log rho),   rho = pi_theta(y|x) / pi_k(y|x),
  whose second term estimates KL(pi_theta || pi_k) from the samples of pi_k, the policy that sampled them.
The report does not give K, alpha, beta or the KL direction; these are settings here (`RLConfig`). Log-probabilities
are sums over the response tokens, its end-of-turn token included (so stopping is learned too); the prompt is context.

The policy is a LoRA adapter by default (on a full-precision or a compressed base: the on-device setting), or the full
weights of a full-precision model. Samples come from the batched engine on the CPU kernels: for LoRA, from a second
view of the model that shares every base tensor and holds the adapter as an fp16 serving slot, refreshed each
iteration; the reference policy is the base itself (the adapter switched off). A run may start from a trained
adapter (`init_from`, e.g. iTeC's or SFT's), as AFM's RL starts from the SFT model: the policy's adapter then starts
as a copy of it and the reference is the base with it, frozen, in a view that shares the base's tensors.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pippin.adapters.lora import LoraConfig, apply_lora, base_fingerprint, lora_modules, routing_of
from pippin.adapters.peft_format import WEIGHTS_FILE
from pippin.engine.engine import Engine
from pippin.engine.sampling import SamplingParams, sample
from pippin.errors import PippinError
from pippin.model.transformer import Transformer
from pippin.train.adapter import load_init, set_act8

SAMPLE_ROWS = 16
"""Rows per engine batch: up to this many the decode steps run on the CPU kernels."""


class Algo(StrEnum):
    MDLOO = "mdloo"
    RLOO = "rloo"


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """(n, K) rewards -> advantages A_i = R_i - mean of the other K - 1 rewards of the same prompt."""
    K = rewards.shape[-1]
    if K < 2:
        raise PippinError(f"The leave-one-out advantage needs at least 2 samples per prompt, got {K}.")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (K - 1)


def sequence_logprobs(
    model: Transformer, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B,) sum of log pi(response token | everything before) for each prompt + response (right-padded batch); with
    `entropy`, also (B,) the mean entropy of pi over each response's positions. The head runs on response positions
    only (it is the largest matmul)."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    T = max(map(len, seqs))
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T - 1, dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        tokens[i, : len(s)] = torch.tensor(s)
        mask[i, len(p) - 1 : len(s) - 1] = True  # logits at t predict token t + 1: the response tokens
    device = next(model.parameters()).device
    tokens, mask = tokens.to(device), mask.to(device)
    h = model.features(tokens[:, :-1])[mask]
    logp_all = F.log_softmax(model.head(h).float(), dim=-1)
    per_token = logp_all.gather(-1, tokens[:, 1:][mask].unsqueeze(-1)).squeeze(-1)
    row = torch.arange(len(seqs), device=device).unsqueeze(1).expand_as(mask)[mask]
    logp = torch.zeros(len(seqs), device=device).index_add(0, row, per_token)
    if not entropy:
        return logp
    with torch.no_grad():
        ent = -(logp_all.exp() * logp_all).sum(-1)
        n = mask.sum(-1).clamp(min=1)
        return logp, torch.zeros(len(seqs), device=device).index_add(0, row, ent) / n


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
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    """The policy is this LoRA adapter on the frozen base; None trains the full weights (full-precision models only)."""
    init_from: str | None = None
    """An adapter folder trained on this base (same rank and alpha) that the policy starts from and the KL is taken
    to (the reference is the base with it); None starts from the base."""
    minibatch: int = 8
    """Sequences per forward/backward pass (memory only: each step's gradient is over all the iteration's samples)."""
    bf16: bool = False
    """Run the policy's forward and backward passes under bf16 autocast (sampling is unchanged)."""
    val_every: int = 0
    """Iterations between greedy passes over the validation prompts (0: none)."""
    save_every: int = 5
    """Iterations between checkpoints (with an out_dir): a killed run resumes from the last one."""
    seed: int = 0

    def __post_init__(self) -> None:
        self.algo = Algo(self.algo)
        if isinstance(self.lora, dict):
            self.lora = LoraConfig(**self.lora)
        if self.samples < 2:
            raise PippinError(f"RL needs at least 2 samples per prompt for the leave-one-out baseline, got {self.samples}.")
        if self.init_from is not None and self.lora is None:
            raise PippinError(
                "Starting from an adapter trains a LoRA policy; for full weights, merge it into the model first (`pippin adapter merge`)."
            )
        if min(self.iterations, self.prompts_per_iteration, self.minibatch, self.inner_steps, self.save_every) < 1:
            raise PippinError("iterations, prompts_per_iteration, minibatch, inner_steps and save_every must be >= 1.")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.lora is not None:
            d["lora"]["target_modules"] = list(self.lora.target_modules)
        return d


@dataclass(kw_only=True)
class RLStats:
    iteration: int
    samples: int
    """Responses sampled so far (the x axis of a learning curve)."""
    mean_reward: float
    """Mean r over the iteration's samples (before the KL term)."""
    mean_kl: float
    """Mean log(pi / pi_ref) of the samples: how far the policy has moved."""
    mean_length: float
    """Mean response length in tokens."""
    entropy: float
    """Mean per-token entropy of the sampling policy over the responses (nats)."""
    seconds: float
    """Wall time of the iteration (sampling, scoring and the policy steps)."""
    sample_seconds: float = 0.0
    """The part of `seconds` spent sampling."""
    val_reward: float | None = None
    """Mean reward of greedy replies to the validation prompts, after this iteration's step."""


@dataclass(kw_only=True)
class RLResult:
    history: list[RLStats] = field(default_factory=list)
    resumed_from: int = 0
    start_val_reward: float | None = None
    """The greedy validation reward of the starting policy (with validation prompts and val_every)."""


class _Sampler:
    """The policy as it samples. On the CPU, the batched engine on the kernels: for LoRA, through a second view of the
    model sharing every base tensor, whose slot 1 holds the adapter in fp16 (refreshed from the trainable weights
    before each iteration's samples). Elsewhere (a GPU), the policy itself, recomputing each row's prefix per token
    (no KV cache: the engine is CPU-only; for short replies of a small model this costs little on a GPU)."""

    def __init__(self, model: Transformer, lora: LoraConfig | None) -> None:
        self.policy, self.model = model, model
        self.engine = next(model.parameters()).device.type == "cpu"
        if lora is not None and self.engine:
            shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
            self.model = copy.deepcopy(model, shared)
            apply_lora(self.model, lora, n_slots=2)
            routing_of(self.model).set(1)

    @torch.no_grad()
    def refresh(self) -> None:
        if self.model is self.policy:
            return
        trained = lora_modules(self.policy)
        for name, m in lora_modules(self.model).items():
            t = trained[name]
            m.load_slot(1, t.lora_A[0].half(), t.lora_B[0].half(), float(t.lora_scale[0]))

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], params: SamplingParams, eos_ids: Sequence[int]) -> list[list[int]]:
        """Each prompt's generated ids, its stop token kept (the policy's log-probability covers stopping)."""
        if not self.engine:
            return _sample_uncached(self.model, prompts, params, eos_ids)
        engine = Engine(self.model, max_batch=min(len(prompts), SAMPLE_ROWS), max_len=max(map(len, prompts)) + params.max_new_tokens)
        engine.eos_ids = list(eos_ids)
        out: list[list[int]] = []
        for i in range(0, len(prompts), SAMPLE_ROWS):
            chunk = prompts[i : i + SAMPLE_ROWS]
            rows: list[list[int]] = [[] for _ in chunk]
            for st in engine.generate(chunk, params):
                for j in st.active.nonzero().flatten().tolist():
                    rows[j].append(int(st.tokens[j]))
            out += rows
        return out


def _start_view(model: Transformer, lora: LoraConfig, path: str, fingerprint: str) -> Transformer:
    """The reference policy of a run that starts from an adapter: a view of `model` sharing every base tensor, with
    the adapter frozen in its one serving slot (fp16, as saved)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    view = copy.deepcopy(model, shared)
    apply_lora(view, lora, n_slots=2)
    load_init(view, path, lora, fingerprint=fingerprint, slot=1)
    routing_of(view).set(1)
    return view.to(next(model.parameters()).device).eval().requires_grad_(False)


def _sample_uncached(model: Transformer, prompts: list[list[int]], params: SamplingParams, eos_ids: Sequence[int]) -> list[list[int]]:
    """Sampling without a KV cache, on the model's device, with the engine's per-row seeds (each row's generator
    seeded with params.seed, sampling on the CPU), so on the CPU it draws what the engine draws."""
    device = next(model.parameters()).device
    B, n_new = len(prompts), params.max_new_tokens
    lengths = torch.tensor([len(p) for p in prompts])
    buf = torch.zeros(B, int(lengths.max()) + n_new, dtype=torch.long)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.tensor(p)
    seed = params.seed if params.seed is not None else random.getrandbits(63)
    gens = [torch.Generator().manual_seed(seed) for _ in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    live = list(range(B))
    for _ in range(n_new):
        if not live:
            break
        idx = torch.tensor(live)
        width = int(lengths[idx].max())
        # Right padding is invisible to each row's last real position under the causal mask.
        logits = model(buf[idx, :width].to(device), logits_at=(lengths[idx] - 1).to(device)).float().cpu()
        still = []
        for j, i in enumerate(live):
            tok = int(sample(logits[j : j + 1], params, generator=gens[i])[0])
            out[i].append(tok)
            buf[i, lengths[i]] = tok
            lengths[i] += 1
            if tok not in eos_ids:
                still.append(i)
        live = still
    return out


def train_rl(
    policy: Transformer,
    prompts: Sequence[Sequence[int]],
    reward: Callable[[Sequence[int], Sequence[int]], float],
    config: RLConfig,
    *,
    reference: Transformer | None = None,
    val_prompts: Sequence[Sequence[int]] = (),
    eos_ids: Sequence[int] = (),
    on_iteration: Callable[[RLStats], None] | None = None,
    on_samples: Callable[[int, list[dict]], None] | None = None,
    out_dir: str | Path | None = None,
    reward_spec: object = None,
    progress: bool = False,
) -> RLResult:
    """Train `policy` in place: with `config.lora`, a trainable adapter is applied to it (the base stays frozen and is
    the reference); else its full weights train against `reference` (a frozen copy by default). reward(prompt ids,
    response ids without the stop token) -> r, e.g. a verifier or a reward model. `on_samples(iteration, rows)` sees
    every sample with its reward, KL and advantage (to look for reward hacking). With `out_dir`, the trainable weights
    and the optimizer are checkpointed every `save_every` iterations and a killed run resumes from the last checkpoint
    (the same config, prompts, base and `reward_spec`, a JSON-able description of the reward, only)."""
    from pippin.quant.linear import PalettizedLinear
    from pippin.train.checkpointing import resume, save_state

    if len(prompts) == 0:
        raise PippinError("RL needs at least one prompt.")
    stop = set(eos_ids)
    if config.lora is None:
        if any(isinstance(m, PalettizedLinear) for m in policy.modules()):
            raise PippinError("A compressed model's weights cannot be trained; train a LoRA adapter on it (the default).")
        reference = reference if reference is not None else copy.deepcopy(policy)
        reference.eval().requires_grad_(False)
    elif reference is not None:
        raise PippinError("A LoRA policy's reference is its own base; do not pass one.")
    fingerprint = base_fingerprint(policy)
    sampler = _Sampler(policy, config.lora)
    start_view = _start_view(policy, config.lora, config.init_from, fingerprint) if config.init_from else None
    if config.lora is not None:
        with torch.random.fork_rng(devices=[]):  # the adapter's random init follows the run's seed, not the caller's RNG
            torch.manual_seed(config.seed)
            apply_lora(policy, config.lora, trainable=True)
        if config.init_from:
            load_init(policy, config.init_from, config.lora, fingerprint=fingerprint)
        routing = routing_of(policy)
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=0.0)
    result = RLResult()
    digest = hashlib.sha256(json.dumps([[list(p) for p in prompts], [list(p) for p in val_prompts]]).encode()).hexdigest()[:16]
    run = {"config": config.to_dict(), "prompts": digest, "base": fingerprint, "reward": reward_spec}
    if config.init_from:  # the starting adapter's bytes, not only its path, name the run
        run["init_from"] = hashlib.sha256((Path(config.init_from) / WEIGHTS_FILE).read_bytes()).hexdigest()[:16]
    ckpt = Path(out_dir) / "checkpoint" if out_dir is not None else None
    if ckpt is not None and (meta := resume(ckpt, run=run, params=params, optimizer=opt)) is not None:
        result.history = [RLStats(**h) for h in meta["history"]]
        result.resumed_from = meta["step"]
        result.start_val_reward = meta.get("start_val_reward")
    device = next(policy.parameters()).device
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if config.bf16 else nullcontext
    act8 = set_act8(policy, False)  # the policy's passes see the weights without activation rounding
    if start_view is not None:
        set_act8(start_view, False)

    def logprobs(model: Transformer, p: list, y: list, *, entropy: bool = False):  # noqa: ANN202
        mb = config.minibatch
        parts = [sequence_logprobs(model, p[i : i + mb], y[i : i + mb], entropy=entropy) for i in range(0, len(p), mb)]
        return (torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])) if entropy else torch.cat(parts)

    def step_on(flat_p: list, flat_r: list, logp_old: torch.Tensor, adv: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        n = len(flat_p)
        for i in range(0, n, config.minibatch):
            sl = slice(i, i + config.minibatch)
            with autocast():
                logp = sequence_logprobs(policy, flat_p[sl], flat_r[sl])
            part = mdpo_loss(logp, logp_old[sl], adv[sl], config.alpha) if config.algo is Algo.MDLOO else rloo_loss(logp, adv[sl])
            (part * logp.shape[0] / n).backward()  # the mean over all n samples, a minibatch at a time
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()

    def validate() -> float:
        sampler.refresh()
        greedy = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0)
        replies = sampler.sample([list(p) for p in val_prompts], greedy, eos_ids)
        return sum(reward(p, [t for t in y if t not in stop]) for p, y in zip(val_prompts, replies)) / len(val_prompts)

    max_len = max(map(len, prompts)) + config.max_new_tokens
    if max_len > policy.config.max_seq_len:
        raise PippinError(f"The longest prompt plus {config.max_new_tokens} new tokens exceeds the model's {policy.config.max_seq_len}.")
    start = result.resumed_from
    if val_prompts and config.val_every and start == 0:
        result.start_val_reward = validate()
    bar = tqdm(range(start, config.iterations), initial=start, total=config.iterations, desc=f"rl {config.algo}", disable=not progress)
    try:
        for it in bar:
            t0 = time.perf_counter()
            rng = random.Random(config.seed * 1_000_003 + it)  # each iteration's prompts from its own seed: a resume is exact
            batch = [list(prompts[rng.randrange(len(prompts))]) for _ in range(config.prompts_per_iteration)]
            policy.eval()
            sampler.refresh()
            responses: list[list[list[int]]] = []  # [sample][prompt]
            t_sample = time.perf_counter()
            for k in range(config.samples):
                seed = config.seed * 7919 + it * 131 + k
                params_k = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=seed)
                responses.append(sampler.sample(batch, params_k, eos_ids))
            t_sample = time.perf_counter() - t_sample
            flat_p = [p for p in batch for _ in range(config.samples)]
            flat_r = [responses[k][i] for i in range(len(batch)) for k in range(config.samples)]
            r = torch.tensor([reward(p, [t for t in y if t not in stop]) for p, y in zip(flat_p, flat_r)], device=device)
            with torch.no_grad(), autocast():
                logp_old, ent = logprobs(policy, flat_p, flat_r, entropy=True)
                if start_view is not None:
                    logp_ref = logprobs(start_view, flat_p, flat_r)
                elif config.lora is not None:
                    routing.slot = None  # the base alone is the reference policy
                    logp_ref = logprobs(policy, flat_p, flat_r)
                    routing.slot = 0
                else:
                    logp_ref = logprobs(reference, flat_p, flat_r)
            kl = logp_old - logp_ref
            adv = leave_one_out((r - config.beta * kl).view(len(batch), config.samples)).flatten()
            policy.train()
            for _ in range(config.inner_steps if config.algo is Algo.MDLOO else 1):
                step_on(flat_p, flat_r, logp_old, adv)
            policy.eval()
            lengths = [len(y) for y in flat_r]
            stats = RLStats(
                iteration=it, samples=(it + 1) * len(flat_r), mean_reward=float(r.mean()), mean_kl=float(kl.mean()),
                mean_length=sum(lengths) / len(lengths), entropy=float(ent.mean()), seconds=time.perf_counter() - t0,
                sample_seconds=t_sample,
            )  # fmt: skip
            if val_prompts and config.val_every and ((it + 1) % config.val_every == 0 or it + 1 == config.iterations):
                stats.val_reward = validate()
            result.history.append(stats)
            bar.set_postfix(reward=f"{stats.mean_reward:.3f}", kl=f"{stats.mean_kl:.3f}")
            if on_iteration is not None:
                on_iteration(stats)
            if on_samples is not None:
                on_samples(it, [
                    {"prompt": p, "response": y, "reward": float(ri), "kl": float(ki), "advantage": float(ai)}
                    for p, y, ri, ki, ai in zip(flat_p, flat_r, r, kl, adv)
                ])  # fmt: skip
            if ckpt is not None and (it + 1) % config.save_every == 0 and it + 1 < config.iterations:
                history = [asdict(h) for h in result.history]
                extra = {"run": run, "history": history, "start_val_reward": result.start_val_reward}
                save_state(ckpt, step=it + 1, params=params, optimizer=opt, extra=extra)
    finally:
        set_act8(policy, act8)
        policy.eval()
    return result
