"""The generated instruction-following prompt set: all 25 types, kwargs the checkers take and score correctly, no
13-gram shared with IFEval's test prompts, deterministic files and a clean train/validation split."""

import json
import re

import pytest

from pippin.cli import main
from pippin.data.decontaminate import NGramIndex, ngrams
from pippin.data.ifprompts import (
    CONFLICTS,
    IFPromptsConfig,
    build_ifprompts,
    compatible,
    default_tasks,
    in_validation,
    write_ifprompts,
)
from pippin.errors import PippinError
from pippin.eval.ifeval import check_response, load_ifeval
from pippin.eval.ifeval_checks import CHECKERS
from tests.conftest import SHARED_DATA

IFEVAL_FILE = SHARED_DATA / "ifeval" / "input_data.jsonl"
N = 2000


@pytest.fixture(scope="module")
def ifeval_prompts():
    return [item.prompt for item in load_ifeval(IFEVAL_FILE)]


@pytest.fixture(scope="module")
def prompt_set(ifeval_prompts):
    return build_ifprompts(IFPromptsConfig(n=N, seed=0), reference=ifeval_prompts)


@pytest.fixture(scope="module")
def rows(prompt_set):
    return prompt_set.train + prompt_set.validation


def test_every_instruction_type_appears(rows, prompt_set):
    counts = prompt_set.manifest["instruction_counts"]
    assert set(counts) == set(CHECKERS) and len(counts) == 25
    assert min(counts.values()) >= N // 25  # each type in at least ~1 prompt of 25 (1-3 instructions per prompt)
    assert {len(r.instruction_id_list) for r in rows} == {1, 2, 3}
    assert len({r.prompt for r in rows}) == N


def test_rows_follow_the_rules_for_combining(rows):
    for r in rows:
        ids = r.instruction_id_list
        assert len(set(ids)) == len(ids)
        assert not any(frozenset((a, b)) in CONFLICTS for a in ids for b in ids if a != b), r.prompt
        by_id = dict(zip(ids, r.kwargs))
        if "combination:repeat_prompt" in by_id:
            request = by_id["combination:repeat_prompt"]["prompt_to_repeat"]
            assert r.prompt.startswith(request + " ") and "," not in request
        words = by_id.get("length_constraints:number_words")
        bullets = by_id.get("detectable_format:number_bullet_lists")
        if words and bullets and words["relation"] == "less than":
            assert words["num_words"] >= 25 * bullets["num_bullets"]


def test_compatible_refuses_impossible_combinations():
    assert compatible(["punctuation:no_comma", "detectable_format:title"], [{}, {}])
    assert not compatible(["change_case:english_lowercase", "change_case:english_capital"], [{}, {}])
    few_words = {"num_words": 50, "relation": "less than"}
    assert not compatible(["length_constraints:number_words", "length_constraints:number_paragraphs"], [few_words, {"num_paragraphs": 5}])
    assert compatible(["length_constraints:number_words", "length_constraints:number_paragraphs"], [few_words, {"num_paragraphs": 2}])
    # An upper bound that the text every reply must contain already breaks.
    repeat = {"prompt_to_repeat": "Write a letter, then a poem."}
    assert not compatible(["combination:repeat_prompt", "punctuation:no_comma"], [repeat, {}])
    end = {"end_phrase": "Thanks for reading to the end."}
    assert not compatible(["startend:end_checker", "keywords:forbidden_words"], [end, {"forbidden_words": ["thanks"]}])
    assert compatible(["startend:end_checker", "keywords:forbidden_words"], [end, {"forbidden_words": ["very"]}])


def test_every_row_is_checkable(rows):
    reply = "Here is a short reply.\n\nIt has two paragraphs, a *highlight* and [a placeholder]."
    for r in rows:
        assert len(check_response(r, reply)) == len(r.instruction_id_list)


SAMPLES = {
    "de": "Das ist eine kurze Antwort über das Wetter und die Jahreszeiten in unserem kleinen Dorf am Fluss.",
    "fr": "Voici une courte réponse sur le temps qu'il fait et les saisons dans notre petit village près de la rivière.",
    "es": "Esta es una respuesta corta sobre el tiempo y las estaciones del año en nuestro pequeño pueblo junto al río.",
    "it": "Questa è una breve risposta sul tempo e sulle stagioni nel nostro piccolo paese vicino al fiume.",
    "pt": "Esta é uma resposta curta sobre o tempo e as estações do ano na nossa pequena aldeia perto do rio.",
    "nl": "Dit is een kort antwoord over het weer en de seizoenen in ons kleine dorp aan de rivier.",
}


def replies(iid: str, kw: dict) -> tuple[str, str]:
    """A reply that follows the instruction and one that just fails it."""
    rel = kw.get("relation") or kw.get("let_relation") or kw.get("capital_relation")
    # counts (good, bad): at least k -> (k, k - 1); less than k -> (k - 1, k)
    k = next((v for name, v in kw.items() if isinstance(v, int)), 0)
    good_n, bad_n = (k, k - 1) if rel != "less than" else (k - 1, k)
    match iid:
        case "keywords:existence":
            return "A reply with " + " ".join(kw["keywords"]) + ".", "A reply."
        case "keywords:frequency":
            return " ".join([kw["keyword"]] * good_n) + " end", " ".join([kw["keyword"]] * bad_n) + " end"
        case "keywords:forbidden_words":
            return "A plain reply.", "A plain reply with " + kw["forbidden_words"][-1] + "."
        case "keywords:letter_frequency":
            return " ".join([kw["letter"]] * good_n) + " 1", " ".join([kw["letter"]] * bad_n) + " 1"
        case "language:response_language":
            return SAMPLES[kw["language"]], "This is a short answer about the weather and the seasons in our small village by the river."
        case "change_case:english_capital":
            return "THIS IS A SHORT REPLY ABOUT THE WEATHER IN OUR TOWN.", "This is a short reply about the weather in our town."
        case "change_case:english_lowercase":
            return "this is a short reply about the weather in our town.", "This is a short reply about the weather in our town."
        case "change_case:capital_word_frequency":
            return " ".join(["LOUD"] * good_n) + " quiet words.", " ".join(["LOUD"] * bad_n) + " quiet words."
        case "punctuation:no_comma":
            return "No commas here.", "Yes, a comma."
        case "length_constraints:number_sentences":
            return "This is one sentence. " * good_n, "This is one sentence. " * bad_n
        case "length_constraints:number_words":
            return "word " * good_n, "word " * bad_n
        case "length_constraints:number_paragraphs":
            return "\n***\n".join(["Some text."] * k), "\n***\n".join(["Some text."] * (k + 1))
        case "length_constraints:nth_paragraph_first_word":
            paragraphs = ["Other words here."] * kw["num_paragraphs"]
            good = list(paragraphs)
            good[kw["nth_paragraph"] - 1] = kw["first_word"].capitalize() + " comes first."
            return "\n\n".join(good), "\n\n".join(paragraphs)
        case "detectable_content:number_placeholders":
            return " ".join(f"[blank {i}]" for i in range(k)), "No blanks." + " ".join(f"[blank {i}]" for i in range(k - 1))
        case "detectable_content:postscript":
            return f"Body text.\n\n{kw['postscript_marker']} A late note.", "Body text."
        case "detectable_format:number_bullet_lists":
            return "\n".join(["* item"] * k), "\n".join(["* item"] * (k + 1))
        case "detectable_format:constrained_response":
            return "I thought about it. My answer is maybe.", "I thought about it."
        case "detectable_format:number_highlighted_sections":
            return " ".join(f"*part {i}*" for i in range(k)), "Plain. " + " ".join(f"*part {i}*" for i in range(k - 1))
        case "detectable_format:multiple_sections":
            sections = [f"{kw['section_spliter']} {i}\nText." for i in range(1, kw["num_sections"] + 1)]
            return "\n".join(sections), "\n".join(sections[:-1])
        case "detectable_format:json_format":
            return '```json\n{"answer": "text"}\n```', "answer: text"
        case "detectable_format:title":
            return "<<A Good Title>>\nBody.", "A Good Title\nBody."
        case "combination:two_responses":
            return "First take.\n******\nSecond take.", "First take.\n******\nFirst take."
        case "combination:repeat_prompt":
            return kw["prompt_to_repeat"] + " Here is my answer.", "Here is my answer. " + kw["prompt_to_repeat"]
        case "startend:end_checker":
            return "Body text. " + kw["end_phrase"], kw["end_phrase"] + " Body text."
        case "startend:quotation":
            return '"Quoted body."', "Quoted body."
    raise AssertionError(iid)


@pytest.mark.parametrize("iid", sorted(CHECKERS))
def test_kwargs_mean_what_the_prompt_says(rows, iid):
    """For a generated one-instruction row of each type, a reply that follows it passes and one that does not fails."""
    row = next(r for r in rows if r.instruction_id_list == [iid] and r.kwargs[0].get("language", "de") in SAMPLES)
    good, bad = replies(iid, row.kwargs[0])
    assert check_response(row, good) == [True]
    assert check_response(row, bad) == [False]


def test_ngram_index_catches_a_copied_ifeval_sentence(ifeval_prompts):
    index = NGramIndex(ifeval_prompts)
    source = next(p for p in ifeval_prompts if len(re.findall(r"\w+", p)) >= 20)
    copied = " ".join(source.split()[:16])
    assert len(ngrams(copied)) >= 1
    # Case, punctuation and spacing do not hide the copy.
    assert index.shared(f"Write a poem.  {copied.upper()}!! Then stop.") is not None
    assert index.shared("Write a brief essay on the water cycle. Avoid commas entirely.") is None
    twelve = re.findall(r"\w+", source)[:12]
    assert index.shared("Begin here. " + " ".join(twelve) + " zzqx.") is None  # 12 words are not 13


def test_no_generated_prompt_shares_a_13gram_with_ifeval(ifeval_prompts, rows):
    """Checked against IFEval's file with the n-grams computed here, not by the generator's own index."""
    ifeval = set()
    for p in ifeval_prompts:
        w = re.findall(r"\w+", p.lower())
        ifeval |= {tuple(w[i : i + 13]) for i in range(len(w) - 12)}
    assert len(ifeval) > 10_000
    for r in rows:
        w = re.findall(r"\w+", r.prompt.lower())
        assert not any(tuple(w[i : i + 13]) in ifeval for i in range(len(w) - 12)), r.prompt


def test_requests_that_copy_ifeval_are_dropped(ifeval_prompts):
    """With a request copied from IFEval in the bank, its prompts are dropped and counted; without decontamination
    they would be kept (a quarter of the draws use it) and the check below would fail."""
    copied = next(p for p in ifeval_prompts if p.startswith("Write a 300+ word summary")).split(". Do not")[0] + "."
    tasks = [copied] + default_tasks()[:3]
    result = build_ifprompts(IFPromptsConfig(n=200, seed=1), reference=ifeval_prompts, tasks=tasks)
    kept = result.train + result.validation
    assert result.manifest["decontamination"]["dropped"] > 30
    assert len(kept) == 200 and not any(r.prompt.startswith(copied) for r in kept)
    index = NGramIndex(ifeval_prompts)
    assert not any(index.shared(r.prompt) for r in kept)


def test_same_seed_same_files(tmp_path, ifeval_prompts):
    def files(seed, folder):
        write_ifprompts(folder, build_ifprompts(IFPromptsConfig(n=300, seed=seed), reference=ifeval_prompts))
        return {name: (folder / name).read_bytes() for name in ("train.jsonl", "validation.jsonl", "manifest.json")}

    a, b, c = files(0, tmp_path / "a"), files(0, tmp_path / "b"), files(1, tmp_path / "c")
    assert a == b
    assert a["train.jsonl"] != c["train.jsonl"]
    manifest = json.loads(a["manifest.json"])
    assert manifest["config"] == {"n": 300, "seed": 0, "val_fraction": 0.1} and manifest["version"] >= 1


def test_split_is_disjoint_complete_and_by_request(prompt_set, tmp_path):
    train_keys = {r.key for r in prompt_set.train}
    val_keys = {r.key for r in prompt_set.validation}
    assert not train_keys & val_keys and train_keys | val_keys == set(range(1, N + 1))
    assert 0.05 < len(val_keys) / N < 0.15
    for r in prompt_set.train + prompt_set.validation:
        request = r.prompt.split(". ", 1)[0] + "."
        assert in_validation(request, 0.1) == (r.key in val_keys)
    # The files read back as IFEval rows (what pippin rl / reward pairs / itec load).
    paths = write_ifprompts(tmp_path, prompt_set)
    assert load_ifeval(paths["train"]) == prompt_set.train
    assert load_ifeval(paths["validation"]) == prompt_set.validation


def test_config_is_validated():
    with pytest.raises(PippinError, match="val_fraction"):
        IFPromptsConfig(val_fraction=1.0)
    with pytest.raises(PippinError, match="n must be"):
        IFPromptsConfig(n=0)


def test_command_writes_the_set_and_reports(tmp_path, capsys):
    assert main(["data", "ifprompts", "--out", str(tmp_path), "--n", "100", "--ifeval", str(IFEVAL_FILE)]) == 0
    out = capsys.readouterr().out
    assert "startend:quotation" in out and "dropped for a 13-gram" in out
    n_train = len((tmp_path / "train.jsonl").read_text().splitlines())
    n_val = len((tmp_path / "validation.jsonl").read_text().splitlines())
    assert n_train + n_val == 100 and f"train: {n_train}" in out
    assert main(["data", "ifprompts", "--out", str(tmp_path), "--val-fraction", "2"]) == 2
    assert "val_fraction must be in [0, 1)" in capsys.readouterr().err
