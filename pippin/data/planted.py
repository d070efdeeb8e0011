"""Labelled samples for measuring the pipeline's filters: synthetic English documents with planted PII (and decoys
that look like PII but are not), near-duplicates at a known Jaccard similarity, and planted evaluation passages.

Seeded and deterministic. Jaccard is measured on the same word 5-gram shingles MinHash hashes (datatrove's text
normalization), so "known Jaccard" means exact shingle-set Jaccard. Used by benchmarks/data_filters.py and the tests;
not training data.
"""

from __future__ import annotations

import random

import phonenumbers
from stdnum import luhn

_NOUNS = (  # noqa: SIM905
    "river garden teacher window market engine letter village doctor forest bridge kitchen harbor student "
    "painter farmer castle island museum station library mountain valley orchard lantern sailor wagon "
    "blanket ladder meadow pilot basket tower"
).split()
_VERBS = (  # noqa: SIM905
    "carried opened watched painted built visited found repaired described measured followed noticed crossed planted studied"
).split()
_ADJS = (  # noqa: SIM905
    "quiet bright old narrow busy green heavy gentle distant warm careful simple modern famous hidden"
).split()
_PLACES = (  # noqa: SIM905
    "in the morning|after the storm|near the old road|before the long winter|during the festival|"
    "at the edge of town|late at night|under a grey sky|beside the canal|on the first day of spring|"
    "behind the school|across the square"
).split("|")


def english_doc(rng: random.Random, n_sentences: int = 12) -> str:
    """Plain English prose made of simple varied sentences (passes language, Gopher, C4 and FineWeb filters)."""
    templates = (
        "The {a1} {n1} {v} the {a2} {n2} {p}, and the {n3} was {a3} {k} times.",
        "Every {n1} near the {n2} {v} a {a1} {n3}, although {k} of them seemed {a2}.",
        "{P}, my {a1} {n1} {v} our {n2} while the {a2} {n3} waited.",
        "Nobody expected that {k} {a1} {n1}s would have {v} the {n2} so {a2}ly.",
        "Her {n1} {v} {k} {a1} {n2}s and one {a2} {n3} {p}.",
    )
    sents = []
    for _ in range(n_sentences):
        n1, n2, n3 = rng.sample(_NOUNS, 3)
        a1, a2, a3 = rng.sample(_ADJS, 3)
        p = rng.choice(_PLACES)
        sents.append(
            rng.choice(templates).format(
                a1=a1, a2=a2, a3=a3, n1=n1, n2=n2, n3=n3, v=rng.choice(_VERBS), p=p, P=p.capitalize(), k=rng.randint(2, 99)
            )
        )
    return " ".join(sents[: n_sentences // 2]) + "\n\n" + " ".join(sents[n_sentences // 2 :])


def _card(rng: random.Random) -> str:
    body = rng.choice(["4", "51", "55", "6011"])
    body += "".join(rng.choice("0123456789") for _ in range(15 - len(body)))
    number = body + luhn.calc_check_digit(body)  # 16 digits, Luhn-valid
    return " ".join(number[i : i + 4] for i in range(0, len(number), 4))


def _phone(rng: random.Random) -> str:
    region = rng.choice(["US", "GB", "DE", "FR", "IN", "AU"])
    n = phonenumbers.example_number_for_type(
        region, rng.choice([phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE])
    )
    if region == "US" and rng.random() < 0.5:
        return f"({rng.choice([212, 415, 617, 312, 206, 303, 512, 646])}) {rng.randint(200, 999)}-{rng.randint(1000, 9999)}"
    return phonenumbers.format_number(n, phonenumbers.PhoneNumberFormat.INTERNATIONAL)


PLANTERS = {
    "email": lambda rng: (
        f"{rng.choice(['anna', 'j.smith', 'li_wei', 'omar.k'])}{rng.randint(1, 999)}"
        f"@{rng.choice(['mail.com', 'uni-bonn.de', 'corp.co.uk'])}"
    ),
    "phone": _phone,
    "credit_card": _card,
    "ip": lambda rng: f"{rng.choice([23, 45, 81, 104, 151, 203])}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
}

DECOYS = (
    lambda rng: f"version {rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}",
    lambda rng: f"on {rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    lambda rng: f"order number {rng.randint(10**7, 10**8)}",
    lambda rng: f"the private host 192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
    lambda rng: f"ISBN 978-{rng.randint(0, 9)}-{rng.randint(100, 999)}-{rng.randint(10000, 99999)}-{rng.randint(0, 9)}",
    lambda rng: f"a ratio of {rng.randint(1, 99)}.{rng.randint(1, 99)} to {rng.randint(1, 9)}",
    lambda rng: "card 4111 1111 1111 1112",  # fails Luhn
)


def plant_pii(rng: random.Random, n_docs: int, per_doc: int = 3) -> list[tuple[str, list[tuple[str, str]]]]:
    """Documents with `per_doc` planted PII items and as many decoys, and the (kind, value) items planted."""
    out = []
    for _ in range(n_docs):
        sents = english_doc(rng, 6).split(". ")
        items = [(k, PLANTERS[k](rng)) for k in rng.choices(list(PLANTERS), k=per_doc)]
        inserts = [f"Contact {v} for details" for _, v in items] + [f"It ran {rng.choice(DECOYS)(rng)} here" for _ in range(per_doc)]
        for ins in inserts:
            sents.insert(rng.randint(0, len(sents)), ins)
        out.append((". ".join(sents), items))
    return out


def pii_scores(docs: list[tuple[str, list[tuple[str, str]]]]) -> dict[str, dict[str, float]]:
    """Precision and recall of pippin.data.pii.find_pii per kind: a planted item is found when a span of its kind
    covers its value; a span that covers no planted item of its kind is a false positive."""
    from pippin.data.pii import find_pii

    tp: dict[str, int] = {}
    planted: dict[str, int] = {}
    flagged: dict[str, int] = {}
    for text, items in docs:
        got = [(s.kind, text[s.start : s.end]) for s in find_pii(text)]
        hit = lambda k, v, gk, gv: gk == k and (v in gv or gv in v)  # noqa: E731
        for k, v in items:
            planted[k] = planted.get(k, 0) + 1
            tp[k] = tp.get(k, 0) + any(hit(k, v, gk, gv) for gk, gv in got)
        for gk, gv in got:
            flagged[gk] = flagged.get(gk, 0) + 1
            tp.setdefault(gk, 0)
            if not any(hit(k, v, gk, gv) for k, v in items):
                tp[f"fp_{gk}"] = tp.get(f"fp_{gk}", 0) + 1
    out = {}
    for k in sorted(set(planted) | set(flagged)):
        fp = tp.get(f"fp_{k}", 0)
        out[k] = {
            "planted": planted.get(k, 0),
            "recall": tp.get(k, 0) / planted[k] if planted.get(k) else float("nan"),
            "precision": (flagged.get(k, 0) - fp) / flagged[k] if flagged.get(k) else float("nan"),
        }
    return out


def shingles(text: str, n_grams: int = 5) -> set[int]:
    """The hashed word n-gram shingles MinHash sees (datatrove's normalization and hashing)."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature

    sig = MinhashDedupSignature("/nonexistent", config=MinhashConfig(n_grams=n_grams))
    return set(sig.get_shingles(text).ravel().tolist())


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def near_duplicate(rng: random.Random, text: str, target: float) -> tuple[str, float]:
    """A copy of `text` with words replaced (at random positions, by new words) until its shingle Jaccard with
    `text` is as close to `target` as one word allows; returns the copy and its exact Jaccard."""
    words = text.split(" ")
    order = rng.sample(range(len(words)), len(words))
    fresh = ["".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(7)) for _ in words]
    base = shingles(text)

    def edit(k: int) -> tuple[str, float]:
        w = list(words)
        for i in order[:k]:
            w[i] = fresh[i]
        copy = " ".join(w)
        s = shingles(copy)
        return copy, len(base & s) / len(base | s)

    lo, hi = 0, len(words)  # Jaccard falls as k grows: find the k whose Jaccard is nearest the target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if edit(mid)[1] >= target else (lo, mid)
    return min((edit(lo), edit(hi)), key=lambda cj: abs(cj[1] - target))


def eval_passages(data_dir: str, per_set: int, rng: random.Random) -> list[tuple[str, str]]:
    """(set, passage) pairs to plant: IFEval prompts, MT-Bench first turns and XSum summaries, chosen at random."""
    import json
    from pathlib import Path

    d = Path(data_dir)
    rows = {
        "ifeval": [json.loads(x)["prompt"] for x in (d / "ifeval" / "input_data.jsonl").read_text().splitlines() if x.strip()],
        "mt_bench": [json.loads(x)["turns"][0] for x in (d / "mt_bench" / "question.jsonl").read_text().splitlines() if x.strip()],
        "xsum": [json.loads(x)["summary"] for x in (d / "xsum" / "test.jsonl").read_text().splitlines() if x.strip()],
    }
    return [(name, p) for name, texts in rows.items() for p in rng.sample(texts, per_set)]
