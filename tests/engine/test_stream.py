"""The text layer: incremental detokenization and stop strings, with a tiny byte-level tokenizer."""

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from pippin.engine.engine import Engine
from pippin.engine.sampling import SamplingParams
from pippin.engine.stream import Delta, Final, held_back, stream_ids
from pippin.model.tokenizer import Tokenizer
from tests.conftest import tiny_model


def byte_tokenizer() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, chat_template=None, special={})


def test_deltas_concatenate_to_final_text_and_stop_strings_cut():
    model, tok = tiny_model(), byte_tokenizer()
    engine = Engine(model, max_len=128)
    prompt = tok.encode("hello")
    full = [e for e in stream_ids(engine, tok, prompt, SamplingParams(max_new_tokens=30, ignore_eos=True))]
    final = full[-1]
    assert isinstance(final, Final) and final.finish_reason == "length"
    assert "".join(e.text for e in full if isinstance(e, Delta)) == final.text
    assert len(final.token_ids) == 30
    # Pick a stop string from the middle of the unconstrained text: generation must end right before it.
    text = final.text
    stop = text[10:13]
    cut = [e for e in stream_ids(engine, tok, prompt, SamplingParams(max_new_tokens=30, ignore_eos=True, stop=(stop,)))]
    assert cut[-1].text == text[: text.find(stop)]
    assert cut[-1].finish_reason == "stop"
    assert "".join(e.text for e in cut if isinstance(e, Delta)) == cut[-1].text


def test_held_back_tail():
    assert held_back("abc</", ("</s>",)) == 2
    assert held_back("abc", ("</s>",)) == 0
