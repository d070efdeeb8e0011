"""The pretraining pipeline's parts, each against a reference: PII recall and precision on planted items (python-stdnum
and libphonenumber as the oracles of validity), language and safety filters, the evaluation n-gram index with short
texts, the reader's task split, merged shard indexes, and the pipeline file's validation."""

import json
import random

import numpy as np
import pytest
from datatrove.data import Document

from pippin.data.decontaminate import NGramIndex
from pippin.data.decontamination_steps import MIN_N, load_eval_index
from pippin.data.filters import LanguageFilter, SafetyFilter
from pippin.data.pii import find_pii, redact
from pippin.data.pipeline import check_run_folder, config_from_dict, default_eval_data
from pippin.data.planted import english_doc, jaccard, near_duplicate, pii_scores, plant_pii
from pippin.data.readers import InputReader, split_by_size, split_text
from pippin.data.shards import ShardWriter, merge_indexes, read_shards
from pippin.errors import PippinError

EVAL_DATA = default_eval_data()


def test_pii_recall_and_precision_on_planted_items():
    scores = pii_scores(plant_pii(random.Random(1), 120))
    for kind in ("email", "credit_card", "ip", "phone"):
        assert scores[kind]["planted"] >= 60
        assert scores[kind]["recall"] >= 0.98, (kind, scores[kind])
        assert scores[kind]["precision"] >= 0.95, (kind, scores[kind])


@pytest.mark.parametrize(
    "text, kinds",
    [
        ("pay with 4111 1111 1111 1111 today", ["credit_card"]),
        ("pay with 4111 1111 1111 1112 today", []),  # Luhn fails
        ("ISBN 9783161484100 is a book", []),  # Luhn-valid EAN-13 book number
        ("IBAN GB82 WEST 1234 5698 7654 32 please", ["iban"]),
        ("IBAN GB83 WEST 1234 5698 7654 32 please", []),  # mod-97 fails
        ("SSN 123-45-6789 on file", ["us_ssn"]),
        ("SSN 666-45-6789 on file", []),  # the SSA never issues 666
        ("server 8.8.8.8 and 192.168.1.1", ["ip"]),  # only the public address
        ("see RFC 2616 section 8.1.2.2 and OID 1.3.6.1.4.1", []),  # dotted numbers that are not addresses
        ("released 2024-01-05, version 3.11.2", []),
        # seen in Debian's man pages: a four-part version after a program's name
        ("unpacking (since dpkg 1.15.8.6). Currently", []),
        ("Version 2.0.0.1 and release 4.4.4.4 fixed it", []),
        ("forward -L 80:162.222.181.197:80 to ssh", ["ip"]),  # an address in the same man pages stays one
        ("since then the host 8.8.4.4 answers", ["ip"]),  # the cue word is too far from the number
        ("mail a.b-c@sub.example.org now", ["email"]),
        # false positives seen on Python's docs: a float printout, a constant (both Luhn- or phone-valid by chance)
        ("[1000, 873.9000000000001, 827.5]", []),
        ("up to 2**31 - 1 = 2147483647 items", []),
        ("call me at 2025550123 tonight", ["phone"]),  # a bare run after a word that says phone
        ("phone number: 2025550123", ["phone"]),
    ],
)
def test_pii_validators(text, kinds):
    assert [s.kind for s in find_pii(text)] == kinds


def test_redact_replaces_spans_with_tags():
    text = "write to ann@mail.com or call +44 20 7946 0958."
    assert redact(text, find_pii(text)) == "write to <EMAIL> or call <PHONE>."


def test_language_filter_keeps_english_drops_french():
    f = LanguageFilter(("en",))
    en, fr = (
        Document(text=english_doc(random.Random(0)), id="a"),
        Document(text="Le chat est sur la table et il mange une pomme rouge. " * 5, id="b"),
    )
    assert f.filter(en) is True and en.metadata["language"] == "en"
    assert f.filter(fr) == (False, "language_fr")


def test_safety_filter():
    f = SafetyFilter(max_profanity_ratio=0.01, min_profane_words=3)
    clean = english_doc(random.Random(0))
    assert f.filter(Document(text=clean, id="a")) is True
    assert f.filter(Document(text=clean + " fuck shit bitch asshole", id="b")) == (False, "profanity")
    assert f.filter(Document(text=clean, id="c", metadata={"url": "http://porn.example.com/x"})) == (False, "unsafe_url")


def test_ngram_index_matches_short_texts_whole():
    short = "Rewrite your previous response and start every sentence with A"  # 10 words < 13
    idx = NGramIndex([short], min_n=MIN_N, source="mt_bench")
    assert idx.shared("Blah blah. REWRITE your previous response, and start every sentence with a! More.") is not None
    assert idx.shared("rewrite your previous response and start every sentence") is None  # 8 of its 10 words
    assert NGramIndex([short]).grams == set()  # without min_n, as before: too short for a 13-gram
    assert idx.sources[next(iter(idx.grams))] == "mt_bench"


def test_eval_index_covers_every_set():
    index, counts = load_eval_index(str(EVAL_DATA), ("ifeval", "mt_bench"))
    assert counts == {"ifeval": 541, "mt_bench": 298}
    prompt = json.loads((EVAL_DATA / "ifeval" / "input_data.jsonl").read_text().splitlines()[7])["prompt"]
    assert {index.sources[g] for g in index.all_shared("Intro text. " + prompt)} == {"ifeval"}
    with pytest.raises(PippinError, match="unknown evaluation sets"):
        load_eval_index(str(EVAL_DATA), ("nope",))


def test_near_duplicate_hits_the_target_jaccard():
    rng = random.Random(0)
    doc = english_doc(rng, 20)
    for target in (0.9, 0.5):
        copy, j = near_duplicate(rng, doc, target)
        assert abs(j - target) < 0.03 and j == pytest.approx(jaccard(doc, copy))


def test_reader_splits_files_contiguously(tmp_path):
    for i, n in enumerate([5, 1, 1, 3]):
        (tmp_path / f"f{i}.jsonl").write_text(
            "".join(json.dumps({"text": f"doc {i}.{k}", "url": "u"}) + "\n" for k in range(n)) + "not json\n"
        )
    files = sorted(tmp_path.glob("*.jsonl"))
    runs = split_by_size(files, 2)
    assert runs[0] + runs[1] == files and runs[0] == files[:1]  # file 0 holds half the bytes
    reader = InputReader([str(tmp_path)])
    ids = [d.id for r in range(2) for d in reader.run(rank=r, world_size=2)]
    assert len(ids) == 10 and ids == sorted(ids, key=lambda s: (s.split(":")[0], int(s.split(":")[1])))
    assert split_text("a\n\nbb\n\ncc", 4) == ["a", "bb", "cc"] and split_text("abc", 0) == ["abc"]


def test_merged_index_reads_as_one_shard_set(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, size=int(rng.integers(3, 30))) for _ in range(20)]
    for r, part in enumerate((docs[:12], docs[12:])):
        w = ShardWriter(tmp_path, vocab_size=100, eos_id=0, shard_tokens=50, prefix=f"shard-r{r:05d}", index_name=f"part{r}.json")
        for d in part:
            w.add(d)
        w.close()
    merge_indexes(tmp_path, ["part0.json", "part1.json"])
    shards = read_shards(tmp_path)
    expected = np.concatenate([np.append(d, 0) for d in docs])
    assert shards.n_tokens == expected.size and shards.index["n_documents"] == 20
    assert np.array_equal(np.concatenate([np.asarray(a) for a in shards.arrays]), expected)
    with pytest.raises(PippinError, match="missing"):
        merge_indexes(tmp_path, ["part0.json", "part9.json"])


def test_pipeline_file_validation(tmp_path):
    with pytest.raises(PippinError, match="unknown keys"):
        config_from_dict({"inputs": ["x"], "output": "y", "dedupe": {}})
    with pytest.raises(PippinError, match="dedup has unknown keys"):
        config_from_dict({"inputs": ["x"], "output": "y", "dedup": {"bands": 3}})
    c = config_from_dict({"inputs": ["x"], "output": str(tmp_path), "dedup": None, "quality": {"c4": None}})
    assert c.dedup is None and c.quality.c4 is None and c.quality.fineweb == {}
    check_run_folder(c)
    check_run_folder(config_from_dict({"inputs": ["x"], "output": str(tmp_path), "dedup": None, "quality": {"c4": None}, "workers": 1}))
    with pytest.raises(PippinError, match="other settings"):
        check_run_folder(config_from_dict({"inputs": ["x"], "output": str(tmp_path), "tasks": 3}))


def test_the_same_file_builds_slurm_stages(tmp_path):
    from pippin.data.stages import make_executors

    base = {"inputs": [str(tmp_path)], "output": str(tmp_path / "out")}
    local = make_executors(config_from_dict(base).resolved())
    slurm = make_executors(
        config_from_dict({**base, "executor": "slurm", "executor_args": {"partition": "cpu", "time": "2:00:00"}}).resolved()
    )
    assert [type(e).__name__ for e in slurm] == ["SlurmPipelineExecutor"] * 5
    assert [e.world_size for e in slurm] == [e.world_size for e in local] == [2, 20, 1, 2, 1]
    assert [[type(s) for s in e.pipeline] for e in slurm] == [[type(s) for s in e.pipeline] for e in local]
    assert all(b.depends is a for a, b in zip(slurm, slurm[1:]))
