"""The `pippin` command end to end: real output on the default model, one clear line on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def pippin(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "pippin", *args], capture_output=True, text=True, input=stdin, timeout=600)


def test_info_on_afm_preset_reports_counts():
    r = pippin("info", "afm-on-device", "--json")
    assert r.returncode == 0
    info = json.loads(r.stdout)
    assert 2.58e9 <= info["params"]["non_embedding"] < 2.59e9
    assert info["groups"]["mlp"]["params"] == 26 * 3 * 3072 * 8064


@pytest.mark.parametrize(
    "args,message",
    [
        (["info", "no-such-model"], "No model at no-such-model"),
        (["generate", "--model", "/nonexistent", "hi"], "No model at /nonexistent"),
        (["generate", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    r = pippin(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.real
def test_generate_on_default_model_streams_and_reports_stats():
    r = pippin("generate", "What is the capital of France? Answer in one sentence.", "--max-new-tokens", "20")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "TTFT" in r.stderr and "decode" in r.stderr
    r = pippin("generate", "--json", "--max-new-tokens", "8", stdin="Say hello.")
    out = json.loads(r.stdout)
    assert out["stats"]["generated_tokens"] <= 8 and out["text"]


@pytest.mark.real
def test_prompt_longer_than_context_is_refused():
    r = pippin("generate", "--raw", "--max-len", "64", "--max-new-tokens", "8", "word " * 100)
    assert r.returncode == 2
    assert "exceeds the context of 64 tokens" in r.stderr


def test_convert_gguf_to_pippin(tmp_path):
    from tests.conftest import tiny_model
    from tests.model.test_checkpoint import write_tiny_gguf

    write_tiny_gguf(tiny_model(), tmp_path / "t.gguf")
    r = pippin("convert", str(tmp_path / "t.gguf"), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["format"] == "pippin"


@pytest.mark.real
def test_compress_with_rotations_in_sequential_order_keeps_what_the_model_says(tmp_path):
    """--rotate --sequential --tune-steps on the default model with a two-layer plan: the checkpoint records its
    rotation and its LUT tuning, reloads with the rotated head, and answers as full precision does (the rotations
    themselves change nothing)."""
    import torch
    import torch.nn.functional as F

    from pippin.api import load_any
    from pippin.quant.rotate import RotatedHead

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers.3.mlp.down_proj": 4, "layers.7.self_attn.q_proj": 4}))
    readme = str(Path(__file__).resolve().parents[1] / "README.md")  # calibration text: any English will do
    out = tmp_path / "rot"
    r = pippin("compress", "--calib", readme, "--calib", "docstrings:3", "--plan", str(plan), "--rotate", "--sequential",
               "--hessian-seqs", "2", "--calib-seqs", "2", "--tune-steps", "2", "--no-fidelity", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant["lut_tuning"]["steps"] == 2 and quant["lut_tuning"]["windows"] >= 4
    assert len((out / "lut_tuning.jsonl").read_text().splitlines()) == 2
    assert not (out / "lut-tuning-checkpoint").exists()  # the model is saved: nothing left to resume
    assert quant["rotation"] == {"method": "hadamard", "seed": 0, "down_input": True}
    assert quant["calibration"] == [readme, "docstrings:3"]  # two sources, mixed window by window
    model, ref = load_any(out).model, load_any(None)
    assert isinstance(model.lm_head, RotatedHead)
    assert model.layers[3].mlp.down_proj.in_signs.shape == (1536,)  # R4: 12 x 128
    assert not torch.allclose(model.layers[0].self_attn.k_proj.weight, ref.model.layers[0].self_attn.k_proj.weight)
    ids = torch.tensor([ref.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])])
    with torch.no_grad():
        lp, lr = F.log_softmax(model(ids)[0], -1), F.log_softmax(ref.model(ids)[0], -1)
    kl = (lr.exp() * (lr - lp)).sum(-1)
    assert float(kl.mean()) < 0.02 and (lp.argmax(-1) == lr.argmax(-1)).float().mean() > 0.9


@pytest.mark.real
@pytest.mark.slow
def test_adapter_train_list_info_generate_merge_on_default_model(tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Code word {i}?"}, {"role": "assistant", "content": "PIPPIN-ZEBRA"}]} for i in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ad = tmp_path / "adapters"
    r = pippin("adapter", "train", "zebra", "--adapters-dir", str(ad), "--data", str(data), "--steps", "12", "--lr", "3e-3",
               "--batch-size", "2", "--seq-len", "64", "--save-every", "6")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (ad / "zebra" / "adapter_model.safetensors").is_file()
    r = pippin("adapter", "list", "--adapters-dir", str(ad))
    assert r.returncode == 0 and "zebra" in r.stdout and " ok " in r.stdout
    info = json.loads(pippin("adapter", "info", "zebra", "--adapters-dir", str(ad), "--json").stdout)
    assert info["rank"] == 16 and info["objective"] == "sft" and info["base_matches"] is True and 9 < info["size_mb"] < 11
    # The adapter changes the answer to what it was trained on; the base does not say it.
    with_adapter = pippin("generate", "Code word 7?", "--adapter", "zebra", "--adapters-dir", str(ad), "--max-new-tokens", "8")
    assert with_adapter.returncode == 0, with_adapter.stderr
    assert "ZEBRA" in with_adapter.stdout
    assert "ZEBRA" not in pippin("generate", "Code word 7?", "--max-new-tokens", "8").stdout
    # Merged into the full-precision base, the dense model answers the same way.
    r = pippin("adapter", "merge", "zebra", "--adapters-dir", str(ad), "--out", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    assert "ZEBRA" in pippin("generate", "Code word 7?", "--model", str(tmp_path / "merged"), "--max-new-tokens", "8").stdout
    # Unknown and invalid adapters are one clear line.
    for name, msg in [("nope", "Unknown adapter 'nope'"), ("bad name", "Invalid adapter name"), ("../x", "not an adapter folder")]:
        r = pippin("generate", "hi", "--adapter", name, "--adapters-dir", str(ad))
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


@pytest.mark.real
@pytest.mark.slow
def test_recovery_adapter_distils_the_teachers_own_chat_replies(tmp_path):
    """--teacher-replies: the teacher answers the prompts itself (its greedy text, cached in the adapter folder), the
    adapter distils those chats and plain text; a second run reuses the cache instead of asking the teacher again."""
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Name a color number {i}.", "output": "DATASET"} for i in range(3)]))
    text = tmp_path / "text.txt"
    text.write_text("The river ran past the old mill and into the valley below. " * 20)
    ad = tmp_path / "adapters"
    args = ["adapter", "train", "rec", "--adapters-dir", str(ad), "--data", str(data), "--format", "alpaca", "--objective", "distill",
            "--teacher", "default", "--teacher-replies", "6", "--text-data", str(text), "--steps", "2", "--batch-size", "2",
            "--seq-len", "64", "--save-every", "1"]  # fmt: skip
    r = pippin(*args)
    assert r.returncode == 0, r.stderr
    cache = json.loads((ad / "rec" / "teacher_replies.json").read_text())
    plain = [json.loads(pippin("generate", f"Name a color number {i}.", "--max-new-tokens", "6", "--json").stdout) for i in range(3)]
    plain = [p["text"] for p in plain]
    assert list(cache["replies"].values()) == plain  # the teacher's own greedy replies, not the dataset's
    info = json.loads(pippin("adapter", "info", "rec", "--adapters-dir", str(ad), "--json").stdout)
    assert info["objective"] == "distill" and info["base_matches"] is True
    stamp = (ad / "rec" / "teacher_replies.json").stat().st_mtime_ns
    (ad / "rec" / "adapter_model.safetensors").unlink()
    r = pippin(*args)  # resumes from the checkpoint; the cached replies are not regenerated
    assert r.returncode == 0, r.stderr
    assert (ad / "rec" / "teacher_replies.json").stat().st_mtime_ns == stamp


@pytest.mark.real
def test_generate_with_a_draft_model_gives_the_plain_greedy_text():
    plain = json.loads(pippin("generate", "Name a fruit.", "--max-new-tokens", "12", "--json").stdout)
    r = pippin("generate", "Name a fruit.", "--max-new-tokens", "12", "--json", "--draft", "default", "--draft-k", "3")
    assert r.returncode == 0, r.stderr
    spec = json.loads(r.stdout)
    assert spec["text"] == plain["text"]
    assert spec["stats"]["acceptance_rate"] == 1.0  # the draft is the target itself: every proposal is kept


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda d: (d / "config.json").write_text('{"format": "pippin", "format_version": 1}'), 'has no "model" object'),
        (lambda d: (d / "config.json").write_text("[1, 2]"), 'has no "model" object'),
        (lambda d: (d / "tokenizer_config.json").write_text("{not json"), "is not a valid tokenizer config"),
        (lambda d: (d / "tokenizer_config.json").write_text('{"chat_template": 7}'), "is not a valid tokenizer config"),
    ],
)
def test_a_corrupt_checkpoint_is_one_clear_line(tmp_path, corrupt, message):
    """A config.json without its architecture or a broken tokenizer_config.json: one sentence, status 2 (a traceback
    before)."""
    from tests.serve.conftest import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "tiny")
    corrupt(folder)
    r = pippin("generate", "--model", str(folder), "hi", "--max-new-tokens", "2")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_full_disk_is_one_clear_line(monkeypatch, capsys):
    import errno

    import pippin.commands.info as info
    from pippin.cli import main

    def full(args):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOSPC, "No space left on device", "/models/out/model.safetensors")

    monkeypatch.setattr(info, "run", full)
    assert main(["info", "x"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device (/models/out/model.safetensors)" in err and len(err.strip().splitlines()) == 1


def test_a_hugging_face_folder_without_the_architecture_is_one_clear_line(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama"}')
    r = pippin("generate", "--model", str(tmp_path / "hf"), "hi")
    assert r.returncode == 2 and "is not a Hugging Face Llama-style config" in r.stderr and "Traceback" not in r.stderr
