"""The fidelity measure and the quality gate on tiny models: KL and top-1 against a direct computation, perplexity
against cross-entropy, the smoke checkers on hand-written replies, and a gate that passes a copy of the reference
and refuses a deliberately broken model."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from pippin.errors import PippinError
from pippin.eval.fidelity import (
    DOMAINS,
    FidelityConfig,
    GateConfig,
    SmokeItem,
    Transcript,
    agreement,
    domain_text,
    load_smoke,
    perplexity,
    token_windows,
)
from pippin.eval.report import write_report
from pippin.eval.runner import GenerationCache
from pippin.eval.suite import EvalContext
from pippin.eval.tasks import suite_module
from tests.conftest import SHARED_DATA, tiny_model
from tests.eval.stubs import ByteTokenizer, last_user


class TinyTokenizer(ByteTokenizer):
    vocab_size = 256
    eos_ids = [0]


class TinySystem:
    """A tiny model's logits, with scripted replies (the suite's generation path is the runner's, tested elsewhere)."""

    def __init__(self, model, spec, reply=lambda prompt: "Tokyo"):  # noqa: ANN001
        self.model, self.spec, self.identity, self.reply = model, spec, spec, reply
        self.tokenizer = TinyTokenizer()

    @torch.no_grad()
    def logits(self, ids):  # noqa: ANN001, ANN201
        return self.model(ids)

    def generate(self, conversations, params):  # noqa: ANN001, ANN201
        return [self.reply(last_user(list(c))) for c in conversations]


@pytest.fixture
def data(tmp_path):
    """A small data folder in the shared layout: XSum, DialogSum, MT-Bench."""
    (tmp_path / "xsum").mkdir()
    (tmp_path / "dialogsum").mkdir()
    (tmp_path / "mt_bench").mkdir()
    words = ["the", "river", "runs", "past", "the", "old", "mill", "and", "the", "town", "sleeps", "under", "the", "hill"]
    with open(tmp_path / "xsum" / "test.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"document": " ".join(words[(i + j) % len(words)] for j in range(60))}) + "\n")
    with open(tmp_path / "dialogsum" / "dialogsum.test.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"dialogue": f"#Person1#: Hello {i}.\n#Person2#: Hi, how are you?"}) + "\n")
    (tmp_path / "ifeval").mkdir()
    rows = (SHARED_DATA / "ifeval" / "input_data.jsonl").read_text().splitlines()[:2]
    (tmp_path / "ifeval" / "input_data.jsonl").write_text("\n".join(rows) + "\n")
    with open(tmp_path / "mt_bench" / "question.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"question_id": i, "turns": [f"Tell me about rivers, part {i}."]}) + "\n")
    return tmp_path


def ctx_for(tmp_path, data, systems, against, limit=3):
    return EvalContext(systems=systems, against=against, data_dir=data, limit=limit, cache=GenerationCache(tmp_path / "c.jsonl"))


SMALL = FidelityConfig(window=64, n_tokens=256, chat_tokens=16, smoke_tokens=8)


@torch.no_grad()
def test_agreement_equals_a_direct_kl_and_argmax():
    ref, other = tiny_model(0), tiny_model(1)
    ts = [Transcript(ids=list(range(5, 25)), start=8), Transcript(ids=list(range(40, 52)), start=3)]
    (a,) = agreement(ref, [other], ts)
    kls, same, n = [], 0, 0
    for t in ts:
        x = torch.tensor([t.ids])
        lr = F.log_softmax(ref(x)[0, t.start - 1 : -1], -1)
        lp = F.log_softmax(other(x)[0, t.start - 1 : -1], -1)
        kls.append(F.kl_div(lp, lr, log_target=True, reduction="none").sum(-1))
        same += int((lr.argmax(-1) == lp.argmax(-1)).sum())
        n += len(lr)
    assert a.n_tokens == n == 12 + 9
    assert a.kl == pytest.approx(float(torch.cat(kls).mean()), rel=1e-5) and a.kl > 0.01
    assert a.top1 == pytest.approx(100 * same / n)
    (self_,) = agreement(ref, [ref], ts)
    assert self_.kl == pytest.approx(0, abs=1e-6) and self_.top1 == 100


@torch.no_grad()
def test_perplexity_is_exp_of_the_mean_cross_entropy():
    model = tiny_model(0)
    ids = list(range(3, 203))
    windows = token_windows(ids, window=64, n_tokens=150)
    assert [len(w) for w in windows] == [64, 64, 22] and sum(windows, []) == ids[:150]
    x = [torch.tensor([w]) for w in windows]
    nll = sum(F.cross_entropy(model(t)[0, :-1], t[0, 1:], reduction="sum").item() for t in x)
    assert perplexity(model, windows) == pytest.approx(math.exp(nll / (150 - 3)), rel=1e-5)


@pytest.mark.parametrize(
    ("item", "good", "bad"),
    [
        (SmokeItem(id="c", prompt="", any=["tokyo"]), "The capital is Tokyo.", "It is Kyoto."),
        (SmokeItem(id="u", prompt="", any=["HELLO"], case=True), "HELLO", "hello"),
        (SmokeItem(id="y", prompt="", any=[r"^\W*yes\b"]), "Yes, it is.", "Well, yes."),
        (SmokeItem(id="p", prompt="", primes_above=10, count=3), "1. 11\n2. 13\n3. 17", "11, 13 and 15"),
        (SmokeItem(id="p2", prompt="", primes_above=10, count=3), "11, 13, 17 and 19", "1, 2, 3, 11, 12, 13, 14, 17"),
        (SmokeItem(id="e", prompt="", evens=3), "2, 4, 6", "2, 4, 4, 5"),
        (SmokeItem(id="e2", prompt="", evens=3), "1) 2\n2) 4\n3) 8", "1, 2, 3, 4, 5, 6"),
        (SmokeItem(id="f", prompt="", at_least=3, of=["apple", "banana", "cherr"]), "Apples, bananas, cherries", "apple apple banana"),
        (SmokeItem(id="s", prompt="", any=[r"\bstar\b"], none=[r"is a planet"]), "The Sun is a star.", "The Sun is a planet, not a star."),
    ],
)
def test_smoke_checks(item, good, bad):
    assert item.check(good) and not item.check(bad) and not item.check("  ")


def test_the_smoke_set_is_large_and_every_item_checkable():
    items = load_smoke()
    assert len(items) >= 60 and len({it.id for it in items}) == len(items)
    assert all(it.any or it.all or it.at_least or it.primes_above is not None or it.evens for it in items)


def test_domains_are_held_out_text(data):
    texts = {d: domain_text(d, data) for d in DOMAINS}
    assert "river" in texts["news"] and "#Person1#" in texts["dialogue"] and "lambda" in texts["technical"]
    (data / "xsum" / "test.jsonl").write_text('{"summary": "no document"}\n')
    with pytest.raises(PippinError, match="without a 'document'"):
        domain_text("news", data)


def test_fidelity_suite_rows_and_numbers(tmp_path, data):
    base = tiny_model(0)
    noisy = copy.deepcopy(base)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref = TinySystem(base, "pippin:ref", reply=lambda prompt: "Rivers carry water to the sea.")
    same = TinySystem(copy.deepcopy(base), "pippin:same")
    off = TinySystem(noisy, "pippin:noisy", reply=lambda prompt: "")
    result = suite_module("fidelity").run(ctx_for(tmp_path, data, [same, off], ref), SMALL)
    m = result.metrics
    assert list(m) == ["pippin:ref", "pippin:same", "pippin:noisy"]
    for d in DOMAINS:
        assert m["pippin:same"][f"ppl {d}"] == pytest.approx(m["pippin:ref"][f"ppl {d}"], rel=1e-6)
    assert m["pippin:same"]["KL"] == pytest.approx(0, abs=1e-6) and m["pippin:same"]["top-1 %"] == 100
    assert m["pippin:noisy"]["KL"] > 1e-4 and m["pippin:noisy"]["worst ppl ×"] != 1
    # Scripted smoke replies: "Tokyo" passes only the Japan item among the first three; "" is empty everywhere.
    assert m["pippin:same"]["smoke %"] == pytest.approx(100 / 3) and m["pippin:same"]["empty %"] == 0
    assert m["pippin:noisy"]["smoke %"] == 0 and m["pippin:noisy"]["empty %"] == 100


def test_the_gate_passes_a_copy_and_refuses_a_broken_model(tmp_path, data):
    base = tiny_model(0)
    broken = copy.deepcopy(base)
    with torch.no_grad():
        broken.layers[0].mlp.down_proj.weight.mul_(8)  # a botched layer, as a bad quantization would leave it
    ref = TinySystem(base, "pippin:ref")
    good = TinySystem(copy.deepcopy(base), "pippin:copy")
    bad = TinySystem(broken, "pippin:broken")
    result = suite_module("gate").run(ctx_for(tmp_path, data, [good, bad], ref, limit=2), fidelity_config=SMALL)
    assert result.metrics["pippin:copy"]["gate"] == "pass" and result.settings["failures"]["pippin:copy"] == []
    assert result.metrics["pippin:broken"]["gate"] == "fail"
    reasons = " ".join(result.settings["failures"]["pippin:broken"])
    assert reasons.startswith("top-1 agreement 0.00 % < 90 %")
    assert "ifeval prompt strict %" in result.metrics["pippin:ref"]
    # `pippin eval gate` writes its report with a plot: the verdict column is text, so it is left out of the bars
    paths = write_report(result, tmp_path / "gate")
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")
    assert json.loads(paths["json"].read_text())["metrics"]["pippin:broken"]["gate"] == "fail"


def test_gate_thresholds():
    ref = {"ppl news": 10.0, "ppl dialogue": 10.0, "ppl technical": 10.0, "empty %": 1.0, "ifeval prompt strict %": 20.0}
    ok = {**ref, "top-1 %": 90.0, "ppl news": 11.0, "ifeval prompt strict %": 18.5}
    assert GateConfig().failures(ok, ref) == []
    assert GateConfig().failures({**ok, "ppl dialogue": 11.01}, ref) == ["dialogue perplexity 11.01 > 10.00 + 10%"]
    assert len(GateConfig().failures({**ok, "top-1 %": 89.9, "empty %": 1.5, "ifeval prompt strict %": 18.4}, ref)) == 3
    assert "top-1 agreement n/a" in GateConfig().failures({k: v for k, v in ok.items() if k != "top-1 %"}, ref)[0]


def test_summary_reads_the_report_that_compress_writes(tmp_path, data):
    from pippin.eval.fidelity import summary
    from pippin.eval.report import write_report

    assert summary(tmp_path / "none") is None
    base = tiny_model(0)
    ref = TinySystem(base, "pippin:ref")
    same = TinySystem(copy.deepcopy(base), "pippin:same")
    write_report(suite_module("fidelity").run(ctx_for(tmp_path, data, [same], ref), SMALL), tmp_path / "m" / "fidelity", plots=False)
    assert summary(tmp_path / "m") == "top-1 100.00 %, worst perplexity 1.00×, empty 0.00 %: meets the quality gate's fidelity checks"
    (tmp_path / "m" / "fidelity" / "results.json").write_text("{")
    assert summary(tmp_path / "m").startswith("unreadable fidelity report")


def test_fidelity_needs_logits_and_a_reference(tmp_path, data):
    from tests.eval.stubs import StubSystem

    ref = TinySystem(tiny_model(0), "pippin:ref")
    with pytest.raises(PippinError, match="must be a pippin model"):
        suite_module("fidelity").run(ctx_for(tmp_path, data, [StubSystem(spec="openai:x")], ref), SMALL)
    with pytest.raises(PippinError, match="needs a reference"):
        suite_module("fidelity").run(ctx_for(tmp_path, data, [ref], None), SMALL)
