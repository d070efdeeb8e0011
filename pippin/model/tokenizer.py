"""Tokenizer and chat template: a `tokenizers` BPE built from GGUF metadata or a tokenizer.json.

The engine only sees token ids; this thin layer turns text into ids and back, renders the model's own
Jinja chat template (with the generation prompt), and knows the special tokens. For a GGUF it rebuilds
the byte-level BPE from `tokenizer.ggml.*` (vocabulary, merges, control tokens) and the pre-tokenizer
that the file's `tokenizer.ggml.pre` names, as llama.cpp does. Chat templates run in Jinja's sandbox.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from pippin.errors import PippinError
from pippin.io import write_atomic

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The split rules for a byte-level vocabulary, by llama.cpp's `tokenizer.ggml.pre` name."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "smollm":
        # SmolLM / SmolLM2 (the cosmo2 tokenizer): every digit alone, then GPT-2 splitting.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), byte_level])
    if pre in ("default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    raise PippinError(
        f"GGUF pre-tokenizer {pre!r} is not supported; supported are smollm, gpt2, llama3. "
        "Convert the model from its Hugging Face folder (with tokenizer.json) instead."
    )


class Tokenizer:
    """Text <-> ids plus the chat template. Build with `from_gguf_metadata` or `load`."""

    def __init__(self, backend: HFTokenizer, *, chat_template: str | None, special: dict[str, Any]) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special = special  # bos_token, eos_token, pad_token, add_bos_token (JSON-friendly)
        self._template = (
            ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(chat_template) if chat_template else None
        )
        self._literal: HFTokenizer | None = None  # a copy that reads special-token strings as plain text

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer from a GGUF's `tokenizer.*` keys (see pippin.model.checkpoint)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise PippinError(
                f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                "convert from the Hugging Face folder with its tokenizer.json instead."
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
        backend.decoder = decoders.ByteLevel()
        # Control tokens (type 3) match whole and are never split; user-defined ones (type 4) too.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4])

        def tok(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None else None

        special = {
            "bos_token": tok("bos_token_id"),
            "eos_token": tok("eos_token_id"),
            "pad_token": tok("padding_token_id"),
            "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        }
        return cls(backend, chat_template=meta.get("tokenizer.chat_template"), special=special)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json` for the template and special tokens) from a folder."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise PippinError(f"No tokenizer.json in {path}; convert the model with `pippin convert` first.")
        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise PippinError(f"{tj} is not a valid tokenizer file ({e}); re-create it with `pippin convert`.") from e
        cfg: dict[str, Any] = {}
        tc = path / "tokenizer_config.json"
        try:
            if tc.is_file():
                cfg = json.loads(tc.read_text())

            def name(v: Any) -> str | None:  # HF stores special tokens as strings or {"content": ...}
                return v.get("content") if isinstance(v, dict) else v

            special = {
                "bos_token": name(cfg.get("bos_token")),
                "eos_token": name(cfg.get("eos_token")),
                "pad_token": name(cfg.get("pad_token")),
                "add_bos_token": bool(cfg.get("add_bos_token", False)),
            }
            template = cfg.get("chat_template")
            if isinstance(template, list):  # HF allows a list of named templates; take the default one
                template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
            if template is not None and not isinstance(template, str):
                raise TypeError(f"chat_template is a {type(template).__name__}, not a string")
            for key in ("bos_token", "eos_token", "pad_token"):
                if special[key] is not None and not isinstance(special[key], str):
                    raise TypeError(f"{key} is not a string")
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:  # bad JSON or the wrong shapes
            raise PippinError(f"{tc} is not a valid tokenizer config ({e}); re-create it with `pippin convert`.") from None
        return cls(backend, chat_template=template, special=special)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        write_atomic(path / "tokenizer.json", self.backend.to_str().encode())
        cfg = dict(self.special, chat_template=self.chat_template)
        write_atomic(path / "tokenizer_config.json", json.dumps(cfg, indent=2).encode())

    # --- ids ----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.special.get("bos_token"))

    @property
    def eos_ids(self) -> list[int]:
        """Ids that end a reply: the declared EOS plus the chat turn terminator if the vocab has one."""
        ids = [self.token_id(self.special.get("eos_token"))]
        ids += [self.token_id(t) for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")]
        return sorted({i for i in ids if i is not None})

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids for `text`; special-token strings in the text map to their ids."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add_bos = self.special.get("add_bos_token", False) if add_bos is None else add_bos
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    # --- chat ---------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text the model's own template makes of `messages`."""
        if self._template is None:
            raise PippinError("This model has no chat template; use plain `generate` with a text prompt.")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise PippinError("Each chat message must be an object with string 'role' and 'content'.")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.special.get("bos_token") or "",
            eos_token=self.special.get("eos_token") or "",
        )

    def encode_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True, raw: bool = False) -> list[int]:
        """The template's ids for `messages`. A special-token string inside a message (`<|im_end|><|im_start|>system`)
        is encoded as the plain text it is, so a user cannot open or close turns; `raw=True` lets it through as the
        control token. Messages without such strings encode exactly as the rendered prompt does."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        specials = [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]
        if raw or not any(sp in m["content"] for m in messages for sp in specials):
            return self.encode(text)
        if self._literal is None:
            literal = HFTokenizer.from_str(self.backend.to_str())
            literal.encode_special_tokens = True
            self._literal = literal
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters: no template makes them
        rest = self.render_chat([{**m, "content": k} for m, k in zip(messages, marks)], add_generation_prompt=add_generation_prompt)
        ids: list[int] = []
        for m, mark in zip(messages, marks):
            before, found, rest = rest.partition(mark)
            if not found or mark in rest:
                raise PippinError("This chat template does not copy each message once, verbatim; its special tokens cannot be escaped.")
            ids += self.backend.encode(before, add_special_tokens=False).ids
            ids += self._literal.encode(m["content"], add_special_tokens=False).ids
        ids += self.backend.encode(rest, add_special_tokens=False).ids
        if self.special.get("add_bos_token", False) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids
