"""End-to-end LUT tuning: the LUTs and row scales of a compressed model learn to match the model it came from; the
indices and the stored format stay as they are, and a killed run resumes to the same result."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from pippin.errors import PippinError
from pippin.quant.compress import TARGETS, CompressConfig, compress_
from pippin.quant.linear import PalettizedEmbedding, PalettizedLinear
from pippin.train.lut_tuning import LutTuneConfig, trainable_luts, tune_luts, tuned_tensors
from tests.conftest import tiny_model


@functools.cache
def _compressed() -> torch.nn.Module:
    m = tiny_model()
    plan = {n: 2 for n, _ in m.named_modules() if n.rpartition(".")[2] in TARGETS}
    compress_(m, list(range(3, 250)) * 4, CompressConfig(plan=plan, seq_len=64, n_seqs=2, embed_bits=4, rotate=True, rotate_seed=1))
    return m


def compressed() -> torch.nn.Module:
    return copy.deepcopy(_compressed())


def windows(seed: int = 0, n: int = 8, t: int = 33) -> torch.Tensor:
    return torch.randint(3, 250, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def kl(teacher: torch.nn.Module, student: torch.nn.Module, x: torch.Tensor) -> float:
    lt, ls = F.log_softmax(teacher(x), -1), F.log_softmax(student(x), -1)
    return float((lt.exp() * (lt - ls)).sum(-1).mean())


def test_tuning_lowers_kl_and_changes_only_luts_and_row_scales(tmp_path):
    teacher, student = tiny_model(), compressed()
    assert isinstance(student.embed_tokens, PalettizedEmbedding)  # the tied embedding and head are tuned too
    before = {k: v.clone() for k, v in student.state_dict().items()}
    x, held_out = windows(n=128), windows(seed=1, n=16)
    kl0, kl_held0 = kl(teacher, student, x), kl(teacher, student, held_out)
    cfg = LutTuneConfig(steps=40, batch_size=4, lr=1e-2, warmup_steps=2, save_every=10)
    res = tune_luts(student, teacher, x, cfg, checkpoint=tmp_path / "ck", progress=False)
    assert kl(teacher, student, x) < 0.75 * kl0
    assert kl(teacher, student, held_out) < 0.92 * kl_held0  # not only the training windows (random tokens: -14 %)
    assert len(res.losses) == 40 and res.n_params == sum(t.numel() for t in tuned_tensors(student).values())
    after = student.state_dict()
    assert after.keys() == before.keys()
    for k, v in after.items():
        assert v.dtype == before[k].dtype, k  # stored back in fp16, as compression stores them
        if k.endswith((".lut", ".row_scale")):
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k  # indices, norms, rotation signs: untouched


def test_the_trained_weights_are_the_kernels_weights():
    """While the LUTs train, the layers run a differentiable gather; it computes the stored weight the kernels read."""
    student = compressed()
    layers = [m for m in student.modules() if isinstance(m, PalettizedLinear)]
    with torch.no_grad():
        ref = [m.stored_weight() for m in layers]
    with trainable_luts(student) as params:
        for m, w in zip(layers, ref):
            assert m.tuning()
            got = m.stored_weight()
            assert got.requires_grad and torch.allclose(got, w, atol=1e-6)
        got.sum().backward()
        assert params[f"{next(n for n, m in student.named_modules() if m is layers[-1])}.lut"].grad.abs().sum() > 0
    assert all(not m.tuning() and m.lut.dtype == torch.float16 for m in layers)


class Killed(Exception):
    pass


class DiesAt(torch.nn.Module):
    """The teacher, until its n-th call: then the run is killed."""

    def __init__(self, teacher: torch.nn.Module, n: int) -> None:
        super().__init__()
        self.teacher, self.n = teacher, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n -= 1
        if self.n < 0:
            raise Killed
        return self.teacher(x)


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    teacher, x = tiny_model(), windows()
    cfg = LutTuneConfig(steps=6, batch_size=2, lr=1e-2, warmup_steps=1, save_every=2)
    whole = compressed()
    tune_luts(whole, teacher, x, cfg, checkpoint=tmp_path / "a", progress=False)
    with pytest.raises(Killed):  # killed in step 6: the checkpoint of step 4 is what is left
        tune_luts(compressed(), DiesAt(teacher, 5), x, cfg, checkpoint=tmp_path / "b", progress=False)
    again = compressed()  # the rerun compresses again (deterministic) and resumes
    res = tune_luts(again, teacher, x, cfg, checkpoint=tmp_path / "b", progress=False)
    assert res.resumed_from == 4
    for k, v in tuned_tensors(whole).items():
        assert torch.equal(v, tuned_tensors(again)[k]), k
    with pytest.raises(PippinError, match="different run"):  # other data: the checkpoint is not this run's
        tune_luts(compressed(), teacher, windows(seed=3), cfg, checkpoint=tmp_path / "b", progress=False)


def test_a_model_without_luts_is_refused(tmp_path):
    with pytest.raises(PippinError, match="no palettized layer"):
        tune_luts(tiny_model(), tiny_model(), windows(), LutTuneConfig(steps=1), checkpoint=tmp_path, progress=False)
