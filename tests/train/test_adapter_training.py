"""Adapter training: assistant-only masks, SFT and distillation that learn, exact resume after a kill."""

from __future__ import annotations

import json

import pytest
import torch

import pippin.train.adapter as trainer
from pippin.adapters.lora import LoraConfig, apply_lora
from pippin.adapters.peft_format import load_adapter
from pippin.adapters.store import AdapterStore
from pippin.errors import PippinError
from pippin.train.adapter import Objective, TrainConfig, lr_at, train_adapter
from pippin.train.data import Example, read_conversations, text_examples, tokenize_chat
from tests.conftest import SHARED_DATA, tiny_model

LORA = LoraConfig(rank=4, alpha=8.0)


def toy_examples(n: int = 8) -> list[Example]:
    """Prompt tokens (unmasked) followed by an answer that is a fixed function of the prompt (masked)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        p = torch.randint(10, 200, (6,), generator=g).tolist()
        a = [(t * 7) % 250 + 3 for t in p[:4]]
        out.append(Example(ids=p + a, mask=[False] * 6 + [True] * 4))
    return out


def cfg(**kw) -> TrainConfig:
    base = dict(lora=LORA, steps=30, batch_size=4, lr=1e-2, warmup_steps=2, save_every=10, seed=1)
    return TrainConfig(**{**base, **kw})


def test_sft_learns_and_the_saved_adapter_serves_the_same_logits(tmp_path):
    model = tiny_model()
    res = train_adapter(model, toy_examples(), cfg(), out_dir=tmp_path / "a", name="a", progress=False)
    assert res.losses[-1] < 0.5 * res.losses[0]
    assert (tmp_path / "a" / "train_config.json").is_file() and len((tmp_path / "a" / "train_log.jsonl").read_text().splitlines()) == 30
    tokens = torch.tensor([toy_examples()[0].ids])
    with torch.no_grad():
        trained = model(tokens)
    # A fresh base plus the saved fp16 adapter from the store gives the trained model's logits.
    served = tiny_model()
    apply_lora(served, LORA, n_slots=2)
    store = AdapterStore(tmp_path, model=served)
    store.route(["a"])
    with torch.no_grad():
        torch.testing.assert_close(served(tokens), trained, atol=2e-3, rtol=2e-3)
    assert load_adapter(tmp_path / "a").meta["objective"] == "sft"


def test_killed_run_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    ex = toy_examples()
    full = tiny_model()
    train_adapter(full, ex, cfg(steps=12, save_every=4), out_dir=tmp_path / "full", name="x", progress=False)
    real_save = trainer.save_state
    saves = []

    def save_then_die(*a, **k):
        real_save(*a, **k)
        saves.append(k["step"])
        if k["step"] == 8:
            raise KeyboardInterrupt  # killed right after the step-8 checkpoint

    monkeypatch.setattr(trainer, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(tiny_model(), ex, cfg(steps=12, save_every=4), out_dir=tmp_path / "killed", name="x", progress=False)
    monkeypatch.setattr(trainer, "save_state", real_save)
    res = train_adapter(tiny_model(), ex, cfg(steps=12, save_every=4), out_dir=tmp_path / "killed", name="x", progress=False)
    assert saves == [4, 8] and res.resumed_from == 8
    a, b = load_adapter(tmp_path / "full"), load_adapter(tmp_path / "killed")
    for mod in a.weights:
        torch.testing.assert_close(a.weights[mod][0], b.weights[mod][0], atol=1e-3, rtol=0)
        torch.testing.assert_close(a.weights[mod][1], b.weights[mod][1], atol=1e-3, rtol=0)
    # A different run cannot silently reuse that checkpoint.
    with pytest.raises(PippinError, match="different run"):
        train_adapter(tiny_model(), ex, cfg(steps=12, save_every=4, lr=5e-3), out_dir=tmp_path / "killed", name="x", progress=False)


def test_distillation_recovers_a_compressed_student(tmp_path):
    from pippin.quant.compress import CompressConfig, compress_
    from pippin.train.losses import masked_kl

    teacher = tiny_model()
    student = tiny_model()
    compress_(student, list(range(3, 250)) * 4, CompressConfig(candidate_bits=(2,), bpw=16, seq_len=128, n_seqs=2))
    with torch.no_grad():  # text the teacher itself generates (sampled): no outside data needed
        g = torch.Generator().manual_seed(0)
        text = torch.randint(3, 250, (64, 4), generator=g)
        for _ in range(28):
            nxt = torch.multinomial(teacher(text)[:, -1].softmax(-1), 1, generator=g)
            text = torch.cat([text, nxt], 1)
    ex = text_examples(text.flatten().tolist(), seq_len=31)
    train_windows, heldout = ex[:48], torch.tensor([e.ids for e in ex[48:]])

    def heldout_kl() -> float:
        with torch.no_grad():
            return masked_kl(student(heldout), teacher(heldout), torch.ones(heldout.shape, dtype=torch.bool)).item()

    kl_before = heldout_kl()
    res = train_adapter(
        student,
        train_windows,
        cfg(objective=Objective.DISTILL, steps=40, batch_size=8, lr=5e-3),
        out_dir=tmp_path / "r",
        name="r",
        teacher=teacher,
        progress=False,
    )
    assert res.losses[-1] < 0.6 * res.losses[0]
    assert heldout_kl() < 0.9 * kl_before  # it generalises to windows it did not train on


def test_task_adapter_starts_from_another_adapter(tmp_path):
    ex = toy_examples()
    train_adapter(tiny_model(), ex, cfg(steps=5), out_dir=tmp_path / "rec", name="rec", progress=False)
    m = tiny_model()
    tokens = torch.tensor([ex[0].ids])
    # steps=1 with a tiny lr: the task adapter must start (almost) where the recovery adapter ended.
    train_adapter(m, ex, cfg(steps=1, lr=1e-9, init_from=str(tmp_path / "rec")), out_dir=tmp_path / "task", name="task", progress=False)
    ref = tiny_model()
    apply_lora(ref, LORA, n_slots=2)
    store = AdapterStore(tmp_path, model=ref)
    store.route(["rec"])
    with torch.no_grad():
        torch.testing.assert_close(m(tokens), ref(tokens), atol=2e-3, rtol=2e-3)
    assert load_adapter(tmp_path / "task").meta["init_from"] == str(tmp_path / "rec")


def test_grad_checkpointing_gives_the_same_training(tmp_path):
    ex = toy_examples()
    a = train_adapter(tiny_model(), ex, cfg(steps=3), out_dir=tmp_path / "a", name="a", progress=False)
    b = train_adapter(tiny_model(), ex, cfg(steps=3, grad_checkpointing=True), out_dir=tmp_path / "b", name="b", progress=False)
    assert a.losses == pytest.approx(b.losses, rel=1e-5)


def test_lr_schedule_and_config_validation():
    c = cfg(steps=20, warmup_steps=4, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(0.25) and lr_at(3, c) == pytest.approx(1.0)
    assert lr_at(19, c) == pytest.approx(0.1, abs=0.02) and lr_at(10, c) < lr_at(5, c)
    with pytest.raises(PippinError):
        TrainConfig(steps=0)
    with pytest.raises(PippinError, match="teacher"):
        train_adapter(tiny_model(), toy_examples(), cfg(objective="distill"), out_dir="/nonexistent", name="x", progress=False)


def test_data_readers_and_bad_rows(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n{oops\n")
    with pytest.raises(PippinError, match=r"d.jsonl:2: not valid JSON"):
        read_conversations(p)
    p.write_bytes(b'{"messages": "caf\xe9"}\n')  # Latin-1, not UTF-8: named, not silently replaced
    with pytest.raises(PippinError, match=r"d.jsonl:1: not UTF-8"):
        read_conversations(p)
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(PippinError, match="no assistant"):
        read_conversations(p)
    with pytest.raises(PippinError, match="missing field"):
        read_conversations(p, "dialogsum")
    # AlpacaEval's shape: one JSON array of {instruction, output} rows -> one-turn chats; a bad row names its index.
    a = tmp_path / "alpaca.json"
    a.write_text(json.dumps([{"instruction": " Name a color. ", "output": "Blue.", "generator": "x"}, {"instruction": "Hi"}]))
    with pytest.raises(PippinError, match=r"alpaca.json\[1\]: missing field 'output'"):
        read_conversations(a, "alpaca")
    a.write_text(json.dumps([{"instruction": " Name a color. ", "output": "Blue."}]))
    assert read_conversations(a, "alpaca") == [[{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]]
    if (SHARED_DATA / "alpaca_eval").is_dir():
        rows = read_conversations(SHARED_DATA / "alpaca_eval" / "gpt4_1106_preview_model_outputs.json", "alpaca", limit=3)
        assert len(rows) == 3 and all(len(r) == 2 and r[1]["content"] for r in rows)


@pytest.mark.real
def test_assistant_mask_covers_exactly_the_replies():
    from pippin.model.checkpoint import load_model

    tok = load_model().tokenizer
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green 123."},
    ]
    ex = tokenize_chat(tok, msgs, max_len=512)
    assert ex.ids == tok.encode_chat(msgs, add_generation_prompt=False)
    learned = tok.decode([t for t, m in zip(ex.ids, ex.mask) if m], skip_special=False)
    assert "Blue." in learned and "Green 123." in learned and "colour" not in learned and "Be brief" not in learned
    if (SHARED_DATA / "dialogsum").is_dir():
        conv = read_conversations(SHARED_DATA / "dialogsum" / "dialogsum.test.jsonl", "dialogsum", limit=2)
        assert conv[0][0]["content"].startswith("Summarize the following dialogue") and conv[0][1]["role"] == "assistant"


@pytest.mark.real
def test_self_generated_text_needs_no_outside_data():
    from pippin.api import read_text_source, self_generated_text
    from pippin.model.checkpoint import load_model

    lm = load_model()
    kinds = {type(m) for m in lm.model.modules()}
    text = self_generated_text(lm.model, lm.tokenizer, n_seqs=2, max_new_tokens=24, seed=3)
    assert len(lm.tokenizer.encode(text)) > 20 and text == self_generated_text(lm.model, lm.tokenizer, n_seqs=2, max_new_tokens=24, seed=3)
    assert {type(m) for m in lm.model.modules()} == kinds  # the model is left as it was found (no kernel classes)
    with pytest.raises(PippinError, match="does not exist"):
        read_text_source("/no/such/file.txt", lm.model, lm.tokenizer)


@pytest.mark.parametrize("rotate", [False, True])
def test_residual_init_is_the_weighted_optimum_and_starts_recovery_ahead(tmp_path, rotate):
    """With rotate, the student is compressed in a rotated basis and the teacher is not: the residual is taken against
    a copy of the teacher rotated the same way (against the teacher's own weights it would be noise)."""
    from pippin.quant.calibrate import input_second_moments
    from pippin.quant.compress import CompressConfig, compress_
    from pippin.quant.rotate import rotate_like_
    from pippin.train.recovery import regularised, residual_factors

    comp = CompressConfig(candidate_bits=(2,), bpw=16, seq_len=128, n_seqs=2, rotate=rotate, rotate_seed=5)
    teacher, student = tiny_model(), tiny_model()
    compress_(student, list(range(3, 250)) * 4, comp)
    basis = rotate_like_(tiny_model(), student) if rotate else teacher  # the teacher's weights in the student's basis
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 250, (48,), generator=g) for _ in range(6)]
    mods = dict(student.named_modules())
    names = [n for n in mods if n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))]
    moments = input_second_moments(student, seqs, names)
    assert moments["layers.0.self_attn.q_proj"] is moments["layers.0.self_attn.v_proj"]  # one shared input, one matrix
    x = torch.cat([s for s in seqs])
    with torch.no_grad():
        h = student.embed_tokens(x)  # the first layer's q input is the normed embedding: check H against it
        xin = student.layers[0].input_layernorm(h).double()
    torch.testing.assert_close(moments["layers.0.self_attn.q_proj"], xin.T @ xin / len(x))

    # Full rank: the correction restores the teacher's weights exactly.
    full = LoraConfig(rank=128, alpha=128.0)
    for name, (A, B) in residual_factors(teacher, student, seqs, full).items():
        restored = mods[name].dequantize() + full.scaling * B @ A
        torch.testing.assert_close(restored, dict(basis.named_modules())[name].weight, atol=1e-4, rtol=1e-4)

    # Low rank: under the (regularised) input moments it weights by, it beats the plain truncated SVD of the same
    # residual, with the full H and with its diagonal.
    low = LoraConfig(rank=4, alpha=8.0)
    name = "layers.1.mlp.down_proj"
    R = (dict(basis.named_modules())[name].weight - mods[name].dequantize()).detach().double()
    U, S, Vh = torch.linalg.svd(R)
    plain = (U[:, :4] * S[:4]) @ Vh[:4]
    for shrinkage in (0.0, 1.0):
        A, B = residual_factors(teacher, student, seqs, low, shrinkage=shrinkage)[name]
        H = regularised(moments[name], shrinkage=shrinkage, damping=1e-2)

        def err(L: torch.Tensor, H: torch.Tensor = H) -> float:
            D = (R - L).detach()
            return float(torch.trace(D @ H @ D.T))

        assert err(low.scaling * (B @ A).double()) < err(plain) < err(torch.zeros_like(R))

    # In training: the run starts from that correction, so its first loss is already below a zero start's.
    text = torch.randint(3, 250, (40, 31), generator=g)
    ex = text_examples(text.flatten().tolist(), seq_len=31)

    def first_loss(**kw) -> float:
        s = tiny_model()
        compress_(s, list(range(3, 250)) * 4, comp)
        run = cfg(objective=Objective.DISTILL, steps=1, batch_size=8, lr=1e-9, lora=LoraConfig(rank=8, alpha=16.0), **kw)
        return train_adapter(s, ex, run, out_dir=tmp_path / str(kw), name="r", teacher=teacher, progress=False).losses[0]

    assert first_loss(init_residual=True) < 0.8 * first_loss()
    with pytest.raises(PippinError, match="not both"):
        cfg(init_residual=True, init_from="x")
    with pytest.raises(PippinError, match="teacher"):
        train_adapter(tiny_model(), ex, cfg(init_residual=True), out_dir=tmp_path / "t", name="t", progress=False)


def test_teacher_chats_answers_each_prompt_once_resumes_after_a_kill_and_refuses_another_teacher(tmp_path):
    """Recovery chats: the data's own replies are dropped and the teacher answers each prompt; a run killed mid-way
    keeps the finished chunks and asks the teacher only for the rest; a cache of another teacher is refused."""
    from pippin.train.data import teacher_chats

    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "dataset reply"}] for i in range(5)]
    asked: list[str] = []

    def teacher(batch):  # noqa: ANN001, ANN202
        asked.extend(c[-1]["content"] for c in batch)
        if len(asked) > 2 and not killed:
            raise KeyboardInterrupt  # the run is killed during its second chunk
        return [f"teacher says {c[-1]['content']}" for c in batch]

    cache = tmp_path / "teacher_replies.json"
    killed = False
    with pytest.raises(KeyboardInterrupt):
        teacher_chats(convs, teacher, cache=cache, key="t1", chunk=2)
    assert sorted(json.loads(cache.read_text())["replies"].values()) == ["teacher says q0", "teacher says q1"]
    killed, asked = True, []
    chats = teacher_chats(convs, teacher, cache=cache, key="t1", chunk=2)
    assert asked == ["q2", "q3", "q4"]  # the first chunk was not asked again
    assert [c[-1]["content"] for c in chats] == [f"teacher says q{i}" for i in range(5)]
    assert all(len(c) == 2 and c[0]["role"] == "user" for c in chats)
    asked = []
    assert teacher_chats(convs, teacher, cache=cache, key="t1") == chats and asked == []
    assert teacher_chats(convs[3:] + convs[:1], teacher, cache=cache, key="t1") == chats[3:] + chats[:1] and asked == []
    with pytest.raises(PippinError, match="another teacher"):
        teacher_chats(convs, teacher, cache=cache, key="t2")


KILLED_CHILD = """
import sys, time
from pathlib import Path
import pippin.train.checkpointing as ck
from tests.conftest import tiny_model
from tests.train.test_adapter_training import cfg, toy_examples
from pippin.train.adapter import train_adapter

real = ck.write_atomic
def slow(path, data):
    if Path(path).name == "state-8.safetensors":  # half the step-8 checkpoint, then hang until killed
        (Path(path).parent / ".state-8.safetensors.partial.tmp").write_bytes(data[: len(data) // 2])
        Path(sys.argv[1], "writing").touch()
        time.sleep(120)
    return real(path, data)
ck.write_atomic = slow
train_adapter(tiny_model(), toy_examples(), cfg(steps=12, save_every=4), out_dir=Path(sys.argv[1], "run"), name="x", progress=False)
"""


def test_kill_9_during_a_checkpoint_write_resumes_from_the_one_before(tmp_path):
    """A real SIGKILL while the step-8 checkpoint is half written: the run resumes from step 4 (at most one interval
    lost) and ends with the adapter of a run never killed."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(tmp_path)], cwd=root)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "writing").exists() and child.poll() is None:
            time.sleep(0.05)
        assert (tmp_path / "writing").exists(), "the child never reached the step-8 checkpoint"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    ex = toy_examples()
    res = train_adapter(tiny_model(), ex, cfg(steps=12, save_every=4), out_dir=tmp_path / "run", name="x", progress=False)
    assert res.resumed_from == 4
    train_adapter(tiny_model(), ex, cfg(steps=12, save_every=4), out_dir=tmp_path / "full", name="x", progress=False)
    a, b = load_adapter(tmp_path / "full"), load_adapter(tmp_path / "run")
    for mod in a.weights:
        torch.testing.assert_close(a.weights[mod][0], b.weights[mod][0], atol=1e-3, rtol=0)
        torch.testing.assert_close(a.weights[mod][1], b.weights[mod][1], atol=1e-3, rtol=0)
