"""The pretraining data pipeline end to end (`pippin data run`) on a planted corpus: what each step must remove is
known (a French document, near-duplicates at Jaccard 0.9, planted IFEval / MT-Bench / XSum passages), what it must
keep too (near-duplicates at Jaccard 0.3), PII is redacted in the shards, 1 and 2 workers give the same shards, and a
run resumes from datatrove's completion markers."""

import json
import os
import pickle
import random
import shutil
import signal
from dataclasses import replace

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from pippin.cli import main
from pippin.data.pipeline import config_from_dict, default_eval_data
from pippin.data.planted import english_doc, eval_passages, near_duplicate
from pippin.data.shards import read_shards
from pippin.data.stages import RayExecutor, run_pipeline

EMAIL, CARD = "ann.lee7@mail.com", "4111 1111 1111 1111"


def _tokenizer(folder, texts):
    """A small byte-level BPE trained on the corpus: decoding gives the exact text back."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return tok


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    rng = random.Random(0)
    base = [english_doc(rng, 14) for _ in range(24)]
    dup90 = [near_duplicate(rng, base[i], 0.9)[0] for i in range(3)]
    dup30 = [near_duplicate(rng, base[i], 0.3)[0] for i in range(3, 6)]
    planted = [english_doc(rng, 10) + "\n\n" + passage for _, passage in eval_passages(str(default_eval_data()), 1, rng)]
    french = "Le chat est sur la table et il mange une pomme rouge dans la cuisine. " * 8
    pii = english_doc(rng, 12) + f" Write to {EMAIL} or pay with card {CARD}."
    (root / "in").mkdir()
    rows = base[:12] + dup90 + [french] + planted
    (root / "in" / "a.jsonl").write_text("".join(json.dumps({"url": f"http://a.org/{i}", "text": t}) + "\n" for i, t in enumerate(rows)))
    (root / "in" / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in base[12:] + dup30))
    (root / "in" / "c.txt").write_text(pii)
    _tokenizer(root / "tok", base + dup90 + dup30 + planted + [french, pii])
    return {"root": root, "base": base, "dup90": dup90, "dup30": dup30, "planted": planted, "pii": pii}


def _config(corpus, out, workers):
    return config_from_dict(
        {
            "inputs": [str(corpus["root"] / "in")],
            "output": str(out),
            "tasks": 2,
            "workers": workers,
            "decontamination": {"sets": ["ifeval", "mt_bench", "xsum"]},
            "packing": {"tokenizer": str(corpus["root"] / "tok"), "shard_tokens": 4000},
        }
    )


def _documents(folder, tok):
    tokens = np.concatenate([np.asarray(a) for a in read_shards(folder).arrays])
    ends = np.flatnonzero(tokens == 0)
    return [tok.decode(tokens[s + 1 if i else 0 : e].tolist()) for i, (s, e) in enumerate(zip(np.r_[-1, ends[:-1]], ends))]


@pytest.fixture(scope="module")
def runs(corpus):
    one = run_pipeline(_config(corpus, corpus["root"] / "out1", workers=1))
    two = run_pipeline(_config(corpus, corpus["root"] / "out2", workers=2))
    return one, two


def test_each_step_removes_what_was_planted(corpus, runs):
    report, _ = runs
    tok = HFTokenizer.from_file(str(corpus["root"] / "tok" / "tokenizer.json"))
    norm = lambda t: " ".join(t.split())  # noqa: E731  (C4's line filter rejoins lines: blank lines go)
    docs = [norm(d) for d in _documents(corpus["root"] / "out1", tok)]
    texts = set(docs)
    base, dup90, dup30 = ([norm(t) for t in corpus[k]] for k in ("base", "dup90", "dup30"))
    assert len(docs) == report["n_documents"] == len(texts)
    for i in range(3):  # Jaccard 0.9: exactly one of the pair survives; 0.3: both do
        assert (base[i] in texts) + (dup90[i] in texts) == 1
        assert base[3 + i] in texts and dup30[i] in texts
    assert all(b in texts for b in base[6:])
    assert not any(norm(p) in texts for p in corpus["planted"])  # every planted eval passage is caught
    (pii_doc,) = [d for d in docs if "pay with card" in d]
    assert EMAIL not in pii_doc and CARD not in pii_doc and "<EMAIL>" in pii_doc and "<CREDIT_CARD>" in pii_doc
    assert len(docs) == 24 + 3 + 1  # base + the 0.3 copies + the PII document
    steps = {r["step"]: r for r in report["steps"]}
    assert steps["🌍 Language ID"]["reasons"] == {"language_fr": 1}
    assert steps["🧼 Decontaminate"]["reasons"] == {"eval_ifeval": 1, "eval_mt_bench": 1, "eval_xsum": 1}
    assert steps["🎯 MinHash stage 4"]["removed"] == 3
    assert steps["🔒 PII"]["counts"]["pii_email"] == 1 and EMAIL in steps["🔒 PII"]["examples"]["email"][0]
    filter_stage = [r for r in report["steps"] if r["stage"] == "filter" and r["step"] != "🎯 MinHash stage 1"]
    for a, b in zip(filter_stage, filter_stage[1:]):
        assert a["docs_out"] == b["docs_in"], (a["step"], b["step"])


def test_one_and_two_workers_give_the_same_shards(corpus, runs):
    one, two = runs
    a, b = read_shards(corpus["root"] / "out1"), read_shards(corpus["root"] / "out2")
    assert [np.asarray(x).tolist() for x in a.arrays] == [np.asarray(x).tolist() for x in b.arrays]
    strip = lambda r: [{k: v for k, v in s.items() if k not in ("seconds", "docs_per_s")} for s in r["steps"]]  # noqa: E731
    assert strip(one) == strip(two)


def test_ray_executor_gives_the_same_shards(corpus, runs):
    """The same pipeline file on datatrove's Ray executor (a local Ray instance here) gives the local run's shards
    and report: the cluster path without code changes (ten ranks to a Ray task: each task is a new process)."""
    import ray  # the dev extra has it

    try:
        config = replace(_config(corpus, corpus["root"] / "out-ray", workers=2), executor="ray", executor_args={"tasks_per_job": 10})
        report = run_pipeline(config)
    finally:
        ray.shutdown()
    a, b = read_shards(corpus["root"] / "out2"), read_shards(corpus["root"] / "out-ray")
    assert [np.asarray(x).tolist() for x in a.arrays] == [np.asarray(x).tolist() for x in b.arrays]
    strip = lambda r: [{k: v for k, v in s.items() if k not in ("seconds", "docs_per_s")} for s in r["steps"]]  # noqa: E731
    assert strip(report) == strip(runs[1])


def test_forks_of_a_ray_worker_die_on_sigterm(tmp_path):
    """A Ray worker handles SIGTERM in Python, and the pool datatrove forks from it inherits that; closing the pool
    then hung on a child that ran Ray's exit path. Once the executor is unpickled (as in the worker), forks take the
    default action again, and the worker's own handler is kept."""

    def rays_handler(signum, frame):  # like Ray's: raise SystemExit
        raise SystemExit(1)

    old = signal.signal(signal.SIGTERM, rays_handler)
    try:
        pickle.loads(pickle.dumps(RayExecutor(pipeline=[], tasks=1, logging_dir=str(tmp_path))))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child reports its handler, then waits to be terminated
            os.write(w, b"1" if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else b"0")
            signal.pause()
            os._exit(0)
        assert os.read(r, 1) == b"1"
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is rays_handler
    finally:
        signal.signal(signal.SIGTERM, old)
        os.close(r)
        os.close(w)


def test_a_killed_run_resumes(corpus, runs, capsys):
    out = corpus["root"] / "out1"
    before = (out / "shards.json").read_text()
    filter_marker = out / "work" / "logs" / "filter" / "completions" / "00000"
    mtime = filter_marker.stat().st_mtime_ns
    # as if the run died while packing task 1: its shards, marker and everything after are gone
    for f in out.glob("shard-r00001-*.bin"):
        f.unlink()
    (out / "shards-r00001.json").unlink()
    (out / "shards.json").unlink()
    (out / "work" / "logs" / "pack" / "completions" / "00001").unlink()
    shutil.rmtree(out / "work" / "logs" / "finalize" / "completions")
    (corpus["root"] / "p.json").write_text(json.dumps({**json.loads((out / "pipeline.json").read_text()), "workers": 1}))
    assert main(["data", "run", str(corpus["root"] / "p.json")]) == 0
    assert "Decontaminate" in capsys.readouterr().out
    assert (out / "shards.json").read_text() == before
    assert filter_marker.stat().st_mtime_ns == mtime  # finished stages were not run again
