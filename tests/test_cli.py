"""The `pippin` command end to end: real output on the default model, one clear line on bad input."""

import json
import subprocess
import sys

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
