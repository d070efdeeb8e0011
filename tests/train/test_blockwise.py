"""Block-wise recovery and where adapters train: each block's LoRA matches the reference block, one block after another,
on the earlier blocks' trained outputs; a compressed base trains as dense weights on a device, under bf16 autocast."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys

import pytest
import torch

from pippin.adapters.lora import LoraConfig, apply_lora, lora_modules
from pippin.errors import PippinError
from pippin.model.checkpoint import LoadedModel, save_pippin
from pippin.quant.compress import TARGETS, CompressConfig, compress_
from pippin.quant.linear import PalettizedLinear
from pippin.train.adapter import Objective, TrainConfig, train_adapter
from pippin.train.data import text_examples
from pippin.train.losses import token_mse
from pippin.train.placement import on_device, resolve_device
from pippin.train.recovery import block_parameters, reference_like, train_blockwise
from tests.conftest import tiny_model

LORA = LoraConfig(rank=4, alpha=8.0)


@functools.cache
def _compressed(rotate: bool) -> torch.nn.Module:
    m = tiny_model()
    plan = {n: 2 for n, _ in m.named_modules() if n.rpartition(".")[2] in TARGETS}  # every linear at 2 bits
    compress_(m, list(range(3, 250)) * 4, CompressConfig(plan=plan, seq_len=64, n_seqs=2, rotate=rotate, rotate_seed=5))
    return m


def compressed(rotate: bool = False) -> torch.nn.Module:
    """A fresh copy of the tiny model at 2 bits (compressed once per test run)."""
    return copy.deepcopy(_compressed(rotate))


def test_token_mse_is_the_per_token_relative_error():
    s, t = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    want = [((s[b, i] - t[b, i]).pow(2).sum() / t[b, i].pow(2).sum()).item() for b, i in [(0, 0), (0, 1), (1, 0)]]
    assert token_mse(s, t, mask).item() == pytest.approx(sum(want) / 3, rel=1e-5)


@pytest.mark.parametrize("rotate", [False, True])
def test_blockwise_trains_each_block_alone_in_order_and_lowers_its_error(rotate):
    teacher, student = tiny_model(), compressed(rotate)
    apply_lora(student, LORA, trainable=True)
    ref = reference_like(teacher, student)  # rotated like the student when it is: hidden states in one basis
    assert (ref is teacher) != rotate
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 250, (6, 24), generator=g)
    lengths = torch.tensor([24, 24, 17, 24, 9, 24])
    tokens[2, 17:] = tokens[4, 9:] = 0  # right padding: never scored
    mods = lora_modules(student)
    snap = lambda: {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in mods.items()}  # noqa: E731
    snaps, block1_inputs = [snap()], []
    student.layers[1].register_forward_pre_hook(lambda mod, args: block1_inputs.append(args[0].detach().clone()))
    res = train_blockwise(
        student, ref, tokens, lengths, steps=40, batch_size=3, schedule=lambda s: 1e-2, on_block=lambda r: snaps.append(snap())
    )
    assert [r.block for r in res] == [0, 1]
    for r in res:
        assert r.after < 0.7 * r.before
    for b, (old, new) in enumerate(zip(snaps, snaps[1:])):  # after block b: only block b's tensors moved
        for n in mods:
            moved = not (torch.equal(old[n][0], new[n][0]) and torch.equal(old[n][1], new[n][1]))
            assert moved == n.startswith(f"layers.{b}."), n
    assert len(block_parameters(student, 0)) == 2 * len(LORA.target_modules)
    # Block 1 trained on block 0's output with block 0's trained adapter, and its reported error is the relative MSE
    # against the reference's block 1 on the reference's own hidden states, by hand.
    T = tokens.shape[1]
    cos, sin = student.rope_cos[:T][None, None], student.rope_sin[:T][None, None]
    mask = torch.arange(T)[None] < lengths[:, None]
    with torch.no_grad():
        xq = student.layers[0](student.embed_tokens(tokens), cos, sin, None, None)
        xf = ref.layers[0](ref.embed_tokens(tokens), cos, sin, None, None)
        torch.testing.assert_close(block1_inputs[0][mask], xq[mask], atol=1e-5, rtol=1e-5)
        err = token_mse(student.layers[1](xq, cos, sin, None, None), ref.layers[1](xf, cos, sin, None, None), mask).item()
    assert err == pytest.approx(res[1].after, rel=1e-4)


def test_blockwise_objective_in_train_adapter_saves_and_resumes_per_block(tmp_path):
    teacher = tiny_model()
    g = torch.Generator().manual_seed(1)
    ex = text_examples(torch.randint(3, 250, (16 * 24,), generator=g).tolist(), seq_len=23)
    run = TrainConfig(lora=LORA, objective=Objective.BLOCKWISE, steps=20, batch_size=4, lr=1e-2, warmup_steps=2, block_seqs=8)
    res = train_adapter(compressed(), ex, run, out_dir=tmp_path / "bw", name="bw", teacher=teacher, progress=False)
    log = [json.loads(line) for line in (tmp_path / "bw" / "train_log.jsonl").read_text().splitlines()]
    assert [r["block"] for r in log] == [0, 1] and all(r["after"] < r["before"] for r in log)
    assert res.losses == [r["after"] for r in log]
    # A finished run resumes at its last block and changes nothing; a blockwise run without a teacher is refused.
    again = train_adapter(compressed(), ex, run, out_dir=tmp_path / "bw", name="bw", teacher=teacher, progress=False)
    assert again.resumed_from == 2 and again.losses == res.losses
    with pytest.raises(PippinError, match="teacher"):
        train_adapter(compressed(), ex, run, out_dir=tmp_path / "x", name="x", progress=False)


def test_on_device_trains_dense_copies_and_puts_the_compressed_modules_back():
    model = compressed(rotate=True)
    apply_lora(model, LORA, trainable=True)
    x = torch.randint(3, 250, (2, 20))
    with torch.no_grad():
        want = model(x)
    before = {n: m for n, m in model.named_modules() if isinstance(m, PalettizedLinear)}
    with on_device(model, resolve_device("cpu")) as m, torch.no_grad():
        assert not any(isinstance(mod, PalettizedLinear) for mod in m.modules())
        assert all(not p.requires_grad for n, p in m.named_parameters() if "lora_" not in n)
        torch.testing.assert_close(m(x), want, atol=1e-4, rtol=1e-4)
    assert {n: mm for n, mm in model.named_modules() if isinstance(mm, PalettizedLinear)} == before
    with pytest.raises(PippinError, match="CUDA device"):
        resolve_device("cuda:99")
    with pytest.raises(PippinError, match="not a device name"):
        resolve_device("gpu0")


def test_bf16_distillation_learns_with_fp32_lora_weights(tmp_path):
    teacher, student = tiny_model(), compressed()
    g = torch.Generator().manual_seed(2)
    ex = text_examples(torch.randint(3, 250, (24 * 32,), generator=g).tolist(), seq_len=31)
    run = TrainConfig(lora=LORA, objective=Objective.DISTILL, steps=15, batch_size=4, lr=1e-2, warmup_steps=2, bf16=True, device="cpu")
    res = train_adapter(student, ex, run, out_dir=tmp_path / "b", name="b", teacher=teacher, progress=False)
    assert res.losses[-1] < 0.7 * res.losses[0]
    assert {m.lora_A.dtype for m in lora_modules(student).values()} == {torch.float32}
    assert all(isinstance(m.base, PalettizedLinear) for m in lora_modules(student).values())  # compressed again


def test_cli_blockwise_then_distill_on_a_tiny_model_and_a_missing_device(tmp_path):
    from pippin.model.checkpoint import prepare_default
    from pippin.model.tokenizer import Tokenizer

    tok = Tokenizer.load(prepare_default(progress=False))  # the default model's tokenizer; the models are tiny
    for name, seed in (("student", 0), ("teacher", 1)):
        save_pippin(LoadedModel(model=tiny_model(seed, vocab_size=tok.vocab_size), tokenizer=tok, path=tmp_path, meta={}), tmp_path / name)
    (tmp_path / "text.txt").write_text("The river ran past the old mill and into the valley below, then on to the sea. " * 40)
    common = ["adapter", "train", "--adapters-dir", str(tmp_path / "ad"), "--model", str(tmp_path / "student"), "--teacher",
              str(tmp_path / "teacher"), "--format", "text", "--data", str(tmp_path / "text.txt"), "--seq-len", "32",
              "--batch-size", "2", "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--device", "cpu"]  # fmt: skip
    run = lambda *a: subprocess.run([sys.executable, "-m", "pippin", *common, *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    r = run("bw", "--objective", "blockwise", "--steps", "10", "--block-seqs", "4", "--bf16")
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in (tmp_path / "ad" / "bw" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(row["after"] < row["before"] for row in log)
    assert json.loads((tmp_path / "ad" / "bw" / "train_config.json").read_text())["bf16"] is True
    r = run("e2e", "--objective", "distill", "--steps", "3", "--init-from", "bw")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ad" / "e2e" / "pippin_adapter.json").read_text())["init_from"].endswith("bw")
    r = run("gpu", "--device", "cuda:99", "--steps", "1")
    assert r.returncode == 2 and "CUDA device" in r.stderr and "Traceback" not in r.stderr
