import math

import pytest
import torch
import torch.nn.functional as F

from pippin.errors import PippinError
from pippin.train.losses import distill_loss
from pippin.train.optim import OptimConfig, build_optimizer, lr_at


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    c = OptimConfig(lr=2.0, warmup_steps=4, total_steps=104, final_lr_ratio=0.005)
    assert [lr_at(i, c) for i in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lr_at(4, c) == pytest.approx(2.0)
    assert lr_at(54, c) == pytest.approx(0.01 + (2.0 - 0.01) * 0.5)  # halfway down the cosine
    assert lr_at(104, c) == pytest.approx(0.01) and lr_at(10_000, c) == pytest.approx(0.01)
    mid = 4 + 25
    assert lr_at(mid, c) == pytest.approx(0.01 + 1.99 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_weight_decay_skips_vectors_and_unknown_names_are_refused():
    lin = torch.nn.Linear(3, 2)
    opt = build_optimizer(lin.named_parameters(), OptimConfig(name="adamw", weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {id(lin.weight)}
    with pytest.raises(PippinError, match="not one of"):
        OptimConfig(name="lion")


def test_distill_loss_is_cross_entropy_against_the_mixed_one_hot_target():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    y[0, 0] = -100
    target = 0.9 * F.one_hot(t.argmax(-1), 11) + 0.1 * F.one_hot(y.clamp_min(0), 11)
    keep = y != -100
    ref = -(target * F.log_softmax(s, -1)).sum(-1)[keep].mean()
    assert distill_loss(s, t, y).item() == pytest.approx(ref.item(), rel=1e-6)
    assert distill_loss(s, t, y, teacher_weight=0.0).item() == pytest.approx(F.cross_entropy(s.view(-1, 11), y.view(-1)).item())
