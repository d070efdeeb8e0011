"""Offline English sentence splitting and word tokenizing, close to what NLTK gives IFEval.

IFEval (google-research/instruction_following_eval) counts sentences with NLTK's pre-trained Punkt model
(`tokenizers/punkt/english.pickle`, Kiss & Strunk 2006), capital words with `nltk.word_tokenize` (Punkt, then
the Penn Treebank word rules) and words with the regex `\\w+`. We ship no NLTK and download no data, so this
module re-implements the Punkt *decision procedure* (candidate ends, first-pass abbreviation check, second-pass
orthographic heuristic, boundary realignment) with the published English abbreviation and sentence-starter
lists written in. What it does not have is Punkt's trained per-word orthographic table (236 KB of counts): a
short list of common lower-case words stands in for it, so an abbreviation, initial or ellipsis followed by
a capitalised word can be judged differently from NLTK. Collocations (a few dozen WSJ name pairs) are left out.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

# Punkt English `abbrev_types`: a token ending in "." whose body (lower-cased) is listed here is an
# abbreviation, not a sentence end. Note the absence of "e.g", "i.e", "etc" and "no": NLTK splits after those.
# fmt: off
_ABBREVIATIONS = frozenset((
    "a.a", "a.c", "a.d", "a.g", "a.h", "a.m", "a.m.e", "a.s", "a.t", "adm", "ala", "ariz", "aug", "ave", "b.f",
    "b.v", "bros", "c", "c.i.t", "c.o.m.b", "c.v", "calif", "chg", "cie", "co", "col", "colo", "conn", "corp",
    "cos", "ct", "d", "d.c", "d.h", "d.w", "dec", "dr", "e", "e.f", "e.h", "e.l", "e.m", "f", "f.g", "f.j", "feb",
    "fla", "fri", "ft", "g", "g.d", "g.f", "g.k", "ga", "gen", "h", "h.c", "h.f", "h.m", "i.m.s", "ill", "inc",
    "j.b", "j.c", "j.j", "j.k", "j.p", "j.r", "jan", "jr", "k", "kan", "ky", "l", "l.a", "l.f", "l.p", "lt", "ltd",
    "m", "m.b.a", "m.d.c", "m.j", "maj", "messrs", "mg", "mich", "minn", "mr", "mrs", "ms", "n", "n.c", "n.d",
    "n.h", "n.j", "n.m", "n.v", "n.y", "nev", "nov", "oct", "ok", "okla", "ore", "p", "p.a.m", "p.m", "pa", "ph.d",
    "prof", "r", "r.a", "r.h", "r.i", "r.j", "r.k", "r.t", "rep", "reps", "s", "s.a", "s.a.y", "s.c", "s.g",
    "s.p.a", "s.s", "sen", "sep", "sept", "sr", "st", "sw", "t", "t.j", "tenn", "tues", "u.k", "u.n", "u.s",
    "u.s.a", "u.s.s.r", "v", "va", "vs", "vt", "w", "w.c", "w.r", "w.va", "w.w", "wash", "wed", "wis", "yr",
))
# fmt: on

# Punkt English `sent_starters`: after an abbreviation, one of these (capitalised) starts a new sentence.
# fmt: off
_SENT_STARTERS = frozenset((
    "according", "although", "among", "and", "but", "despite", "even", "he", "however", "i", "if", "in", "indeed",
    "instead", "it", "many", "meanwhile", "moreover", "most", "nevertheless", "nonetheless", "nor", "sales",
    "separately", "similarly", "since", "so", "some", "there", "these", "they", "this", "though", "thus", "under",
    "when", "while", "yet", "both", "the",
))
# fmt: on

# Stand-in for Punkt's orthographic table: words that are mostly seen lower-case, so a capitalised one after
# an abbreviation or ellipsis marks a new sentence.
# fmt: off
_COMMON_LOWERCASE = _SENT_STARTERS | frozenset((
    "a", "about", "after", "all", "also", "an", "another", "are", "as", "at", "be", "because", "before", "by",
    "can", "could", "did", "do", "does", "each", "every", "for", "from", "had", "has", "have", "her", "here",
    "his", "how", "its", "just", "let", "like", "may", "me", "my", "no", "not", "now", "of", "on", "once", "one",
    "only", "or", "our", "she", "should", "such", "than", "that", "then", "their", "them", "those", "to", "too",
    "two", "was", "we", "were", "what", "where", "which", "who", "why", "will", "with", "would", "you", "your",
    "yes", "first", "next", "finally", "here's", "that's", "it's", "there's", "we're", "you're", "let's",
))
# fmt: on

# Characters that end a Punkt word without belonging to it, and the multi-character punctuation tokens.
_NON_WORD = r"[)\";}\]*:@'({\[!?]"
_MULTI_PUNCT = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"
_PUNKT_WORD = re.compile(
    rf"{_MULTI_PUNCT}"  # "--", "..." and ". . ." are tokens of their own
    rf"|(?=[^(\"`{{\[:;&#*@)}}\]\-,])\S+?"  # a word starts with a word character and runs lazily ...
    rf"(?=\s|$|{_NON_WORD}|{_MULTI_PUNCT}|,(?=$|\s|{_NON_WORD}|{_MULTI_PUNCT}))"  # ... to a word end
    r"|\S"  # anything else is a one-character token
)
# A sentence can end at ".", "?" or "!" followed by punctuation, or by whitespace and another token.
_POTENTIAL_END = re.compile(rf"[.?!](?=(?P<after>{_NON_WORD}|\s+(?P<next>\S+)))")
# Closing quotes and brackets after a boundary belong to the sentence before it.
_REALIGN = re.compile(r"[\"')\]}]+?(?:\s+|(?=--)|$)")
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.-]*\.?$")
_INITIAL = re.compile(r"[^\W\d]\.$")
_ELLIPSIS = re.compile(r"\.\.+$")


@dataclass
class _Token:
    """One Punkt word with the two flags the annotation passes set."""

    text: str
    sentbreak: bool = False
    abbr: bool = False
    ellipsis: bool = False

    @property
    def type(self) -> str:
        """Lower-cased, with every number collapsed to one type (Punkt's `type`)."""
        return "##number##" if _NUMBER.match(self.text.lower()) else self.text.lower()

    @property
    def type_no_period(self) -> str:
        t = self.type
        return t[:-1] if len(t) > 1 and t.endswith(".") else t


def _ortho_starts_sentence(tok: _Token) -> bool | None:
    """Punkt's orthographic heuristic for the token after a period: True, False, or None for unknown."""
    if tok.text in ";:,.!?":
        return False
    first = tok.text[0]
    if first.isupper() and tok.type_no_period in _COMMON_LOWERCASE:
        return True
    if first.islower():  # a lower-case word after the period: the sentence goes on
        return False
    return None


def _annotate(tokens: list[_Token]) -> None:
    """Punkt's two passes: mark sentence breaks, abbreviations and ellipses in place."""
    for tok in tokens:
        if tok.text in ("?", "!", "."):
            tok.sentbreak = True
        elif _ELLIPSIS.match(tok.text):
            tok.ellipsis = True
        elif tok.text.endswith(".") and not tok.text.endswith(".."):
            body = tok.text[:-1].lower()
            if body in _ABBREVIATIONS or body.split("-")[-1] in _ABBREVIATIONS:
                tok.abbr = True
            else:
                tok.sentbreak = True
    for tok, nxt in zip(tokens, tokens[1:]):
        if not tok.text.endswith("."):
            continue
        initial = bool(_INITIAL.match(tok.text))
        if (tok.abbr or tok.ellipsis) and not initial:
            starts = _ortho_starts_sentence(nxt)
            if starts or (nxt.text[0].isupper() and nxt.type_no_period in _SENT_STARTERS):
                tok.sentbreak = True
                continue
        if initial or tok.type_no_period == "##number##":
            starts = _ortho_starts_sentence(nxt)
            if starts is False or (starts is None and initial and nxt.text[0].isupper()):
                tok.sentbreak, tok.abbr = False, True


def _contains_break(context: str) -> bool:
    """True if a token other than the last in `context` ends a sentence."""
    tokens = [_Token(m.group()) for m in _PUNKT_WORD.finditer(context)]
    _annotate(tokens)
    return any(tok.sentbreak for tok in tokens[:-1])


def _break_points(text: str) -> list[tuple[int, int]]:
    """(end of sentence, start of next) for every boundary, as Punkt finds them left to right.

    Only the last candidate of a run without whitespace is judged ("Hi!!" is one candidate), with the whole
    run before it as context.
    """
    found: list[re.Match[str]] = []
    starts: list[int] = []
    for m in _POTENTIAL_END.finditer(text):
        prev_stop = found[-1].start() if found else 0
        gap = text[prev_stop : m.start()]
        ws = max(gap.rfind(c) for c in string.whitespace)
        start = prev_stop + ws + 1 if ws >= 0 else (starts[-1] if starts else 0)
        if found and found[-1].start() > start:  # same run as the previous candidate: it supersedes it
            found.pop()
            starts.pop()
        found.append(m)
        starts.append(start)
    points = []
    for m, start in zip(found, starts):
        if _contains_break(text[start : m.end()] + m.group("after")):
            points.append((m.end(), m.start("next") if m.group("next") else m.end()))
    return points


def split_sentences(text: str) -> list[str]:
    """Split English text into sentences the way NLTK's Punkt English model does (see module docstring)."""
    spans, begin = [], 0
    for end, nxt in _break_points(text):
        spans.append([begin, end])
        begin = nxt
    spans.append([begin, len(text.rstrip())])
    # Realign: a sentence that opens with closing quotes/brackets hands them to the one before.
    for prev, cur in zip(spans, spans[1:]):
        m = _REALIGN.match(text, cur[0], cur[1])
        if m:
            prev[1] = cur[0] + len(m.group().rstrip())
            cur[0] = m.end()
    return [text[a:b] for a, b in spans if text[a:b]]


def count_sentences(text: str) -> int:
    """Number of sentences (IFEval's `length_constraints:number_sentences`)."""
    return len(split_sentences(text))


def count_words(text: str) -> int:
    """Number of `\\w+` runs (IFEval's word count; NLTK's RegexpTokenizer(r"\\w+") does the same)."""
    return len(re.findall(r"\w+", text))


# Penn Treebank word rules (nltk.word_tokenize applies them to each Punkt sentence), in order.
_TREEBANK_PUNCT = [
    (re.compile(r'^"'), ' " '),  # opening double quote (NLTK writes `` for it)
    (re.compile(r'([ (\[{<])"'), r' \1 " '),
    (re.compile(r"\.\.\."), " ... "),
    (re.compile(r"[;@#$%&?!]"), r" \g<0> "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),  # ":" and "," split unless inside a number
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"([^.])(\.)([\])}>\"']*)\s*$"), r"\1 \2\3 "),  # only the sentence's final period
    (re.compile(r"[\]\[(){}<>]"), r" \g<0> "),
    (re.compile(r"--"), " -- "),
]
# Applied to " sentence ": closing quotes and contractions ("don't" -> "do", "n't"; "cannot" -> "can", "not").
_TREEBANK_ENDINGS = [
    (re.compile(r'"'), ' " '),  # closing double quote (NLTK writes '')
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
    (re.compile(r"(?i)\b(can)(not)\b"), r" \1 \2 "),
    (re.compile(r"(?i)\b(d)('ye)\b"), r" \1 \2 "),
    (re.compile(r"(?i)\b(gim|lem)(me)\b"), r" \1 \2 "),
    (re.compile(r"(?i)\b(gon|wan)(na)\b"), r" \1 \2 "),
    (re.compile(r"(?i)\b(got)(ta)\b"), r" \1 \2 "),
    (re.compile(r"(?i)\b(more)('n)\b"), r" \1 \2 "),
    (re.compile(r"(?i)('t)(is|was)\b"), r" \1 \2 "),
]


def word_tokenize(text: str) -> list[str]:
    """Words and punctuation as `nltk.word_tokenize` splits them (double quotes stay `"`)."""
    tokens: list[str] = []
    for sentence in split_sentences(text):
        for pattern, repl in _TREEBANK_PUNCT:
            sentence = pattern.sub(repl, sentence)
        sentence = " " + sentence + " "
        for pattern, repl in _TREEBANK_ENDINGS:
            sentence = pattern.sub(repl, sentence)
        tokens.extend(sentence.split())
    return tokens
