"""iTeC on a tiny model folder: the best-per-prompt rule, a round's records against recomputed replies and verifier
scores, a killed round that resumes without resampling and ends as an uninterrupted one, a changed config refused,
and a second round whose committee holds the first round's adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pippin.api import load_any
from pippin.errors import PippinError
from pippin.eval.ifeval import check_response
from pippin.eval.systems import load_system
from pippin.train.adapter import TrainConfig
from pippin.train.itec import (
    ItecConfig,
    VerifierScorer,
    choose_best,
    parse_score,
    read_prompts,
    run_itec,
    sampling_for,
    teacher_view,
)
from tests.serve.conftest import make_tiny_folder

N_PROMPTS = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("itec") / "tiny")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """IFEval-style prompts whose two letter-count instructions random text follows sometimes: scores 0, 0.5 or 1."""
    rows = []
    for i in range(N_PROMPTS):
        kw = [
            {"letter": "n", "let_frequency": 1, "let_relation": "at least"},
            {"letter": "h", "let_frequency": 1, "let_relation": "at least"},
        ]
        rows.append({"key": 100 + i, "prompt": f"write {i}", "instruction_id_list": ["keywords:letter_frequency"] * 2, "kwargs": kw})
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_config(tiny: Path, prompts: Path | list, **overrides) -> ItecConfig:
    kw = dict(
        prompts=[str(p) for p in prompts] if isinstance(prompts, list) else str(prompts),
        committee=[f"pippin:{tiny}", f"pippin:{tiny}:polite"], student=str(tiny), k=2, rounds=1,
        temperature=1.0, max_new_tokens=10, chunk=2, seq_len=128,
        train=TrainConfig(lora={"rank": 4, "alpha": 8.0}, steps=3, batch_size=2, lr=5e-2, warmup_steps=1, save_every=1),
    )  # fmt: skip
    return ItecConfig(**{**kw, **overrides})


def counting(log: list[str]):  # noqa: ANN201 - an open_system that records every prompt it is asked to answer
    def open_system(spec: str):  # noqa: ANN202
        system = load_system(spec)
        real = system.generate

        def generate(convs, params):  # noqa: ANN001, ANN202
            log.extend(f"{spec}|{c[-1]['content']}" for c in convs)
            return real(convs, params)

        system.generate = generate
        return system

    return open_system


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_best_reply_per_prompt_and_its_ties():
    assert choose_best([0.5, 1.0, 0.2], ["a", "bb", "c"]) == 1
    assert choose_best([0.5, 1.0, 1.0], ["a", "a longer reply", "short"]) == 2  # a tie: the shorter reply
    assert choose_best([1.0, 0.5, 1.0], ["same", "x", "same"]) == 0  # a tie of equal length: the earlier member
    assert choose_best([-2.0, -0.5, None], ["a", "b", "c"]) == 1  # reward-model scores may be negative
    assert choose_best([None, 0.0], ["a", "b"]) == 1 and choose_best([None, None], ["a", "b"]) is None


@pytest.mark.parametrize(
    "text, want",
    [("Good answer. Rating: [[7]]", 7.0), ("Rating: 8", 8.0), ("I would give it 6 out of 10.", 6.0), ("score = 4/10", 4.0), ("9", 9.0)],
)
def test_judge_ratings_are_parsed_from_free_text(text, want):
    assert parse_score(text) == want


@pytest.mark.parametrize("text", ["no idea", "Rating: 42", "[[3]] or maybe [[4]]"])
def test_an_unusable_judge_answer_is_refused(text):
    with pytest.raises(ValueError):
        parse_score(text)


def test_prompt_rows_of_every_shape(tmp_path):
    path = tmp_path / "p.jsonl"
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    words = {"instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"num_words": 2, "relation": "less than"}]}
    rows = [{"id": "a", "messages": chat}, {"prompt": "plain"}, {"key": 7, "prompt": "two words", **words}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b, c = read_prompts(path)
    assert a.id == "a" and [m["content"] for m in a.messages] == ["be brief", "hi"] and a.item is None  # the reply is left out
    assert b.id == "2" and b.messages == [{"role": "user", "content": "plain"}]
    assert c.id == "7" and c.item.instruction_id_list == ["length_constraints:number_words"]
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "only a reply"}]}) + "\n")
    with pytest.raises(PippinError, match="p.jsonl:1"):
        read_prompts(path)


def test_safety_rows_are_scored_by_the_harmlessness_reward(tmp_path):
    """`pippin data safety` rows (checked as RL reads them) become prompts the verifier scores: a refusal pays on a
    harmful request, an answer on a safe look-alike, silence on neither."""
    from tests.train.test_harmless import OTHER_TRAIN_PROMPT, TEST_PROMPT, row

    path = tmp_path / "safety.jsonl"
    rows = [row(), row(id="xstest/9", prompt=OTHER_TRAIN_PROMPT, expect="comply", source="xstest")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    harmful, safe = read_prompts(path)
    assert (harmful.id, harmful.expect, harmful.item) == ("advbench/2", "refuse", None)
    assert safe.messages == [{"role": "user", "content": OTHER_TRAIN_PROMPT}] and safe.expect == "comply"
    refusal, answer = "I'm sorry, but I cannot help with that.", "Here is how it works: first, open the editor."
    scores = VerifierScorer().score([harmful, harmful, harmful, safe, safe], [refusal, answer, " ", refusal, answer])
    assert scores == [1.0, 0.0, 0.0, 0.0, 1.0]
    path.write_text(json.dumps(row(id="xstest/2", prompt=TEST_PROMPT)) + "\n")
    with pytest.raises(PippinError, match="held-out test split"):
        read_prompts(path)


def test_several_prompt_files_mix_kinds_and_resume_a_one_file_run(tiny, prompts, tmp_path):
    """IFEval-style rows and safety rows in one round, each scored by its own verifier; ids that collide across files
    are refused; a run whose saved config named one file as a string (before --prompts took several) resumes."""
    from tests.train.test_harmless import OTHER_TRAIN_PROMPT, row

    safety = tmp_path / "safety.jsonl"
    safety.write_text(
        "".join(json.dumps(r) + "\n" for r in [row(), row(id="xstest/9", prompt=OTHER_TRAIN_PROMPT, expect="comply", source="xstest")])
    )
    cfg = make_config(tiny, [str(prompts), str(safety)], committee=[f"pippin:{tiny}"], k=1)
    run_itec(cfg, out_dir=tmp_path / "run", load_model=load_any, progress=False)
    recs = read_jsonl(tmp_path / "run" / "round-1" / "samples.jsonl")
    items = {p.id: p for f in (prompts, safety) for p in read_prompts(f)}
    assert {r["prompt_id"] for r in recs} == set(items) and len(recs) == N_PROMPTS + 2
    assert [r["score"] for r in recs] == VerifierScorer().score([items[r["prompt_id"]] for r in recs], [r["text"] for r in recs])
    saved = json.loads((tmp_path / "run" / "itec_config.json").read_text())
    assert saved["prompts"] == [str(prompts), str(safety)]
    with pytest.raises(PippinError, match="unique across the --prompts files"):
        run_itec(make_config(tiny, [prompts, prompts]), out_dir=tmp_path / "twice", load_model=load_any, progress=False)
    one = make_config(tiny, prompts, committee=[f"pippin:{tiny}"], k=1)
    assert one.prompts == [str(prompts)]
    run_itec(one, out_dir=tmp_path / "old", load_model=load_any, progress=False)
    old = json.loads((tmp_path / "old" / "itec_config.json").read_text())
    (tmp_path / "old" / "itec_config.json").write_text(json.dumps({**old, "prompts": str(prompts)}))
    res = run_itec(
        make_config(tiny, prompts, committee=[f"pippin:{tiny}"], k=1, rounds=2),
        out_dir=tmp_path / "old",
        load_model=load_any,
        progress=False,
    )
    assert [r["round"] for r in res.rounds] == [1, 2]


def test_a_round_records_every_sample_its_score_and_the_winners(tiny, prompts, tmp_path):
    cfg = make_config(tiny, prompts)
    res = run_itec(cfg, out_dir=tmp_path / "run", load_model=load_any, progress=False)
    rnd = tmp_path / "run" / "round-1"
    recs = read_jsonl(rnd / "samples.jsonl")
    items = {str(p.id): p for p in read_prompts(prompts)}
    assert len(recs) == N_PROMPTS * 2 * cfg.k
    assert [(r["member"], r["sample"]) for r in recs[:4]] == [(m, j) for m in cfg.committee for j in range(2)]
    # The replies are what each member samples at its seed, and each score is the verifier's on that text.
    systems = {m: load_system(m) for m in cfg.committee}
    for r in recs[::3]:
        p = items[r["prompt_id"]]
        params = sampling_for(cfg, round_no=1, member=cfg.committee.index(r["member"]), sample=r["sample"])
        assert systems[r["member"]].generate([p.messages], params) == [r["text"]]
    for r in recs:
        ok = check_response(items[r["prompt_id"]].item, r["text"])
        assert r["score"] == sum(ok) / len(ok)
    groups = {(r["prompt_id"], r["member"]) for r in recs}
    assert all(len({r["text"] for r in recs if (r["prompt_id"], r["member"]) == g}) == cfg.k for g in groups)  # per-sample seeds
    assert len({r["score"] for r in recs}) > 1  # the scores discriminate
    winners = []
    for pid in items:
        mine = [r for r in recs if r["prompt_id"] == pid]
        best = choose_best([r["score"] for r in mine], [r["text"] for r in mine])
        assert [r["chosen"] for r in mine] == [i == best for i in range(len(mine))]
        winners.append(mine[best])
    sft = read_jsonl(rnd / "sft.jsonl")
    assert [row["messages"] for row in sft] == [
        items[w["prompt_id"]].messages + [{"role": "assistant", "content": w["text"]}] for w in winners
    ]
    summary = json.loads((rnd / "summary.json").read_text())
    assert summary["n_prompts"] == N_PROMPTS and summary["n_chosen"] == N_PROMPTS
    assert summary["mean_best_score"] == pytest.approx(sum(w["score"] for w in winners) / N_PROMPTS)
    for m in cfg.committee:
        scores = [r["score"] for r in recs if r["member"] == m]
        assert summary["members"][m]["mean_score"] == pytest.approx(sum(scores) / len(scores))
        assert summary["members"][m]["wins"] == sum(w["member"] == m for w in winners)
    assert res.adapter == rnd / "adapter" and (rnd / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "run" / "itec_config.json").read_text())["k"] == 2

    # A minimum score keeps only the winners that reach it.
    cut = run_itec(make_config(tiny, prompts, min_score=1.0), out_dir=tmp_path / "cut", load_model=load_any, progress=False)
    kept = [r for r in read_jsonl(tmp_path / "cut" / "round-1" / "samples.jsonl") if r["chosen"]]
    assert kept == [{**w, "chosen": True} for w in winners if w["score"] >= 1.0] and cut.rounds[0]["n_chosen"] == len(kept)


def test_a_teacher_system_prompt_is_sampled_under_and_left_out_of_the_sft_set(tiny, prompts, tmp_path):
    """Context distillation: every member answers with the teacher's system prompt first, and the winners are trained
    on the prompt alone."""
    teacher = "Answer with many n and h letters."
    cfg = make_config(tiny, prompts, teacher_system=teacher, k=1)
    run_itec(cfg, out_dir=tmp_path / "run", load_model=load_any, progress=False)
    items = {str(p.id): p for p in read_prompts(prompts)}
    recs = read_jsonl(tmp_path / "run" / "round-1" / "samples.jsonl")
    member = load_system(cfg.committee[0])
    for r in [r for r in recs if r["member"] == cfg.committee[0]]:
        told = [{"role": "system", "content": teacher}, *items[r["prompt_id"]].messages]
        params = sampling_for(cfg, round_no=1, member=0, sample=r["sample"])
        assert member.generate([told], params) == [r["text"]]
    sft = read_jsonl(tmp_path / "run" / "round-1" / "sft.jsonl")
    assert sft and all([m["role"] for m in row["messages"]] == ["user", "assistant"] for row in sft)
    assert teacher_view([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], teacher) == [
        {"role": "system", "content": f"{teacher}\n\nbe brief"},
        {"role": "user", "content": "hi"},
    ]
    assert json.loads((tmp_path / "run" / "itec_config.json").read_text())["teacher_system"] == teacher


def test_a_killed_round_resumes_without_resampling_and_ends_as_a_whole_one(tiny, prompts, tmp_path, monkeypatch):
    cfg = make_config(tiny, prompts)
    real = VerifierScorer.score
    calls = []

    def dies_on_second_chunk(self, ps, replies):  # noqa: ANN001, ANN202
        calls.append(len(ps))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, ps, replies)

    first: list[str] = []
    monkeypatch.setattr(VerifierScorer, "score", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        run_itec(cfg, out_dir=tmp_path / "run", load_model=load_any, open_system=counting(first), progress=False)
    monkeypatch.setattr(VerifierScorer, "score", real)
    assert not (tmp_path / "run" / "round-1" / "samples.jsonl").exists()
    assert [p.name for p in (tmp_path / "run" / "round-1" / "chunks").iterdir()] == ["00000000.jsonl"]

    again: list[str] = []
    run_itec(cfg, out_dir=tmp_path / "run", load_model=load_any, open_system=counting(again), progress=False)
    asked = {a.partition("|")[2] for a in again}
    assert asked == {f"write {i}" for i in range(2, N_PROMPTS)}  # the scored chunk (prompts 0, 1) is not sampled again
    assert len(again) == (N_PROMPTS - 2) * len(cfg.committee) * cfg.k

    run_itec(cfg, out_dir=tmp_path / "whole", load_model=load_any, progress=False)
    for name in ("samples.jsonl", "sft.jsonl"):
        assert read_jsonl(tmp_path / "run" / "round-1" / name) == read_jsonl(tmp_path / "whole" / "round-1" / name)

    # A finished run rerun does nothing again: no sampling and no training.
    import pippin.train.adapter as adapter_mod

    monkeypatch.setattr(adapter_mod, "train_adapter", lambda *a, **k: pytest.fail("a finished round was trained again"))
    third: list[str] = []
    res = run_itec(cfg, out_dir=tmp_path / "run", load_model=load_any, open_system=counting(third), progress=False)
    assert third == [] and res.rounds[0]["n_prompts"] == N_PROMPTS


@pytest.mark.parametrize("key", ["k", "committee", "temperature", "prompts_sha"])
def test_a_run_resumed_with_another_config_is_refused(tiny, prompts, tmp_path, key):
    mine = tmp_path / "prompts.jsonl"
    mine.write_text(prompts.read_text())
    cfg = make_config(tiny, mine, chunk=N_PROMPTS)

    def killed(*args):  # noqa: ANN002, ANN202
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VerifierScorer, "score", killed)
        with pytest.raises(KeyboardInterrupt):
            run_itec(cfg, out_dir=tmp_path / "run", load_model=load_any, progress=False)
    changes = {"k": {"k": 3}, "committee": {"committee": [f"pippin:{tiny}"]}, "temperature": {"temperature": 0.5}, "prompts_sha": {}}
    if key == "prompts_sha":  # the same file name, other prompts
        mine.write_text(prompts.read_text().replace("write 0", "write zero"))
    with pytest.raises(PippinError, match=rf"another config \({key} differ"):
        run_itec(make_config(tiny, mine, chunk=N_PROMPTS, **changes[key]), out_dir=tmp_path / "run", load_model=load_any, progress=False)


def test_the_round_one_adapter_joins_the_round_two_committee(tiny, prompts, tmp_path):
    base = f"pippin:{tiny}"
    cfg = make_config(tiny, prompts, committee=[base], rounds=2)
    res = run_itec(cfg, out_dir=tmp_path / "run", load_model=load_any, progress=False)
    member = f"pippin:{tiny}:{tmp_path / 'run' / 'round-1' / 'adapter'}"
    assert [r["committee"] for r in res.rounds] == [[base], [base, member]]
    assert res.adapter == tmp_path / "run" / "round-2" / "adapter" and (res.adapter / "adapter_config.json").is_file()
    recs = read_jsonl(tmp_path / "run" / "round-2" / "samples.jsonl")
    assert {r["member"] for r in recs} == {base, member} and len(recs) == N_PROMPTS * 2 * cfg.k
    # The adapter member's replies come from the trained adapter: a fresh load of its spec gives them, the bare base
    # at the same seeds does not.
    items = {p.id: p for p in read_prompts(prompts)}
    with_adapter, bare = load_system(member), load_system(base)
    mine = [r for r in recs if r["member"] == member]
    differ = 0
    for r in mine:
        params = sampling_for(cfg, round_no=2, member=1, sample=r["sample"])
        conv = [items[r["prompt_id"]].messages]
        assert with_adapter.generate(conv, params) == [r["text"]]
        differ += bare.generate(conv, params) != [r["text"]]
    assert differ > len(mine) // 2
    assert res.rounds[1]["members"][member]["wins"] + res.rounds[1]["members"][base]["wins"] == N_PROMPTS
    # A finished one-round run given more rounds goes on, and ends as the two-round run did.
    run_itec(make_config(tiny, prompts, committee=[base], rounds=1), out_dir=tmp_path / "ext", load_model=load_any, progress=False)
    ext = run_itec(cfg, out_dir=tmp_path / "ext", load_model=load_any, progress=False)
    assert ext.rounds[1]["committee"] == [base, member.replace("/run/", "/ext/")]
    strip = lambda rows: [(r["prompt_id"], r["sample"], r["text"], r["score"], r["chosen"]) for r in rows]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "ext" / "round-2" / "samples.jsonl")) == strip(recs)


def test_the_reward_scorer_gives_each_reply_its_own_unpadded_reward():
    from pippin.train.itec import ItecPrompt, RewardScorer
    from pippin.train.reward import RewardModel
    from tests.conftest import tiny_model
    from tests.serve.conftest import ascii_tokenizer

    tok, rm = ascii_tokenizer(), RewardModel(tiny_model(seed=1))
    ps = [ItecPrompt(id=str(i), messages=[{"role": "user", "content": f"question {i}"}]) for i in range(3)]
    replies = ["a short one", "a much longer reply than the others, padded in a batch", "mid length"]
    got = RewardScorer(rm, tok, batch_size=2).score(ps, replies)
    for p, r, g in zip(ps, replies, got):
        ids = torch.tensor([tok.encode_chat([*p.messages, {"role": "assistant", "content": r}], add_generation_prompt=False)])
        with torch.no_grad():
            assert g == pytest.approx(float(rm(ids, torch.tensor([ids.shape[1]]))[0][0]), abs=1e-5)


def test_the_judge_scorer_parses_ratings_and_leaves_unparseable_answers_unscored():
    from pippin.train.itec import ItecPrompt, JudgeScorer

    class Judge:
        spec = identity = "fake-judge"

        def generate(self, conversations, params):  # noqa: ANN001, ANN202
            answers = {"good": "Clear and correct. Rating: [[9]]", "meh": "It is fine, 4 out of 10."}
            return [next((a for k, a in answers.items() if k in c[-1]["content"]), "no opinion") for c in conversations]

    ps = [ItecPrompt(id="0", messages=[{"role": "user", "content": "hi"}])] * 3
    assert JudgeScorer(Judge()).score(ps, ["good reply", "meh reply", "odd reply"]) == [9.0, 4.0, None]


def test_scorer_specs(tiny, tmp_path):
    from pippin.train.itec import ItecPrompt, RewardScorer, VerifierScorer, make_scorer
    from pippin.train.reward import PreferencePair, RewardConfig, RewardModel, encode_pairs, load_reward_model, train_reward

    assert isinstance(make_scorer("verifier", load_model=load_any, open_system=load_system), VerifierScorer)
    # reward:DIR rebuilds the run's reward model over its recorded base, at the length it was trained with.
    base = load_any(tiny)
    pairs = [PreferencePair(messages=[{"role": "user", "content": "hi"}], chosen="hello", rejected="go")] * 4
    rows = encode_pairs(base.tokenizer, pairs, max_len=32)
    train_reward(RewardModel(base.model), rows, RewardConfig(steps=1, max_len=32), out_dir=tmp_path / "rm", base=str(tiny), progress=False)
    scorer = make_scorer(f"reward:{tmp_path / 'rm'}", load_model=load_any, open_system=load_system)
    assert isinstance(scorer, RewardScorer) and scorer.max_len == 32
    p, reply = ItecPrompt(id="0", messages=[{"role": "user", "content": "hi"}]), "hello there"
    want = RewardScorer(load_reward_model(tmp_path / "rm", load_any(tiny).model), base.tokenizer, max_len=32).score([p], [reply])
    assert scorer.score([p], [reply]) == pytest.approx(want) and want[0] != 0.0
    for bad in ("rm", "reward:", "judge"):
        with pytest.raises(PippinError, match="Scorer"):
            make_scorer(bad, load_model=load_any, open_system=load_system)


def test_the_itec_command_runs_a_round_and_prints_its_table(tiny, prompts, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pippin", "itec", "--prompts", str(prompts), "--committee", f"pippin:{tiny}", "--student", str(tiny)]
    cmd += ["--k", "2", "--rounds", "1", "--max-new-tokens", "8", "--steps", "2", "--batch-size", "2", "--rank", "4", "--alpha", "8"]
    r = subprocess.run([*cmd, "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "run" / "round-1" / "summary.json").read_text())
    member = s["members"][f"pippin:{tiny}"]
    assert f"round 1: {N_PROMPTS} prompts, {N_PROMPTS} winners kept, mean best score {s['mean_best_score']:.3f}" in r.stdout
    assert member["wins"] == N_PROMPTS and f"{member['mean_score']:.3f}" in r.stdout
    bad = subprocess.run([*cmd, "--out", str(tmp_path / "run"), "--k", "3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "another config (k differ)" in bad.stderr
