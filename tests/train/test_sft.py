"""Full fine-tuning with sequence packing: a packed row computes what its examples do alone, the loss stays on the
replies, training learns and saves a model that reloads exactly, a killed run resumes bit-identically, another run's
checkpoint and compressed models are refused, and `pippin sft` runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pippin.train.sft as sft
from pippin.errors import PippinError
from pippin.model.checkpoint import LoadedModel, load_pippin
from pippin.train.data import Example, block_causal_mask, pack, tokenize_chat
from pippin.train.sft import SFTConfig, train_sft
from tests.conftest import tiny_model
from tests.serve.conftest import ascii_tokenizer


def toy_examples(n: int = 12, seed: int = 0) -> list[Example]:
    """Prompts of varied length (unmasked), each followed by an answer that is a fixed function of it (masked)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(10, 200, (3 + i % 5,), generator=g).tolist()
        a = [(t * 7) % 250 + 3 for t in p[:3]]
        out.append(Example(ids=p + a, mask=[False] * len(p) + [True] * len(a)))
    return out


def loaded(model=None) -> LoadedModel:  # noqa: ANN001
    return LoadedModel(
        model=model if model is not None else tiny_model(), tokenizer=ascii_tokenizer(), path=Path("tiny"), meta={"name": "tiny"}
    )


def cfg(**kw) -> SFTConfig:
    base = dict(steps=24, batch_size=2, seq_len=24, lr=3e-3, warmup_steps=2, save_every=8, seed=1)
    return SFTConfig(**{**base, **kw})


def test_a_packed_row_gives_each_example_the_logits_and_loss_it_has_alone():
    model = tiny_model()
    ex = toy_examples(10) + [Example(ids=list(range(10, 40)), mask=[False] * 8 + [True] * 22)]  # 30 tokens: cut to 17
    rows = pack(ex, seq_len=16)
    st = rows.stats
    assert (st.n_examples, st.n_truncated, st.n_dropped) == (11, 1, 0)
    assert st.n_tokens == sum(min(len(e.ids), 17) - 1 for e in ex) and st.n_slots == st.n_rows * 16
    assert st.n_rows < len(ex) and st.efficiency > 0.75  # several examples share a row
    assert sorted(i for r in rows.sources for i in r) == list(range(len(ex)))
    with torch.no_grad():
        packed = model(rows.inputs, positions=rows.positions, mask=block_causal_mask(rows.segments))
        plain = model(rows.inputs)  # the same rows with attention across examples and positions running on
        leaked = False
        for r, members in enumerate(rows.sources):
            for s, i in enumerate(members):
                at = rows.segments[r] == s
                ids = ex[i].ids[:17]
                alone = model(torch.tensor([ids[:-1]]))[0]
                torch.testing.assert_close(packed[r, at], alone, atol=1e-5, rtol=1e-5)
                m = rows.loss_mask[r, at]
                assert m.tolist() == ex[i].mask[1:17] and rows.targets[r, at].tolist() == ids[1:]
                want = F.cross_entropy(alone[m], torch.tensor(ids[1:])[m])
                torch.testing.assert_close(F.cross_entropy(packed[r, at][m], rows.targets[r, at][m]), want)
                leaked |= s > 0 and not torch.allclose(plain[r, at], alone, atol=1e-3)
    assert leaked  # without the block mask the later examples of a row see the earlier ones (RoPE alone is relative)


def test_after_packing_the_loss_covers_exactly_the_assistant_replies():
    tok = ascii_tokenizer()
    chats = [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"name {i}"}, {"role": "assistant", "content": f"ok {i}"}]
        + ([{"role": "user", "content": "again"}, {"role": "assistant", "content": "yes"}] if i % 2 else [])
        for i in range(6)
    ]
    ex = [tokenize_chat(tok, c) for c in chats]
    rows = pack(ex, seq_len=128)
    assert rows.stats.n_rows < len(ex)
    for r, members in enumerate(rows.sources):
        for s, i in enumerate(members):
            at = (rows.segments[r] == s) & rows.loss_mask[r]
            replies = "".join(m["content"] + "\n" for m in chats[i] if m["role"] == "assistant")
            assert tok.decode(rows.targets[r, at].tolist()) == replies
        assert not rows.loss_mask[r, rows.segments[r] == len(members)].any()  # padding is never trained on


def test_packing_drops_what_has_no_reply_and_refuses_nothing_to_learn():
    ex = [Example(ids=[1, 2, 3, 4], mask=[False, False, True, True]), Example(ids=[1] * 10 + [2], mask=[False] * 10 + [True])]
    rows = pack(ex, seq_len=4)  # the second one's reply is cut off
    assert (rows.stats.n_examples, rows.stats.n_truncated, rows.stats.n_dropped) == (1, 1, 1)
    with pytest.raises(PippinError, match="None of the 1 examples has a loss token"):
        pack(ex[1:], seq_len=4)


def test_training_learns_and_the_saved_model_reloads_with_the_same_logits(tmp_path):
    lm = loaded()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    res = train_sft(lm, toy_examples(), cfg(), out_dir=tmp_path / "run", meta={"data": "toy"}, progress=False)
    assert sum(res.losses[-4:]) / 4 < 0.3 * sum(res.losses[:4]) / 4, res.losses
    assert res.path == tmp_path / "run" / "model" and res.packing.n_examples == 12
    assert len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 24
    run_cfg = json.loads((tmp_path / "run" / "sft_config.json").read_text())
    assert run_cfg["lr"] == 3e-3 and run_cfg["packing"]["efficiency"] == res.packing.efficiency
    back = load_pippin(res.path)
    assert back.meta["sft"]["seq_len"] == 24 and back.meta["data"] == "toy" and back.tokenizer is not None
    assert all(torch.equal(v, back.model.state_dict()[k]) for k, v in lm.model.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in back.model.state_dict().items())
    tokens = torch.tensor([toy_examples()[0].ids])
    with torch.no_grad():
        assert torch.equal(back.model(tokens), lm.model(tokens))


def test_epochs_set_the_steps_and_accumulation_splits_the_same_step(tmp_path):
    ex = toy_examples()
    rows = pack(ex, seq_len=24).stats.n_rows
    one = train_sft(loaded(), ex, cfg(steps=0, epochs=2, batch_size=4), out_dir=tmp_path / "one", progress=False)
    two = train_sft(loaded(), ex, cfg(steps=0, epochs=2, batch_size=2, grad_accum=2), out_dir=tmp_path / "two", progress=False)
    assert one.steps == two.steps == -(-2 * rows // 4)
    assert one.losses == pytest.approx(two.losses, abs=1e-5)  # the loss is the step's token mean either way


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_a_killed_run_resumes_to_bit_identical_weights(tmp_path, monkeypatch, grad_checkpointing):
    ex, c = toy_examples(), cfg(steps=12, save_every=4, grad_checkpointing=grad_checkpointing)
    full = loaded()
    train_sft(full, ex, c, out_dir=tmp_path / "full", progress=False)
    real_save, saves = sft.save_state, []

    def save_then_die(*a, **k):
        real_save(*a, **k)
        saves.append(k["step"])
        if k["step"] == 8:
            raise KeyboardInterrupt  # killed right after the step-8 checkpoint

    monkeypatch.setattr(sft, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_sft(loaded(), ex, c, out_dir=tmp_path / "killed", progress=False)
    monkeypatch.setattr(sft, "save_state", real_save)
    again = loaded()
    res = train_sft(again, ex, c, out_dir=tmp_path / "killed", progress=False)
    assert saves == [4, 8] and res.resumed_from == 8 and len(res.losses) == 12
    a, b = load_pippin(tmp_path / "full" / "model").model.state_dict(), load_pippin(tmp_path / "killed" / "model").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "forward" not in again.model.layers[0].__dict__  # the checkpointing wrappers are gone


def test_resuming_with_another_config_or_data_is_refused(tmp_path):
    ex = toy_examples()
    train_sft(loaded(), ex, cfg(steps=4, save_every=2), out_dir=tmp_path / "run", progress=False)
    with pytest.raises(PippinError, match="different run"):
        train_sft(loaded(), ex, cfg(steps=4, save_every=2, lr=1e-3), out_dir=tmp_path / "run", progress=False)
    with pytest.raises(PippinError, match="different run"):
        train_sft(loaded(), ex[:-1], cfg(steps=4, save_every=2), out_dir=tmp_path / "run", progress=False)
    # More steps on the same run go on from the checkpoint (the extension is allowed).
    assert train_sft(loaded(), ex, cfg(steps=6, save_every=2), out_dir=tmp_path / "run", progress=False).resumed_from == 4


def test_a_compressed_model_and_bad_settings_are_refused(tmp_path):
    from pippin.api import load_any
    from pippin.model.checkpoint import save_pippin
    from pippin.quant.compress import CompressConfig, compress_, quantization_meta

    model = tiny_model()
    c = CompressConfig(candidate_bits=(4,), bpw=16, seq_len=64, n_seqs=2)
    report = compress_(model, list(range(3, 250)) * 2, c)
    save_pippin(loaded(model), tmp_path / "q", extra_meta={"quantization": quantization_meta(report, c)})
    with pytest.raises(PippinError, match="compressed"):
        train_sft(load_any(tmp_path / "q"), toy_examples(), cfg(), out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(PippinError, match="max_seq_len"):
        train_sft(loaded(), toy_examples(), cfg(seq_len=1000), out_dir=tmp_path / "run", progress=False)
    for bad in ({"batch_size": 0}, {"steps": 0, "epochs": 0}, {"lr": 0}):
        with pytest.raises(PippinError):
            cfg(**bad)


def test_the_sft_command_trains_a_model_that_generate_loads(tmp_path):
    import subprocess
    import sys

    from pippin.api import load_any
    from tests.serve.conftest import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "tiny")
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"ok {i} done"}]} for i in range(8)]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "pippin", "sft", "--model", str(folder), "--data", str(tmp_path / "chats.jsonl"), "--out"]
    cmd += [str(tmp_path / "run"), "--steps", "3", "--batch-size", "2", "--seq-len", "96", "--lr", "1e-3"]
    r = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["steps"] == 3 and len(out["losses"]) == 3 and out["packing"]["n_examples"] == 8
    assert out["packing"]["n_rows"] < 8 and 0 < out["packing"]["efficiency"] <= 1
    trained = load_any(out["model"])
    assert trained.meta["sft"]["steps"] == 3 and trained.meta["data_format"] == "chat" and trained.meta["base_model"] == "tiny"
    before = load_any(folder).model.state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in trained.model.state_dict().items())
    gen = [sys.executable, "-m", "pippin", "generate", "--model", out["model"], "--max-new-tokens", "4", "--json", "hi"]
    g = subprocess.run(gen, capture_output=True, text=True, timeout=300)
    assert g.returncode == 0, g.stderr
    assert json.loads(g.stdout)["stats"]["generated_tokens"] == 4
    bad = subprocess.run([*cmd[:-2], "--data", str(tmp_path / "nope.jsonl")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
