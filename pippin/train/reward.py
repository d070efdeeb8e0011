"""The reward model of AFM §3.2: a scalar reward and four single-sided grading heads on a base model.

The base's last-layer state (after the final norm) at the final non-padding token of prompt + response feeds a
linear head, the reward r, and four MLP classification heads u^g, one per aspect (instruction following,
verbosity, truthfulness, harmlessness; 3 levels each). The loss is the soft-label Bradley-Terry ranking loss with
a target probability per preference level, p = 0.95 / 0.85 / 0.75 / 0.65 from "significantly better" to
"negligibly better",

    L_rank = -p log sigmoid(r_c - r_r) - (1 - p) log sigmoid(r_r - r_c),

plus lambda times the cross-entropy of the single-sided grades of both responses (grades a pair does not have are
left out). The base model stays plain: `RewardModel` holds it and reads `Transformer.features`.
Preference data is JSONL, one pair per line:
    {"prompt": "..." or [messages], "chosen": "...", "rejected": "...", "level": "better",
     "chosen_grades": {"instruction_following": 2, ...}, "rejected_grades": {...}}
`train_reward` is resumable (pippin.train.checkpointing) and reports held-out pair accuracy. `verified_pairs` makes
pairs without a judge: several samples per prompt with verifiable instructions (IFEval's format), the checkers
decide which is better (never from an evaluation set: that would train on the test).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from pippin.errors import PippinError
from pippin.io import jsonl_rows
from pippin.model.transformer import Transformer

if TYPE_CHECKING:
    from pippin.eval.ifeval import IFEvalItem

LEVELS = {"significantly better": 0.95, "better": 0.85, "slightly better": 0.75, "negligibly better": 0.65}
"""Preference level -> the target probability that the chosen response wins (AFM's soft labels)."""
ASPECTS = ("instruction_following", "verbosity", "truthfulness", "harmlessness")
N_GRADES = 3


@dataclass(kw_only=True)
class PreferencePair:
    messages: list[dict[str, str]]
    """The conversation before the two responses."""
    chosen: str
    rejected: str
    level: str = "better"
    chosen_grades: dict[str, int] = field(default_factory=dict)
    """Aspect -> grade in 0..2; aspects left out are not graded."""
    rejected_grades: dict[str, int] = field(default_factory=dict)


def read_preferences(path: str | Path) -> list[PreferencePair]:
    """Preference pairs from JSONL, checked line by line (a clear error names the line)."""
    path = Path(path)
    pairs = []
    for n, row in jsonl_rows(path):
        where = f"{path}:{n}"
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("chosen", "rejected")):
            raise PippinError(f"{where}: needs string 'chosen' and 'rejected' fields.")
        prompt = row.get("prompt")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
        ):
            raise PippinError(f"{where}: 'prompt' must be a string or a list of chat messages.")
        level = row.get("level", "better")
        if level not in LEVELS:
            raise PippinError(f"{where}: level {level!r} is not one of {sorted(LEVELS)}.")
        grades = {}
        for side in ("chosen_grades", "rejected_grades"):
            g = row.get(side) or {}
            bad = [k for k, v in g.items() if k not in ASPECTS or not isinstance(v, int) or not 0 <= v < N_GRADES]
            if not isinstance(g, dict) or bad:
                raise PippinError(f"{where}: {side} must map aspects {ASPECTS} to grades 0..{N_GRADES - 1} (bad: {bad}).")
            grades[side] = dict(g)
        pairs.append(PreferencePair(messages=messages, chosen=row["chosen"], rejected=row["rejected"], level=level, **grades))
    if not pairs:
        raise PippinError(f"{path} holds no preference pairs.")
    return pairs


class RewardModel(nn.Module):
    """A base model with a scalar reward head and one 3-way grading MLP per aspect."""

    def __init__(self, base: Transformer) -> None:
        super().__init__()
        self.base = base
        dim = base.config.dim
        self.reward = nn.Linear(dim, 1)
        self.grades = nn.ModuleDict({a: nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, N_GRADES)) for a in ASPECTS})
        with torch.no_grad():
            self.reward.weight.normal_(0, 1 / math.sqrt(dim))
            self.reward.bias.zero_()

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rewards (B,) and grade logits {aspect: (B, 3)} for right-padded sequences (B, T) of true `lengths` (B,)."""
        h = self.base.features(tokens)
        last = self.base.norm(h[torch.arange(tokens.shape[0]), lengths - 1])
        return self.reward(last).squeeze(-1), {a: head(last) for a, head in self.grades.items()}


def soft_bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Mean soft-label Bradley-Terry loss: -p log sigmoid(d) - (1 - p) log sigmoid(-d), d = r_c - r_r."""
    d = r_chosen - r_rejected
    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d)).mean()


def grading_loss(logits: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Sum over aspects of the mean cross-entropy of the graded rows; targets (B, 4) in aspect order, -1 = ungraded."""
    total = logits[ASPECTS[0]].new_zeros(())
    for k, a in enumerate(ASPECTS):
        if bool((targets[:, k] >= 0).any()):
            total = total + F.cross_entropy(logits[a], targets[:, k], ignore_index=-1)
    return total


@dataclass(kw_only=True)
class RewardConfig:
    steps: int = 200
    batch_size: int = 8
    """Pairs per step (each pair is two sequences)."""
    lr: float = 1e-5
    head_lr: float = 1e-3
    """The new heads learn faster than the pretrained base."""
    grading_weight: float = 0.5
    """lambda: the weight of the single-sided grading loss (AFM does not give it)."""
    max_len: int = 512
    holdout: float = 0.1
    """Share of the pairs kept out of training for the held-out pair accuracy."""
    save_every: int = 50
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class RewardResult:
    steps: int
    resumed_from: int
    losses: list[float]
    heldout_accuracy: float
    """Share of held-out pairs where r(chosen) > r(rejected)."""
    n_heldout: int


def encode_pairs(tokenizer, pairs: list[PreferencePair], *, max_len: int) -> list[dict[str, Any]]:  # noqa: ANN001 - pippin Tokenizer
    """Token ids of prompt + response for both sides (cut to max_len from the left of the prompt), soft label, grades."""

    def ids(messages: list[dict[str, str]], reply: str) -> list[int]:
        full = tokenizer.encode_chat([*messages, {"role": "assistant", "content": reply}], add_generation_prompt=False)
        return full[-max_len:]

    def grade_row(g: dict[str, int]) -> list[int]:
        return [g.get(a, -1) for a in ASPECTS]

    return [
        {
            "chosen": ids(p.messages, p.chosen),
            "rejected": ids(p.messages, p.rejected),
            "p": LEVELS[p.level],
            "grades": grade_row(p.chosen_grades) + grade_row(p.rejected_grades),
        }
        for p in pairs
    ]


def _batch(rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen sequences then rejected ones, right-padded: tokens (2B, T), lengths (2B,), p (B,), grades (2B, 4)."""
    seqs = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    lengths = torch.tensor([len(s) for s in seqs])
    tokens = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    grades = torch.tensor([r["grades"][:4] for r in rows] + [r["grades"][4:] for r in rows])
    return tokens, lengths, torch.tensor([r["p"] for r in rows]), grades


@torch.no_grad()
def pair_accuracy(model: RewardModel, rows: list[dict[str, Any]], *, batch_size: int = 8) -> float:
    """Share of pairs whose chosen response gets the higher reward."""
    model.eval()
    wins = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        tokens, lengths, _, _ = _batch(chunk)
        r, _ = model(tokens, lengths)
        wins += int((r[: len(chunk)] > r[len(chunk) :]).sum())
    return wins / max(len(rows), 1)


def train_reward(
    model: RewardModel,
    rows: list[dict[str, Any]],
    config: RewardConfig,
    *,
    out_dir: str | Path,
    base: str | None = None,
    progress: bool = True,
) -> RewardResult:
    """Train on encoded pairs (see encode_pairs); resumable from `out_dir/checkpoint`, the run's config in
    `out_dir/reward_config.json` (with `base`, the base model's path, so `load_reward_model` can rebuild it), the
    weights in `out_dir/reward_model.safetensors` when done."""
    from safetensors.torch import save as st_save
    from tqdm import tqdm

    from pippin.io import write_atomic, write_json_atomic
    from pippin.train.checkpointing import resume, save_state

    out_dir = Path(out_dir)
    order = list(range(len(rows)))
    random.Random(config.seed).shuffle(order)
    n_held = max(1, int(len(rows) * config.holdout)) if len(rows) > 1 else 0
    held, train = [rows[i] for i in order[:n_held]], [rows[i] for i in order[n_held:]]
    if not train:
        raise PippinError("No preference pairs left to train on after the held-out share; give more pairs.")
    head_params = [p for n, p in model.named_parameters() if not n.startswith("base.")]
    base_params = [p for n, p in model.named_parameters() if n.startswith("base.")]
    opt = torch.optim.AdamW([{"params": base_params, "lr": config.lr}, {"params": head_params, "lr": config.head_lr}], weight_decay=0.0)
    params = dict(model.named_parameters())
    run = {"config": config.to_dict(), "n_pairs": len(rows), "base": base}
    start, losses = 0, []
    if (meta := resume(out_dir / "checkpoint", run=run, params=params, optimizer=opt)) is not None:
        start, losses = meta["step"], list(meta["losses"])
    write_json_atomic(out_dir / "reward_config.json", run)  # the run's settings, next to its checkpoint and weights
    model.train()
    bar = tqdm(range(start, config.steps), desc="reward", disable=not progress, initial=start, total=config.steps)
    for step in bar:
        rng = random.Random(config.seed * 1_000_003 + step)  # each step's batch from its own seed: a resume is exact
        batch = [train[rng.randrange(len(train))] for _ in range(config.batch_size)]
        tokens, lengths, p, grades = _batch(batch)
        r, logits = model(tokens, lengths)
        B = len(batch)
        loss = soft_bt_loss(r[:B], r[B:], p) + config.grading_weight * grading_loss(logits, grades)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if done % config.save_every == 0 and done < config.steps:
            save_state(out_dir / "checkpoint", step=done, params=params, optimizer=opt, extra={"run": run, "losses": losses})
    acc = pair_accuracy(model, held, batch_size=config.batch_size) if held else float("nan")
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    write_atomic(out_dir / "reward_model.safetensors", st_save(weights))
    result = RewardResult(steps=config.steps, resumed_from=start, losses=losses, heldout_accuracy=acc, n_heldout=len(held))
    write_json_atomic(out_dir / "reward_result.json", {**run, **asdict(result), "losses": losses[-20:]})
    return result


def reward_base(folder: str | Path) -> str:
    """The base model a finished reward-model run was trained on (its path, from reward_config.json)."""
    folder = Path(folder)
    cfg, weights = folder / "reward_config.json", folder / "reward_model.safetensors"
    if not cfg.is_file() or not weights.is_file():
        raise PippinError(f"{folder} is not a finished reward-model run (it needs reward_config.json and reward_model.safetensors).")
    base = json.loads(cfg.read_text()).get("base")
    if not base:
        raise PippinError(f"{cfg} does not name its base model; train it again with `pippin reward train`.")
    return base


def load_reward_model(folder: str | Path, base: Transformer) -> RewardModel:
    """A trained reward model from its run folder over a fresh copy of its base (see reward_base): the saved weights
    are safetensors, never a pickle."""
    from safetensors.torch import load_file

    model = RewardModel(base)
    try:
        model.load_state_dict(load_file(Path(folder) / "reward_model.safetensors"))
    except (RuntimeError, OSError) as e:
        raise PippinError(f"{folder}: the reward model's weights do not fit this base ({e}).") from None
    return model.eval()


def level_for(gap: float) -> str:
    """The preference level of a score gap in (0, 1] (the share of instructions one reply follows beyond the other)."""
    return "significantly better" if gap >= 0.75 else "better" if gap >= 0.5 else "slightly better" if gap >= 0.25 else "negligibly better"


def verified_pairs(
    generate: Callable[[list[list[dict[str, str]]], int], list[str]], items: list[IFEvalItem], *, samples: int = 2
) -> list[PreferencePair]:
    """For each item, `samples` replies (`generate(conversations, k)` for k = 0..samples-1, e.g. seed k); IFEval's
    strict checkers score each reply (the share of its instructions followed); the best and the worst reply form a
    pair when they differ, with a level from the gap and each side's instruction-following grade (2: all followed,
    0: none, else 1). Items whose replies all score the same give no pair."""
    from pippin.eval.ifeval import check_response

    if samples < 2:
        raise PippinError(f"A pair needs at least 2 samples per prompt, got {samples}.")
    convs = [[{"role": "user", "content": it.prompt}] for it in items]
    replies = [generate(convs, k) for k in range(samples)]

    def grade(s: float) -> int:
        return 2 if s == 1.0 else 0 if s == 0.0 else 1

    pairs = []
    for i, it in enumerate(items):
        scored = []
        for k in range(samples):
            ok = check_response(it, replies[k][i])
            scored.append((sum(ok) / len(ok), replies[k][i]))
        (lo, worst), (hi, best) = min(scored, key=lambda x: x[0]), max(scored, key=lambda x: x[0])
        if hi > lo:
            pairs.append(
                PreferencePair(
                    messages=convs[i],
                    chosen=best,
                    rejected=worst,
                    level=level_for(hi - lo),
                    chosen_grades={"instruction_following": grade(hi)},
                    rejected_grades={"instruction_following": grade(lo)},
                )  # fmt: skip
            )
    return pairs


def write_preferences(path: str | Path, pairs: list[PreferencePair]) -> None:
    """JSONL that read_preferences reads back, written atomically."""
    from pippin.io import write_atomic

    lines = [
        json.dumps(
            {
                "prompt": p.messages,
                "chosen": p.chosen,
                "rejected": p.rejected,
                "level": p.level,
                "chosen_grades": p.chosen_grades,
                "rejected_grades": p.rejected_grades,
            }
        )  # fmt: skip
        for p in pairs
    ]
    write_atomic(path, ("\n".join(lines) + "\n").encode() if lines else b"")
