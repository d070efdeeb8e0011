"""`pippin eval` through its argument parser: a run against a local OpenAI-compatible server (system and judge),
a second run served from the cache, bad flags, and one real run on the default model."""

import argparse
import json

import pytest

from pippin.commands import eval as eval_command
from pippin.errors import PippinError
from tests.conftest import SHARED_DATA
from tests.eval.stubs import ChatServer, completion


def pippin_eval(*argv):
    parser = argparse.ArgumentParser(prog="pippin eval")
    eval_command.add_arguments(parser)
    return eval_command.run(parser.parse_args([str(a) for a in argv]))


def answer(body, headers):
    text = body["messages"][-1]["content"]
    if "Rate the summary on each of these five dimensions" in text:
        dims = ("composition", "comprehensiveness", "groundedness", "following instructions", "harmfulness")
        return 200, completion("\n".join(f"{d}: good" for d in dims))
    return 200, completion("Two people talk about a memo.")


def test_eval_summarization_against_an_endpoint_then_from_the_cache(tmp_path, capsys):
    out = tmp_path / "run"
    with ChatServer(answer) as server:
        spec = f"openai:{server.url}#tiny"
        argv = ["summarization", "--system", spec, "--judge", spec, "--limit", 1, "--out", out, "--data", SHARED_DATA, "--no-progress"]
        assert pippin_eval(*argv, "--json") == 0
        n_requests = len(server.requests)
        assert n_requests == 4  # 2 summaries (DialogSum, XSum) + 2 judgments
        printed = json.loads(capsys.readouterr().out)
        assert printed["metrics"][spec]["good %"] == 100.0 and printed["errors"] == {}
        assert pippin_eval(*argv) == 0
        assert len(server.requests) == n_requests  # everything came from OUT/cache.jsonl
    assert "good %" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["cache.jsonl", "report.md", "results.json", "summarization.png"]
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["judge"] == spec and settings["cache"]["entries"] == 4 and settings["templates"][2]["id"] == "afm-summary-grader@v1"

    assert pippin_eval("report", "--results", out / "results.json", "--out", tmp_path / "merged", "--no-plots") == 0
    assert (tmp_path / "merged" / "report.md").is_file()


def test_eval_safety_split_flag(tmp_path):
    with ChatServer(lambda body, headers: (200, completion("I'm sorry, I can't help with that."))) as server:
        spec = f"openai:{server.url}#tiny"
        for split in ("test", "train"):
            out = tmp_path / split
            argv = ["safety", "--system", spec, "--limit", 1, "--out", out, "--data", SHARED_DATA, "--no-progress", "--no-plots"]
            assert pippin_eval(*argv, *(["--split", split] if split != "test" else []), "--json") == 0
            data = json.loads((out / "results.json").read_text())
            assert data["settings"]["split"] == split and {it["split"] for it in data["items"]} == {split}
            assert data["metrics"][spec]["advbench n"] == data["metrics"][spec]["xstest safe n"] == 1
    with pytest.raises(SystemExit):
        pippin_eval("safety", "--system", spec, "--split", "dev")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["ifeval"], "needs --system SPEC"),
        (["mtbench", "--system", "pippin:default"], "needs --judge SPEC"),
        (["preference", "--system", "pippin:default", "--judge", "pippin:default"], "needs --against SPEC"),
        (["ifeval", "--system", "llama:x"], "unknown kind 'llama'"),
        (["ifeval", "--system", "pippin:default", "--limit", "0"], "--limit must be at least 1"),
        (["ifeval", "--system", "pippin:default", "--data", "/nonexistent"], "No data folder at /nonexistent"),
        (["report"], "needs --results FILE"),
    ],
)
def test_bad_flags_are_clear_errors_before_any_model_loads(argv, message):
    with pytest.raises(PippinError, match=message):
        pippin_eval(*argv)


@pytest.mark.real
def test_ifeval_on_the_default_model(tmp_path):
    out = tmp_path / "real"
    argv = [
        "ifeval",
        "--system",
        "pippin:default",
        "--limit",
        2,
        "--max-new-tokens",
        8,
        "--threads",
        2,
        "--out",
        out,
        "--data",
        SHARED_DATA,
    ]
    assert pippin_eval(*argv, "--no-progress", "--no-plots") == 0
    data = json.loads((out / "results.json").read_text())
    row = data["metrics"]["pippin:default"]
    assert row["n prompts"] == 2 and 0.0 <= row["prompt loose %"] <= 100.0 and data["errors"] == []
    assert all(isinstance(item["response"], str) and item["response"] for item in data["items"])
    assert data["settings"]["sampling"]["max_new_tokens"] == 8 and data["settings"]["system_identities"][0].startswith("pippin:default@")
    assert len((out / "cache.jsonl").read_text().splitlines()) == 2
