"""The reward model: the soft-label Bradley-Terry loss and the grading loss against hand-computed values, reading
preference JSONL with clear errors, and training that learns a preference, reports held-out pair accuracy and
resumes after a kill."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pippin.errors import PippinError
from pippin.train.reward import (
    ASPECTS,
    LEVELS,
    PreferencePair,
    RewardConfig,
    RewardModel,
    encode_pairs,
    grading_loss,
    pair_accuracy,
    read_preferences,
    soft_bt_loss,
    train_reward,
)
from tests.conftest import tiny_model
from tests.serve.conftest import ascii_tokenizer


def test_soft_bt_loss_matches_the_formula_and_its_minimum_sits_at_the_label():
    d = torch.tensor([0.3, -1.2, 2.0])
    p = torch.tensor([0.95, 0.85, 0.65])
    want = sum(
        -pi * math.log(1 / (1 + math.exp(-di))) - (1 - pi) * math.log(1 / (1 + math.exp(di))) for di, pi in zip(d.tolist(), p.tolist())
    )
    torch.testing.assert_close(soft_bt_loss(d, torch.zeros(3), p), torch.tensor(want / 3))
    # A soft label is fitted, not pushed to infinity: the loss is smallest where sigmoid(d) = p.
    x = torch.zeros(1, requires_grad=True)
    soft_bt_loss(x + math.log(0.75 / 0.25), torch.zeros(1), torch.tensor([0.75])).backward()
    assert abs(float(x.grad)) < 1e-6
    assert [LEVELS[k] for k in ("significantly better", "better", "slightly better", "negligibly better")] == [0.95, 0.85, 0.75, 0.65]


def test_grading_loss_leaves_ungraded_rows_out():
    logits = {a: torch.randn(3, 3) for a in ASPECTS}
    targets = torch.tensor([[2, -1, 0, -1], [-1, -1, 1, -1], [0, -1, -1, -1]])
    want = torch.nn.functional.cross_entropy(logits[ASPECTS[0]][[0, 2]], torch.tensor([2, 0]))
    want = want + torch.nn.functional.cross_entropy(logits[ASPECTS[2]][[0, 1]], torch.tensor([0, 1]))
    torch.testing.assert_close(grading_loss(logits, targets), want)


def test_read_preferences_checks_every_line(tmp_path):
    good = {"prompt": "hi", "chosen": "hello!", "rejected": "go away", "level": "slightly better", "chosen_grades": {"harmlessness": 2}}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "prompt": [{"role": "user", "content": "yo"}]}) + "\n")
    pairs = read_preferences(path)
    assert pairs[0].messages == [{"role": "user", "content": "hi"}] and pairs[0].level == "slightly better"
    assert pairs[0].chosen_grades == {"harmlessness": 2} and pairs[1].messages[0]["content"] == "yo"
    for bad, msg in [
        ({**good, "level": "much better"}, "is not one of"),
        ({**good, "chosen": 3}, "needs string 'chosen'"),
        ({**good, "chosen_grades": {"humour": 1}}, "must map aspects"),
        ({**good, "rejected_grades": {"verbosity": 3}}, "must map aspects"),
    ]:
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(PippinError, match=msg) as e:
            read_preferences(path)
        assert "p.jsonl:2" in str(e.value)


def toy_pairs(n: int) -> list[PreferencePair]:
    """Chosen replies are polite ("please thank you"), rejected ones rude; both vary, graded on harmlessness."""
    import random

    rng = random.Random(0)
    words = ["cat", "sun", "tea", "map", "box", "pen", "hat", "cup"]
    out = []
    for i in range(n):
        topic = " ".join(rng.sample(words, 3))
        level = list(LEVELS)[i % 4]
        out.append(
            PreferencePair(
                messages=[{"role": "user", "content": f"tell me about {topic}"}],
                chosen=f"please, {rng.choice(words)} and {rng.choice(words)}, thank you",
                rejected=f"no. {rng.choice(words)} {rng.choice(words)} whatever",
                level=level,
                chosen_grades={"harmlessness": 2},
                rejected_grades={"harmlessness": 0},
            )
        )
    return out


def test_training_learns_a_preference_and_reports_held_out_accuracy(tmp_path):
    torch.manual_seed(0)
    rows = encode_pairs(ascii_tokenizer(), toy_pairs(60), max_len=128)
    model = RewardModel(tiny_model(seed=1))
    before = pair_accuracy(model, rows)
    cfg = RewardConfig(steps=40, batch_size=8, lr=1e-3, head_lr=3e-3, holdout=0.2, save_every=20)
    res = train_reward(model, rows, cfg, out_dir=tmp_path / "rm", progress=False)
    assert res.n_heldout == 12 and res.heldout_accuracy >= 0.9 > before
    assert sum(res.losses[-5:]) < sum(res.losses[:5])
    saved = json.loads((tmp_path / "rm" / "reward_result.json").read_text())
    assert saved["heldout_accuracy"] == res.heldout_accuracy and saved["config"]["steps"] == 40
    assert (tmp_path / "rm" / "reward_model.safetensors").is_file()


def test_a_killed_run_resumes_from_its_checkpoint_and_refuses_another_run(tmp_path, monkeypatch):
    rows = encode_pairs(ascii_tokenizer(), toy_pairs(20), max_len=128)
    cfg = RewardConfig(steps=6, batch_size=4, lr=1e-3, save_every=3)
    import pippin.train.checkpointing as ck

    saves = []
    real_save = ck.save_state

    def save_then_die(*a, **k):  # killed right after the step-3 checkpoint
        real_save(*a, **k)
        saves.append(k["step"])
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_reward(RewardModel(tiny_model(seed=1)), rows, cfg, out_dir=tmp_path / "rm", progress=False)
    monkeypatch.setattr(ck, "save_state", real_save)
    torch.manual_seed(0)
    resumed = train_reward(RewardModel(tiny_model(seed=1)), rows, cfg, out_dir=tmp_path / "rm", progress=False)
    torch.manual_seed(0)
    full = train_reward(RewardModel(tiny_model(seed=1)), rows, cfg, out_dir=tmp_path / "full", progress=False)
    assert saves == [3] and resumed.resumed_from == 3 and full.resumed_from == 0
    assert resumed.losses == pytest.approx(full.losses, rel=1e-4)
    # The same folder with another config is another run: refused, not silently continued.
    (tmp_path / "rm" / "reward_model.safetensors").unlink()
    other = RewardConfig(steps=6, batch_size=4, lr=5e-4, save_every=3)
    monkeypatch.setattr(ck, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_reward(RewardModel(tiny_model(seed=1)), rows, cfg, out_dir=tmp_path / "again", progress=False)
    monkeypatch.setattr(ck, "save_state", real_save)
    with pytest.raises(PippinError, match="different run"):
        train_reward(RewardModel(tiny_model(seed=1)), rows, other, out_dir=tmp_path / "again", progress=False)


def test_the_reward_command_trains_from_jsonl_and_reports_held_out_accuracy(tmp_path):
    import subprocess
    import sys

    from tests.serve.conftest import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "tiny")
    rows = [
        {"prompt": p.messages[0]["content"], "chosen": p.chosen, "rejected": p.rejected, "level": p.level, "chosen_grades": p.chosen_grades}
        for p in toy_pairs(40)
    ]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "pippin", "reward", "train", "--model", str(folder), "--data", str(tmp_path / "prefs.jsonl")]
    cmd += ["--out", str(tmp_path / "rm"), "--steps", "30", "--batch-size", "8", "--lr", "1e-3", "--head-lr", "3e-3", "--holdout", "0.25"]
    r = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n_heldout"] == 10 and out["heldout_accuracy"] >= 0.8
    assert json.loads((tmp_path / "rm" / "reward_result.json").read_text())["heldout_accuracy"] == out["heldout_accuracy"]
    bad = subprocess.run([*cmd[:-2], "--data", str(tmp_path / "nope.jsonl")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def ifeval_items(n: int, ids: tuple = ("punctuation:no_comma", "change_case:english_lowercase"), kwargs: tuple = ({}, {})):
    from pippin.eval.ifeval import IFEvalItem

    return [IFEvalItem(key=i, prompt=f"say hi {i}", instruction_id_list=list(ids), kwargs=list(kwargs)) for i in range(n)]


def test_verified_pairs_let_the_checkers_choose_and_round_trip(tmp_path):
    from pippin.train.reward import verified_pairs, write_preferences

    replies = {0: ["hello, world", "Hi, There"], 1: ["hello world", "Hi, There"]}  # sample k -> a reply per item
    pairs = verified_pairs(lambda convs, k: replies[k], ifeval_items(2), samples=2)
    assert len(pairs) == 1  # item 1: both samples break both rules, no pair
    p = pairs[0]
    assert (p.chosen, p.rejected, p.level) == ("hello world", "hello, world", "better")  # 2/2 against 1/2
    assert p.chosen_grades == {"instruction_following": 2} and p.rejected_grades == {"instruction_following": 1}
    write_preferences(tmp_path / "p.jsonl", pairs)
    assert read_preferences(tmp_path / "p.jsonl") == pairs
    with pytest.raises(PippinError, match="at least 2 samples"):
        verified_pairs(lambda convs, k: [], ifeval_items(1), samples=1)


def test_the_pairs_command_samples_a_model_and_keeps_what_the_checkers_rank(tmp_path):
    import subprocess
    import sys

    from pippin.eval.ifeval import check_response
    from tests.serve.conftest import make_tiny_folder

    folder = make_tiny_folder(tmp_path / "tiny")
    # The tiny model writes random letters: how many a's it writes varies from sample to sample.
    items = ifeval_items(8, ("keywords:letter_frequency",), ({"letter": "a", "let_frequency": 4, "let_relation": "at least"},))
    rows = [{"key": it.key, "prompt": it.prompt, "instruction_id_list": it.instruction_id_list, "kwargs": it.kwargs} for it in items]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "pippin", "reward", "pairs", "--model", str(folder), "--data", str(tmp_path / "items.jsonl")]
    cmd += ["--out", str(tmp_path / "prefs.jsonl"), "--samples", "4", "--max-new-tokens", "24"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pairs = read_preferences(tmp_path / "prefs.jsonl")
    assert pairs, r.stdout
    by_prompt = {it.prompt: it for it in items}
    for p in pairs:
        it = by_prompt[p.messages[0]["content"]]
        assert sum(check_response(it, p.chosen)) > sum(check_response(it, p.rejected))
