"""TextStream: incremental detokenization equals decoding everything at once; stop strings cut exactly."""

from __future__ import annotations

import pytest

from pippin.engine.stream import TextStream, held_back
from tests.engine.test_stream import byte_tokenizer


def feed(stream: TextStream, ids: list[int]) -> list[str]:
    out = [stream.push(t) for t in ids]
    if not stream.stopped:
        out.append(stream.flush())
    return out


@pytest.mark.parametrize("text", ["plain ascii text", "héllo wörld ✓ — 日本語 🙂", "a\nb\tc"])
def test_deltas_concatenate_to_the_full_decode_and_never_split_a_character(text):
    tok = byte_tokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())  # one token per byte: multi-byte characters span tokens
    deltas = feed(TextStream(tok), ids)
    assert "".join(deltas) == text == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_across_tokens_is_cut_and_its_start_held_back():
    tok = byte_tokenizer()
    s = TextStream(tok, ("END",))
    got = [s.push(t) for t in tok.encode("abc EN")]
    assert "".join(got) == "abc " and not s.stopped  # "EN" may become "END": held back
    assert s.push(tok.encode("D")[0]) == "" and s.stopped and s.text == "abc "
    assert s.push(tok.encode("x")[0]) == ""  # nothing after a stop


def test_held_back_text_is_released_when_it_does_not_become_a_stop():
    tok = byte_tokenizer()
    s = TextStream(tok, ("END", "##"))
    out = "".join(feed(s, tok.encode("one EN two # three #")))
    assert out == "one EN two # three #" and not s.stopped
    s = TextStream(tok, ("é!",))
    assert "".join(feed(s, tok.encode("café! more"))) == "caf" and s.stopped


def test_held_back():
    assert held_back("abc EN", ("END",)) == 2
    assert held_back("abc", ("END",)) == 0
    assert held_back("xx#", ("##", "#!")) == 1
