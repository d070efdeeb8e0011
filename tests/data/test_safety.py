"""The harmlessness reward's prompt set: the train split only (no prompt of the safety suite's test split, by exact
text), the expected counts and expectations, and the same bytes from the same sources, in any row order."""

import csv
import json
import random

import pytest

from pippin.cli import main
from pippin.data.safety import build_safety_prompts, write_safety_prompts
from pippin.errors import PippinError
from pippin.eval.suite import Split
from pippin.eval.tasks.safety import ADVBENCH_FILE, XSTEST_FILE, load_items
from pippin.train.harmless import read_safety_prompts
from tests.conftest import SHARED_DATA

SOURCES = [SHARED_DATA.joinpath(*ADVBENCH_FILE), SHARED_DATA.joinpath(*XSTEST_FILE)]
# The split of the pinned files (sha256 in ../shared/data/*/SOURCE.md): train / validation / held-out test.
EXPECTED = {
    "train": {"advbench refuse": 192, "xstest comply": 87, "xstest refuse": 77},
    "validation": {"advbench refuse": 23, "xstest comply": 13, "xstest refuse": 11},
    "held-out test split (never written)": {"advbench": 305, "xstest safe": 150, "xstest unsafe": 112},
}

EXPECT = {"advbench": ("advbench", "refuse"), "xstest safe": ("xstest", "comply"), "xstest unsafe": ("xstest", "refuse")}


@pytest.fixture(scope="module")
def prompt_set():
    return build_safety_prompts(SHARED_DATA)


@pytest.fixture(scope="module")
def rows(prompt_set):
    return prompt_set.train + prompt_set.validation


def test_no_prompt_of_the_evaluated_split(rows):
    test_items, errors = load_items(*SOURCES)  # what `pippin eval safety` evaluates by default
    assert not errors and len(test_items) == 305 + 150 + 112
    assert not {r.prompt for r in rows} & {it.prompt for it in test_items}
    train_items, _ = load_items(*SOURCES, split=Split.TRAIN)
    assert sorted(r.prompt for r in rows) == sorted(it.prompt for it in train_items)  # and the whole train split
    every, _ = load_items(*SOURCES, split=Split.ALL)
    assert len(every) == 520 + 450 == len(test_items) + len(train_items)


def test_counts_and_expectations(prompt_set, rows):
    m = prompt_set.manifest
    assert m["counts"] == EXPECTED and (m["n_train"], m["n_validation"]) == (356, 47)
    assert len({r.id for r in rows}) == len({r.prompt for r in rows}) == len(rows) == 403
    every = {it.prompt: it for it in load_items(*SOURCES, split=Split.ALL)[0]}
    for r in rows:
        assert (r.source, r.expect) == EXPECT[every[r.prompt].group]
    assert not {r.prompt for r in prompt_set.train} & {r.prompt for r in prompt_set.validation}
    # Every XSTest type, safe and contrast, is trained on and (test_suites) evaluated.
    assert len(m["xstest_types"]) == 18 and all(c["train"] >= 6 for c in m["xstest_types"].values())
    assert m["sources"]["advbench/harmful_behaviors.csv"]["sha256"].startswith("6cd1a5c63c07")
    assert m["sources"]["xstest/xstest_prompts.csv"]["sha256"].startswith("11783fb294ed")


def test_same_bytes_from_the_same_sources_in_any_order(tmp_path, prompt_set):
    shuffled = tmp_path / "data"
    for source, parts in zip(SOURCES, (ADVBENCH_FILE, XSTEST_FILE)):
        with source.open(newline="") as f:
            reader = csv.reader(f)
            header, body = next(reader), list(reader)
        random.Random(0).shuffle(body)
        shuffled.joinpath(*parts).parent.mkdir(parents=True)
        with shuffled.joinpath(*parts).open("w", newline="") as f:
            csv.writer(f).writerows([header, *body])
    moved = build_safety_prompts(shuffled)
    assert sorted(r.prompt for r in moved.train) == sorted(r.prompt for r in prompt_set.train)
    assert sorted(r.prompt for r in moved.validation) == sorted(r.prompt for r in prompt_set.validation)

    a, b = write_safety_prompts(tmp_path / "a", prompt_set), write_safety_prompts(tmp_path / "b", build_safety_prompts(SHARED_DATA))
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)
    assert read_safety_prompts(a["train"]) == prompt_set.train and read_safety_prompts(a["validation"]) == prompt_set.validation


def test_cli_writes_the_set(tmp_path, capsys):
    out = tmp_path / "safety"
    assert main(["data", "safety", "--out", str(out), "--data", str(SHARED_DATA), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest == json.loads((out / "manifest.json").read_text()) and manifest["counts"] == EXPECTED
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.jsonl", "validation.jsonl"]
    first = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert list(first) == ["id", "prompt", "expect", "source"] and first["expect"] == "refuse"
    assert main(["data", "safety", "--out", str(tmp_path / "all-train"), "--data", str(SHARED_DATA), "--val-fraction", "0"]) == 0
    assert len(read_safety_prompts(tmp_path / "all-train" / "train.jsonl")) == 403


def test_bad_sources_are_errors(tmp_path):
    with pytest.raises(PippinError, match="does not exist"):
        build_safety_prompts(tmp_path)
    advbench, xstest = "goal,target\nMake a weapon,Sure\n,Sure\n", "id,prompt,type,label\n1,What is a coke?,homonyms,safe\n"
    sources = {ADVBENCH_FILE: advbench, XSTEST_FILE: xstest}
    for parts, text in sources.items():
        tmp_path.joinpath(*parts).parent.mkdir(parents=True)
        tmp_path.joinpath(*parts).write_text(text)
    with pytest.raises(PippinError, match=r"harmful_behaviors\.csv:3: malformed row"):
        build_safety_prompts(tmp_path)
    with pytest.raises(PippinError, match="val_fraction"):
        build_safety_prompts(SHARED_DATA, val_fraction=1.0)
