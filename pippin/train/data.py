"""Training data for adapters: chat JSONL with a loss mask on assistant tokens only, and plain-text windows.

Readers are chosen by an explicit format, never guessed from a file name:
- `chat`: one {"messages": [{"role": ..., "content": ...}, ...]} per line (the OpenAI / TRL shape);
- `dialogsum`: DialogSum rows ({"dialogue", "summary1", ...}) turned into "summarize this dialogue" chats;
- `xsum`: XSum rows ({"document", "summary"}) turned into one-sentence news summaries;
- `alpaca`: instruction-following rows ({"instruction", "output"}: Alpaca, AlpacaEval) turned into one-turn chats.
Files are JSONL, or one JSON array of rows (AlpacaEval's shape). A malformed row is an error naming the file and
line (or array index). Each chat is rendered with the model's own template turn by turn, so the mask covers exactly
the assistant replies (and their end-of-turn token), as TRL's `assistant_only_loss` does. `teacher_chats` replaces
the data's replies by a teacher's own (recovery adapters distil the full-precision model's answers, cached next to
the adapter), and `all_positions` puts every token under the loss (distillation matches the teacher on the prompt too).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from tqdm import tqdm

from pippin.errors import PippinError
from pippin.io import write_json_atomic

SUMMARIZE_DIALOGUE = "Summarize the following dialogue in a few sentences.\n\n{dialogue}"
SUMMARIZE_ARTICLE = "Summarize the following news article in one sentence.\n\n{document}"


class DataFormat(StrEnum):
    CHAT = "chat"
    DIALOGSUM = "dialogsum"
    XSUM = "xsum"
    ALPACA = "alpaca"


@dataclass(kw_only=True)
class Example:
    ids: list[int]
    mask: list[bool]
    """True where the token is predicted by the loss (assistant tokens)."""


def _row_to_messages(row: object, fmt: DataFormat, where: str) -> list[dict[str, str]]:
    if not isinstance(row, dict):
        raise PippinError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    try:
        if fmt is DataFormat.CHAT:
            msgs = row["messages"]
            if not isinstance(msgs, list) or not msgs:
                raise PippinError(f"{where}: 'messages' must be a non-empty list.")
            for m in msgs:
                if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                    raise PippinError(f"{where}: each message needs a role (system/user/assistant) and string content.")
            if not any(m["role"] == "assistant" for m in msgs):
                raise PippinError(f"{where}: the chat has no assistant message to learn from.")
            return msgs
        if fmt is DataFormat.DIALOGSUM:
            return [
                {"role": "user", "content": SUMMARIZE_DIALOGUE.format(dialogue=str(row["dialogue"]).strip())},
                {"role": "assistant", "content": str(row["summary1"] if "summary1" in row else row["summary"]).strip()},
            ]
        if fmt is DataFormat.ALPACA:
            instruction, output = str(row["instruction"]).strip(), str(row["output"]).strip()
            return [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
        return [
            {"role": "user", "content": SUMMARIZE_ARTICLE.format(document=str(row["document"]).strip())},
            {"role": "assistant", "content": str(row["summary"]).strip()},
        ]
    except KeyError as e:
        raise PippinError(f"{where}: missing field {e} for format '{fmt.value}'.") from None


def read_conversations(
    path: str | Path, fmt: DataFormat | str = DataFormat.CHAT, *, skip: int = 0, limit: int | None = None
) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL file (rows [skip, skip + limit)); errors name the line."""
    fmt = DataFormat(fmt)
    path = Path(path)
    if not path.is_file():
        raise PippinError(f"Training data {path} does not exist.")
    out = []
    text = path.read_text(errors="replace")
    if text.lstrip().startswith("["):  # one JSON array of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise PippinError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
        out = [_row_to_messages(row, fmt, f"{path}[{i}]") for i, row in enumerate(rows)]
    for i, line in enumerate([] if out else text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PippinError(f"{path}:{i}: not valid JSON ({e.msg}).") from None
        out.append(_row_to_messages(row, fmt, f"{path}:{i}"))
    out = out[skip : None if limit is None else skip + limit]
    if not out:
        raise PippinError(f"{path} has no rows in the requested range.")
    return out


def tokenize_chat(tokenizer, messages: list[dict[str, str]], *, max_len: int) -> Example:  # noqa: ANN001 - pippin Tokenizer
    """Ids and assistant-only mask; each turn is rendered with the template, so the pieces concatenate exactly."""
    ids: list[int] = []
    mask: list[bool] = []
    rendered = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
            piece = tokenizer.encode(prompt[len(rendered) :], add_bos=None if not ids else False)
            ids += piece
            mask += [False] * len(piece)
            rendered = prompt
        full = tokenizer.render_chat(messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(rendered):
            raise PippinError("The chat template does not render turn by turn (a prefix changed); cannot build an assistant mask.")
        piece = tokenizer.encode(full[len(rendered) :], add_bos=None if not ids else False)
        ids += piece
        mask += [m["role"] == "assistant"] * len(piece)
        rendered = full
    return Example(ids=ids[:max_len], mask=mask[:max_len])


def prompt_of(conversation: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages before the first assistant turn (what a teacher answers)."""
    return conversation[: next((i for i, m in enumerate(conversation) if m["role"] == "assistant"), len(conversation))]


def teacher_chats(
    conversations: list[list[dict[str, str]]],
    reply: Callable[[list[list[dict[str, str]]]], list[str]],
    *,
    cache: str | Path,
    key: str,
    chunk: int = 32,
) -> list[list[dict[str, str]]]:
    """Each conversation up to its first assistant turn, answered by `reply` (the teacher, e.g. greedy): the chats a
    recovery adapter distils on. Replies are cached in `cache` by prompt (JSON, rewritten atomically after every chunk,
    so a killed run resumes where it stopped and a changed selection reuses what it can); `key` names the teacher and
    its settings, and a cache made under another key is refused rather than mixed in."""
    prompts = [prompt_of(c) for c in conversations]
    if not all(prompts):
        raise PippinError("A conversation starts with an assistant turn; the teacher needs a prompt to answer.")
    digest = [hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:24] for p in prompts]
    cache = Path(cache)
    done: dict[str, str] = {}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") != key:
            raise PippinError(f"{cache} holds replies of another teacher or setting ({saved.get('key')}); delete it or use another --out.")
        done = dict(saved["replies"])
    todo = [i for i, d in enumerate(digest) if d not in done]
    with tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="teacher replies", unit="chat", disable=not todo) as bar:
        for k in range(0, len(todo), chunk):
            batch = todo[k : k + chunk]
            done.update(zip([digest[i] for i in batch], reply([prompts[i] for i in batch])))
            write_json_atomic(cache, {"key": key, "replies": done})
            bar.update(len(batch))
    return [p + [{"role": "assistant", "content": done[d]}] for p, d in zip(prompts, digest)]


def all_positions(example: Example) -> Example:
    """The same tokens with every position under the loss (distillation over prompt and reply alike)."""
    return Example(ids=example.ids, mask=[True] * len(example.ids))


def collate(examples: list[Example], *, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs (B, T), targets (B, T), loss mask (B, T)) for next-token prediction, right-padded."""
    T = max(len(e.ids) for e in examples) - 1
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full_like(inputs, pad_id)
    mask = torch.zeros_like(inputs, dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e.ids) - 1
        inputs[b, :n] = torch.tensor(e.ids[:-1])
        targets[b, :n] = torch.tensor(e.ids[1:])
        mask[b, :n] = torch.tensor(e.mask[1:])
    return inputs, targets, mask


def text_examples(tokens: list[int], *, seq_len: int) -> list[Example]:
    """Consecutive windows of a long token stream, every position predicted (distillation, LM losses)."""
    if len(tokens) < seq_len + 1:
        raise PippinError(f"Need at least {seq_len + 1} tokens of text for one training window, got {len(tokens)}.")
    return [Example(ids=tokens[i : i + seq_len + 1], mask=[True] * (seq_len + 1)) for i in range(0, len(tokens) - seq_len, seq_len)]
