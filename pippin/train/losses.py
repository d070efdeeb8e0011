"""Losses for adapter training: masked logit distillation (KL), block-output matching and held-out perplexity.

The KL averages over the masked positions only (padding carries no loss) and stays finite when a batch
has no masked token; SFT needs no helper here (the trainer runs the head on the answer tokens only and takes
plain cross-entropy). The KL is KL(teacher || student) at temperature T, scaled by T^2 as in
Hinton et al. 2015; AFM's accuracy-recovery adapters are trained this way against the uncompressed model.
`token_mse` is the block-wise objective (BRECQ, EfficientQAT's Block-AP): each token's squared error relative to the
reference's own squared norm, so that the few tokens with massive residual-stream norms do not outweigh the rest.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Mean KL(teacher || student) per masked position, times T^2. Both logits (B, T, V)."""
    t = temperature
    log_p_t = F.log_softmax(teacher.float() / t, dim=-1)
    log_p_s = F.log_softmax(student.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (B, T)
    m = mask.float()
    return (kl * m).sum() / m.sum().clamp_min(1.0) * t * t


def token_mse(student: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked tokens of ||s - t||^2 / ||t||^2, in fp32. student, target (B, T, dim); mask (B, T) bool. The next
    block reads its input through an RMSNorm, so an error matters relative to its token's norm."""
    t = target.float()
    err = (student.float() - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)  # (B, T)
    m = mask.float()
    return (err * m).sum() / m.sum().clamp_min(1.0)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: list[list[int]]) -> float:
    """exp(mean NLL) of every token but each window's first (the held-out score used for recovery)."""
    nll, n = 0.0, 0
    for w in windows:
        x = torch.tensor([w])
        nll += F.cross_entropy(model(x)[0, :-1].float(), x[0, 1:], reduction="sum").item()
        n += len(w) - 1
    return math.exp(nll / max(n, 1))


def distill_loss(student: torch.Tensor, teacher_ids: torch.Tensor, labels: torch.Tensor, *, teacher_weight: float = 0.9) -> torch.Tensor:
    """AFM's core distillation loss: cross-entropy against y = w * onehot(teacher top-1) + (1 - w) * onehot(label)
    (../shared/reference/afm.md 2.4), i.e. w * CE(teacher's argmax) + (1 - w) * CE(label). Student logits (..., V);
    teacher_ids are the teacher's top-1 tokens (its logits' argmax(-1)), shaped like labels (...): the target needs
    nothing else of the teacher, which is what lets a teacher on other ranks send ids instead of logits. Label -100 is
    ignored (both terms) as in F.cross_entropy."""
    s = student.reshape(-1, student.shape[-1]).float()
    y = labels.reshape(-1)
    top1 = teacher_ids.reshape(-1).masked_fill(y == -100, -100)
    return teacher_weight * F.cross_entropy(s, top1, ignore_index=-100) + (1 - teacher_weight) * F.cross_entropy(s, y, ignore_index=-100)
