"""The `tokenizer.*` keys of an exported GGUF: copied from the source GGUF, or built from the model's tokenizer.json.

A model that pippin converted from a GGUF records that file (`source` in config.json). When it is still there and
its vocabulary is the model's, every `tokenizer.*` key is copied verbatim with its GGUF value type (llama.cpp reads
exactly what it read before). Otherwise the keys are built as llama.cpp's convert_hf_to_gguf.py builds them for a
byte-level BPE: tokens by id, merges, token types (special added tokens are CONTROL, other added ones USER_DEFINED),
special ids, the chat template, and `tokenizer.ggml.pre`, recognised from the tokenizer.json pre-tokenizer (smollm,
gpt2, llama-bpe; others are refused: llama.cpp would split text differently from pippin).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from pippin.errors import PippinError
from pippin.model.tokenizer import LLAMA3_SPLIT, Tokenizer

Field = tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None]
"""(key, value, value type, array element type)."""


def source_gguf_fields(source: str | None, vocab_size: int) -> list[Field] | None:
    """The `tokenizer.*` fields of the GGUF a model was converted from, or None if there is none with this vocabulary."""
    if not source or not str(source).lower().endswith(".gguf") or not Path(source).is_file():
        return None
    try:
        reader = gguf.GGUFReader(source)
    except Exception:  # noqa: BLE001 - gguf raises ValueError / struct errors; an unreadable source means "build it"
        return None
    fields = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields.append((key, f.contents(), vtype, sub))
    tokens = next((v for k, v, *_ in fields if k == "tokenizer.ggml.tokens"), None)
    return fields if tokens is not None and len(tokens) == vocab_size else None


def _pre_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer (the ones pippin's GGUF reader rebuilds)."""
    if pre is None:
        raise PippinError("The tokenizer has no pre-tokenizer; llama.cpp needs a byte-level BPE one to split text.")
    if pre.get("type") == "ByteLevel":
        return "gpt2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    types = [p.get("type") for p in parts]
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if types == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise PippinError(
        f"The tokenizer's pre-tokenizer ({types or pre.get('type')}) has no llama.cpp name pippin knows (smollm, gpt2, "
        "llama-bpe); export a model converted from a GGUF, whose tokenizer keys are copied."
    )


def tokenizer_fields(tok: Tokenizer) -> list[Field]:
    """`tokenizer.*` fields for a byte-level BPE tokenizer (`Tokenizer`), as convert_hf_to_gguf.py writes them."""
    data = json.loads(tok.backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise PippinError(f"The tokenizer is a {model.get('type')} model; pippin exports byte-level BPE tokenizers to GGUF.")
    T = gguf.GGUFValueType
    n = tok.vocab_size
    tokens = [""] * n
    types = [int(gguf.TokenType.NORMAL)] * n
    for text, i in model["vocab"].items():
        tokens[i] = text
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    missing = [i for i, t in enumerate(tokens) if not t]
    if missing:
        raise PippinError(f"The tokenizer has no token for ids {missing[:5]}; its vocabulary has holes GGUF cannot store.")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields: list[Field] = [
        ("tokenizer.ggml.model", "gpt2", T.STRING, None),
        ("tokenizer.ggml.pre", _pre_name(data.get("pre_tokenizer")), T.STRING, None),
        ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
        ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
        ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
        ("tokenizer.ggml.add_bos_token", bool(tok.special.get("add_bos_token")), T.BOOL, None),
    ]
    for key, name in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"), ("padding_token_id", "pad_token")):
        i = tok.token_id(tok.special.get(name))
        if i is not None:
            fields.append((f"tokenizer.ggml.{key}", i, T.UINT32, None))
    if tok.chat_template:
        fields.append(("tokenizer.chat_template", tok.chat_template, T.STRING, None))
    return fields
