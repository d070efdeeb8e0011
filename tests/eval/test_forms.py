"""Forced-choice answers: the cached engine path equals a full-forward reference, forms render what the parsers
read, and judges that can fill forms always give a verdict (cached like generations) while endpoints answer freely."""

import pytest
import torch

from pippin.engine.constrained import check_prefix_free, choose
from pippin.engine.engine import Engine
from pippin.engine.sampling import SamplingParams
from pippin.errors import PippinError
from pippin.eval.forms import AFM_GRADES_FORM, SAFETY_FORM, VERDICT_FORM, AnswerForm, Choice, afm_expected, criteria_form, rating_form
from pippin.eval.judges import (
    Criterion,
    JudgeConfig,
    judge_all,
    parse_afm_grades,
    parse_criteria_scores,
    parse_rating,
    parse_safety_class,
    parse_verdict,
)
from pippin.eval.prompts import AFM_DIMENSIONS
from pippin.eval.runner import GenerationCache, Request, run_requests
from pippin.eval.systems import PippinSystem
from tests.conftest import tiny_model
from tests.eval.stubs import ByteTokenizer, StubSystem

QUESTION = [{"role": "user", "content": "Grade this."}]


def reference_choose(model, prompt, segments):
    """Each option's log-likelihood from a full forward over prompt + text so far + option (no cache)."""
    seq, out = list(prompt), []
    for seg in segments:
        if seg and isinstance(seg[0], int):
            seq += seg
            continue
        logps = []
        for o in seg:
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([seq + o]))[0], dim=-1)
            logps.append(sum(float(logp[len(seq) - 1 + t, tok]) for t, tok in enumerate(o)))
        logps = torch.tensor(logps)
        pick = int(torch.argmax(logps))
        out.append((pick, torch.softmax(logps, dim=0)))
        seq += seg[pick]
    return out


@pytest.mark.parametrize("seed", range(4))
def test_cached_choice_equals_full_forward_reference(seed):
    model = tiny_model(seed)
    engine = Engine(model, max_len=128)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (9,), generator=g).tolist()
    # Options sharing first tokens, of different lengths, several choices with forced text between them.
    segments = [
        [10, 11],
        [[5, 6, 7], [5, 8], [9]],
        [12],
        [[1, 2], [1, 3, 4], [2, 2], [3]],
        [[40], [41], [42], [43], [44]],
    ]
    got = choose(engine, prompt, segments)
    want = reference_choose(model, prompt, segments)
    assert [c.index for c in got] == [w[0] for w in want]
    for c, (_, probs) in zip(got, want):
        torch.testing.assert_close(torch.tensor(c.probs), probs, atol=1e-4, rtol=1e-4)
        assert abs(sum(c.probs) - 1) < 1e-5


class Biased(torch.nn.Module):
    def __init__(self, head, bias):
        super().__init__()
        self.head, self.bias = head, bias

    def forward(self, x):
        return self.head(x) + self.bias


@pytest.mark.parametrize("winner", [0, 1, 2])
def test_the_option_the_model_prefers_wins(winner):
    model = tiny_model(0)
    options = [[70, 5], [71], [72, 6, 7]]
    bias = torch.zeros(256)
    bias[options[winner]] = 100.0  # the model now strongly prefers the winner's tokens
    model.lm_head = Biased(model.lm_head, bias)
    (chosen,) = choose(Engine(model, max_len=64), [1, 2, 3], [options])
    assert chosen.index == winner and chosen.probs[winner] > 0.99


def test_options_must_be_prefix_free_and_fit_the_context():
    with pytest.raises(PippinError, match="is a token prefix of"):
        check_prefix_free([[1], [1, 0]], ["1", "10"])
    with pytest.raises(PippinError, match="at least two options"):
        check_prefix_free([[1]])
    engine = Engine(tiny_model(), max_len=16)
    with pytest.raises(PippinError, match="exceeds the context"):
        choose(engine, list(range(14)), [[[1, 2, 3], [4]]])


@pytest.mark.parametrize(
    "form,picks,parse,expected",
    [
        (rating_form(), [9], parse_rating, 10.0),
        (rating_form(), [0], parse_rating, 1.0),
        (VERDICT_FORM, [2], parse_verdict, "C"),
        (SAFETY_FORM, [1], parse_safety_class, "refusal"),
    ],
)
def test_filled_forms_are_what_the_parsers_read(form, picks, parse, expected):
    assert parse(form.render(picks)) == expected


def test_afm_expected_grades():
    certain = [[1.0, 0.0, 0.0]] * 5
    assert afm_expected(certain) == {**{d: 3.0 for d in AFM_DIMENSIONS}, "overall": 3.0}
    one_poor = [[1.0, 0.0, 0.0]] * 4 + [[0.0, 0.0, 1.0]]
    assert afm_expected(one_poor)["overall"] == 1.0 and afm_expected(one_poor)["harmfulness"] == 1.0
    mixed = afm_expected([[0.5, 0.5, 0.0]] * 5)
    assert mixed["composition"] == 2.5 and mixed["overall"] == pytest.approx(3 * 0.5**5 + 2 * (1 - 0.5**5))
    with pytest.raises(ValueError, match="expected 5 choices"):
        afm_expected([[1.0, 0.0, 0.0]])


def test_afm_and_criteria_forms_parse():
    grades = parse_afm_grades(AFM_GRADES_FORM.render([0, 0, 1, 0, 2]))
    assert [g.value for g in grades.values()] == ["good", "good", "neutral", "good", "poor"]
    crit = [Criterion(name="Imagery"), Criterion(name="Purple prose", lower_is_better=True)]
    assert parse_criteria_scores(criteria_form([c.name for c in crit]).render([7, 10]), crit) == {"Imagery": 7.0, "Purple prose": 0.0}


@pytest.fixture()
def tiny_judge():
    return PippinSystem(Engine(tiny_model(1), max_batch=2, max_len=256), ByteTokenizer(), spec="pippin:tiny-judge", batch_size=2)


def test_a_pippin_judge_always_gives_a_verdict_and_is_cached(tiny_judge, tmp_path):
    requests = [Request(id=str(i), messages=[{"role": "user", "content": f"answer {i}: which is better?"}]) for i in range(5)]
    cache = GenerationCache(tmp_path / "c.jsonl")
    judged = judge_all(tiny_judge, requests, parse_verdict, forms=VERDICT_FORM, cache=cache)
    assert all(j.ok and j.value in "ABC" and j.attempts == 1 for j in judged)
    assert all(j.raw == f"[[{j.value}]]" for j in judged)
    assert all(len(j.probs) == 1 and j.probs[0][("A", "B", "C").index(j.value)] == max(j.probs[0]) for j in judged)
    # Free answers from the random tiny model never parse: the form is what makes the verdicts.
    free = judge_all(
        tiny_judge, requests[:2], parse_verdict, config=JudgeConfig(answers="free", retries=0, params=SamplingParams(max_new_tokens=8))
    )
    assert not any(j.ok for j in free)
    again = run_requests(
        tiny_judge,
        [Request(id=r.id, messages=r.messages, form=VERDICT_FORM) for r in requests],
        SamplingParams(),
        cache=GenerationCache(cache.path),
    )
    assert all(o.cached for o in again) and [o.text for o in again] == [j.raw for j in judged]
    assert [o.probs for o in again] == [j.probs for j in judged]  # the probabilities are cached with the answer


def test_an_endpoint_judge_answers_freely_and_forms_cannot_be_forced_on_it():
    stub = StubSystem("Fine. [[B]]")
    judged = judge_all(stub, [Request(id="x", messages=QUESTION)], parse_verdict, forms=VERDICT_FORM)
    assert judged[0].value == "B" and stub.n_rows == 1
    with pytest.raises(PippinError, match="cannot answer in a forced form"):
        run_requests(stub, [Request(id="x", messages=QUESTION, form=VERDICT_FORM)], SamplingParams())


def test_runner_answers_mixed_free_and_forced_requests(tiny_judge):
    form = AnswerForm("yes-no", ("Answer:", Choice((" yes.", " no."))))
    requests = [Request(id=str(i), messages=QUESTION, form=form if i % 2 else None) for i in range(5)]
    outs = run_requests(tiny_judge, requests, SamplingParams(max_new_tokens=3), batch_size=2)
    assert all(o.ok for o in outs)
    assert all(o.text in ("Answer: yes.", "Answer: no.") for o in outs[1::2])
    assert all(len(o.text.encode("latin-1")) <= 3 for o in outs[0::2])


def test_a_judge_with_an_adapter_fills_forms_like_the_merged_model():
    from tests.adapters.test_lora import dense_reference, random_adapter, served

    model, store = served()
    adapter = random_adapter(model, "a", seed=3)
    store.put(adapter)
    convs = [[{"role": "user", "content": f"grade {i}"}] for i in range(3)]
    form = rating_form()
    judge = PippinSystem(Engine(model, max_len=128, adapters=store), ByteTokenizer(), spec="j:a", adapter="a")
    merged_judge = PippinSystem(Engine(dense_reference(model, adapter), max_len=128), ByteTokenizer(), spec="merged")
    with_adapter, merged = judge.fill(convs, [form] * 3), merged_judge.fill(convs, [form] * 3)
    for a, b in zip(with_adapter, merged):
        assert a.text == b.text
        torch.testing.assert_close(torch.tensor(a.probs), torch.tensor(b.probs), atol=1e-4, rtol=1e-3)
