"""The Porter stemmer (M.F. Porter, "An algorithm for suffix stripping", 1980), for ROUGE with stemming.

`rouge-score` stems with NLTK's `PorterStemmer()`, whose default mode adds a few well-known changes to the
1980 rules; we follow that mode so stemmed ROUGE matches: a small table of irregular words, "ies"/"ied" on
four-letter words keep their "e" ("ties" -> "tie"), "y" -> "i" only after a consonant ("enjoy" stays), and the
Step 2 rules "bli" -> "ble", "logi" -> "log" and "fulli" -> "ful". Input is lower-cased;
words of one or two letters are returned unchanged.
"""

from __future__ import annotations

_IRREGULAR = {
    "skies": "sky",
    "sky": "sky",
    "dying": "die",
    "lying": "lie",
    "tying": "tie",
    "news": "news",
    "innings": "inning",
    "inning": "inning",
    "outings": "outing",
    "outing": "outing",
    "cannings": "canning",
    "canning": "canning",
    "howe": "howe",
    "proceed": "proceed",
    "exceed": "exceed",
    "succeed": "succeed",
}


def _is_consonant(word: str, i: int) -> bool:
    if word[i] in "aeiou":
        return False
    if word[i] == "y":  # "y" is a consonant at the start or after a vowel
        return i == 0 or not _is_consonant(word, i - 1)
    return True


def _measure(stem: str) -> int:
    """m in [C](VC)^m[V]: the number of vowel-consonant sequences."""
    pattern = "".join("c" if _is_consonant(stem, i) else "v" for i in range(len(stem)))
    return pattern.count("vc")


def _has_vowel(stem: str) -> bool:
    return any(not _is_consonant(stem, i) for i in range(len(stem)))


def _ends_double_consonant(word: str) -> bool:
    return len(word) >= 2 and word[-1] == word[-2] and _is_consonant(word, len(word) - 1)


def _ends_cvc(word: str) -> bool:
    """*o: consonant-vowel-consonant, the last not w, x or y (or, NLTK, a two-letter vowel-consonant word)."""
    if len(word) >= 3:
        return (
            _is_consonant(word, len(word) - 3)
            and not _is_consonant(word, len(word) - 2)
            and _is_consonant(word, len(word) - 1)
            and word[-1] not in "wxy"
        )
    return len(word) == 2 and not _is_consonant(word, 0) and _is_consonant(word, 1)


def _apply_rules(word: str, rules: list[tuple[str, str]], min_measure: int) -> str:
    """Replace the first listed suffix that ends `word`, if the stem's measure exceeds `min_measure`."""
    for suffix, replacement in rules:
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            return stem + replacement if _measure(stem) > min_measure else word
    return word


# fmt: off
_STEP2 = [
    ("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"), ("bli", "ble"),
    ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"), ("ation", "ate"),
    ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"),
    ("iviti", "ive"), ("biliti", "ble"), ("fulli", "ful"),
]
# fmt: on
_STEP3 = [("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""), ("ness", "")]
# fmt: off
_STEP4 = [(suffix, "") for suffix in (
    "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ou", "ism", "ate", "iti", "ous", "ive", "ize",
)]
# fmt: on


def _step1(word: str) -> str:
    # 1a: plurals
    if word.endswith("sses"):
        word = word[:-2]
    elif word.endswith("ies"):
        word = word[:-1] if len(word) == 4 else word[:-2]
    elif word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    # 1b: past tense and gerunds
    if word.endswith("ied"):
        word = word[:-1] if len(word) == 4 else word[:-2]
    elif word.endswith("eed"):
        if _measure(word[:-3]) > 0:
            word = word[:-1]
    else:
        for suffix in ("ed", "ing"):
            stem = word[: -len(suffix)]
            if word.endswith(suffix) and _has_vowel(stem):
                if stem.endswith(("at", "bl", "iz")):
                    word = stem + "e"
                elif _ends_double_consonant(stem) and stem[-1] not in "lsz":
                    word = stem[:-1]
                elif _measure(stem) == 1 and _ends_cvc(stem):
                    word = stem + "e"
                else:
                    word = stem
                break
    # 1c: y -> i after a consonant
    if word.endswith("y") and len(word) > 2 and _is_consonant(word, len(word) - 2):
        word = word[:-1] + "i"
    return word


def stem(word: str) -> str:
    """The Porter stem of one word (lower-cased)."""
    word = word.lower()
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 2:
        return word
    word = _step1(word)
    # NLTK applies "alli" -> "al" first and runs Step 2 again on the result.
    if word.endswith("alli") and _measure(word[:-4]) > 0:
        word = word[:-2]
    if word.endswith("logi") and _measure(word[:-3]) > 0:  # NLTK keeps the "l" in the stem it measures
        word = word[:-1]
    else:
        word = _apply_rules(word, _STEP2, 0)
    word = _apply_rules(word, _STEP3, 0)
    if word.endswith("ion") and word[:-3].endswith(("s", "t")) and _measure(word[:-3]) > 1:
        word = word[:-3]
    elif not word.endswith("ion"):
        word = _apply_rules(word, _STEP4, 1)
    # 5a: a final "e"; 5b: "ll" -> "l"
    if word.endswith("e"):
        base = word[:-1]
        if _measure(base) > 1 or (_measure(base) == 1 and not _ends_cvc(base)):
            word = base
    if word.endswith("ll") and _measure(word[:-1]) > 1:
        word = word[:-1]
    return word
