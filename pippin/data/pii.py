"""PII removal for pretraining text: find emails, phone numbers, IP addresses, payment cards, IBANs and US social
security numbers, and replace each with a tag such as `<EMAIL>`.

Each recogniser is a cheap regular expression for candidates plus a validator from a well-kept library, as Presidio's
recognisers are built: datatrove's e-mail and IPv4 patterns (its `PIIFormatter`, public addresses only), Google's
libphonenumber (`phonenumbers`, Presidio's phone recogniser) run on digit runs only, and python-stdnum's checksums
(Luhn for cards, ISO 13616 mod-97 for IBANs, the SSA's rules for SSNs). Not covered: names, street addresses and
other named entities (those need an NER model), IPv6, national IDs other than the US SSN.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import phonenumbers
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.formatters.pii import PIIFormatter, public_ip_validator
from stdnum import iban, luhn
from stdnum.us import ssn

from pippin.data.report import ExampleLog

KINDS = ("email", "credit_card", "iban", "us_ssn", "ip", "phone")
"""Recognisers in the order they run: a span taken by one is hidden from the later ones (a card is not a phone)."""

_DT = PIIFormatter()  # datatrove's patterns, so the e-mail and IP rules are FineWeb's
# Card numbers as they are written: 13-19 digits in one run, groups of four (the last 1-7), or Amex's 4-6-5.
# Not the fraction of a decimal (`873.9000000000001` in a float printout is Luhn-valid by chance).
_CARD = re.compile(r"(?<![\d-])(?<!\d[.,])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{5})(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])")
# datatrove's IPv4 pattern, not inside a longer dotted number (1.2.3.4.5) and not a numbered section
_IP = re.compile(r"(?<![\w.])(?<!section )(?<!Section )" + _DT.ip_replacer.regex.pattern + r"(?!\w|\.\d)")
# A dotted quad is a version, not an address, after a word that says so, directly or before a program's name
# ("since dpkg 1.15.8.6", "version 2.0.0.1"): seen redacted in Debian's man pages.
_VERSION_CUE = re.compile(
    r"(?i)\b(?:versions?|releases?|since|ver|rev|revision|build|upgraded?|updated?|patch(?:ed)?)\b\W{0,2}(?:[\w+-]+ )?$"
)
_PHONE_RUN = re.compile(r"\+?\(?\d[\d ().\-]{5,}\d")  # where a phone number could be; libphonenumber decides
# A bare run of digits (no +, spaces, dots, dashes or brackets) is a phone only after a word that says so: in technical
# text such runs are constants and ids (`2**31 - 1 = 2147483647` is a valid Dallas number).
_PHONE_CUE = re.compile(r"(?i)\b(?:phone|tel|telephone|call|mobile|cell|fax|sms|whatsapp|contact|dial)\b\W{0,3}(?:\w+\W+){0,2}$")


@dataclass(frozen=True)
class Span:
    """One recognised item: its kind and character range in the text."""

    kind: str
    start: int
    end: int


def _card(s: str) -> bool:
    digits = re.sub(r"\D", "", s)
    isbn = len(digits) == 13 and digits.startswith(("978", "979"))  # an EAN-13 book number, not a card
    return 13 <= len(digits) <= 19 and not isbn and luhn.is_valid(digits)


def _regex_spans(pattern: re.Pattern, kind: str, valid: Callable[[str], bool]) -> Callable[[str], list[Span]]:
    return lambda text: [Span(kind, m.start(), m.end()) for m in pattern.finditer(text) if valid(m.group(0))]


def _phones(text: str, region: str = "US") -> list[Span]:
    """libphonenumber's matcher (VALID leniency) on each digit run and a little context: far faster than on the
    whole text, with the same result where numbers are written as runs of digits and separators."""
    spans = []
    for run in _PHONE_RUN.finditer(text):
        lo = max(0, run.start() - 4)
        for m in phonenumbers.PhoneNumberMatcher(text[lo : run.end() + 4], region):
            if m.raw_string.isdigit() and not _PHONE_CUE.search(text[max(0, lo + m.start - 40) : lo + m.start]):
                continue
            spans.append(Span("phone", lo + m.start, lo + m.end))
    return spans


def _ips(text: str) -> list[Span]:
    """Public IPv4 addresses (datatrove's validator), except where the words before call the number a version."""
    public = partial(public_ip_validator, public_only=True)
    return [
        Span("ip", m.start(), m.end())
        for m in _IP.finditer(text)
        if public(m.group(0)) and not _VERSION_CUE.search(text[max(0, m.start() - 40) : m.start()])
    ]


RECOGNISERS: dict[str, Callable[[str], list[Span]]] = {
    "email": _regex_spans(_DT.emails_replacer.regex, "email", lambda s: True),
    "credit_card": _regex_spans(_CARD, "credit_card", _card),
    "iban": _regex_spans(_IBAN, "iban", lambda s: iban.is_valid(s)),
    "us_ssn": _regex_spans(_SSN, "us_ssn", lambda s: ssn.is_valid(s)),
    "ip": _ips,
    "phone": _phones,
}


def find_pii(text: str, kinds: tuple[str, ...] = KINDS) -> list[Span]:
    """Every PII span in `text`, sorted, none overlapping (earlier kinds in KINDS win)."""
    taken: list[Span] = []
    for kind in KINDS:
        if kind not in kinds:
            continue
        for s in RECOGNISERS[kind](text):
            if not any(s.start < t.end and t.start < s.end for t in taken):
                taken.append(s)
    return sorted(taken, key=lambda s: s.start)


def redact(text: str, spans: list[Span]) -> str:
    """`text` with each span replaced by `<KIND>`."""
    out, pos = [], 0
    for s in spans:
        out += [text[pos : s.start], f"<{s.kind.upper()}>"]
        pos = s.end
    return "".join(out) + text[pos:]


class PIIRedactor(PipelineStep):
    """Replaces PII in every document (documents are kept). Counts spans by kind in datatrove's stats (`pii_<kind>`,
    and `docs_with_pii`) and logs a few redactions with their context to `examples` for the report."""

    type = "✂️ - FORMAT"
    name = "🔒 PII"

    def __init__(self, kinds: tuple[str, ...] = KINDS, examples: ExampleLog | None = None):
        super().__init__()
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {list(KINDS)}")
        self.kinds = tuple(kinds)
        self.examples = examples

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.examples or contextlib.nullcontext():
            for doc in data:
                self.stat_update("total")
                with self.track_time():
                    spans = find_pii(doc.text, self.kinds)
                    if spans:
                        self.stat_update("docs_with_pii")
                        for kind, n in sorted(Counter(s.kind for s in spans).items()):
                            self.stat_update(f"pii_{kind}", value=n)
                        if self.examples:
                            for s in spans:
                                t = doc.text
                                self.examples.note(
                                    s.kind, f"{t[max(0, s.start - 40) : s.start]}[{t[s.start : s.end]}]{t[s.end : s.end + 40]}", rank
                                )
                        doc.text = redact(doc.text, spans)
                self.stat_update("forwarded")
                yield doc
