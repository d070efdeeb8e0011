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
`collate` pads one example per row; `pack` fills fixed-length rows with several examples, each attending only to
itself (a block-diagonal causal mask) at positions restarting from 0, so a packed row computes what the examples
would alone (full fine-tuning, pippin.train.sft). The mask does the separating; RoPE being relative, the restart only
keeps each example's positions (and rounding) as they are alone, and within the model's max_seq_len.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

import torch
from tqdm import tqdm

from pippin.errors import PippinError
from pippin.io import jsonl_rows, write_json_atomic

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
    if path.read_bytes().lstrip().startswith(b"["):  # one JSON array of rows
        try:
            rows = json.loads(path.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PippinError(f"{path}: not valid UTF-8 JSON ({e}).") from None
        out = [_row_to_messages(row, fmt, f"{path}[{i}]") for i, row in enumerate(rows)]
    else:
        out = [_row_to_messages(row, fmt, f"{path}:{n}") for n, row in jsonl_rows(path)]
    out = out[skip : None if limit is None else skip + limit]
    if not out:
        raise PippinError(f"{path} has no rows in the requested range.")
    return out


def tokenize_chat(tokenizer, messages: list[dict[str, str]], *, max_len: int | None = None) -> Example:  # noqa: ANN001 - pippin Tokenizer
    """Ids and assistant-only mask, cut to max_len tokens (None: whole); each turn is rendered with the template, so the
    pieces concatenate exactly."""
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


@dataclass(kw_only=True)
class PackStats:
    n_examples: int
    """Examples packed."""
    n_truncated: int
    """Examples longer than seq_len + 1 tokens, cut to that (their tail is not trained on)."""
    n_dropped: int
    """Examples with no loss token left (after the cut), left out."""
    n_rows: int
    n_tokens: int
    """Slots holding a real token (the rest is padding)."""
    n_slots: int

    @property
    def efficiency(self) -> float:
        """Real tokens / slots: the share of the compute that trains on data."""
        return self.n_tokens / max(self.n_slots, 1)

    def to_dict(self) -> dict[str, int | float]:
        return {**asdict(self), "efficiency": self.efficiency}


@dataclass(kw_only=True)
class Packed:
    """Examples packed into fixed-length rows for next-token prediction; every tensor is (N rows, T = seq_len)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    """The token after each input within its example (0 where there is none: padding)."""
    loss_mask: torch.Tensor
    """True where the target is trained on (the example's own mask, shifted like the targets)."""
    positions: torch.Tensor
    """RoPE positions, restarting from 0 at each example."""
    segments: torch.Tensor
    """Which example of its row a slot holds (0, 1, ...); the padding after the last one is a segment of its own."""
    sources: list[list[int]]
    """For each row, the indices (into `pack`'s input) of its examples, in segment order."""
    stats: PackStats


def pack(examples: list[Example], *, seq_len: int, pad_id: int = 0) -> Packed:
    """Best-fit decreasing packing: longest example first, each into the fullest row it still fits, else a new row.

    An example of n tokens takes n - 1 slots (input token -> next token), so one of up to seq_len + 1 tokens fits a
    row; a longer one is cut to that. Examples with no loss token after the cut are dropped (they teach nothing)."""
    if seq_len < 1:
        raise PippinError(f"seq_len must be >= 1, got {seq_len}.")
    units: dict[int, Example] = {}
    n_truncated = 0
    for i, e in enumerate(examples):
        if len(e.ids) > seq_len + 1:
            n_truncated += 1
            e = Example(ids=e.ids[: seq_len + 1], mask=e.mask[: seq_len + 1])
        if any(e.mask[1:]):
            units[i] = e
    if not units:
        raise PippinError(f"None of the {len(examples)} examples has a loss token within {seq_len + 1} tokens; raise seq_len (--seq-len).")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the first entry with room >= n is the fullest fit
    for i in sorted(units, key=lambda i: -len(units[i].ids)):  # stable: equal lengths keep the data's order
        n = len(units[i].ids) - 1
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            room, row = seq_len - n, len(rows) - 1
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            room -= n
        if room:
            bisect.insort(free, (room, row))
    N = len(rows)
    inputs = torch.full((N, seq_len), pad_id, dtype=torch.long)
    targets = torch.zeros_like(inputs)
    loss_mask = torch.zeros_like(inputs, dtype=torch.bool)
    positions = torch.zeros_like(inputs)
    segments = torch.zeros_like(inputs)
    for r, members in enumerate(rows):
        t = 0
        for s, i in enumerate(members):
            e, n = units[i], len(units[i].ids) - 1
            inputs[r, t : t + n] = torch.tensor(e.ids[:-1])
            targets[r, t : t + n] = torch.tensor(e.ids[1:])
            loss_mask[r, t : t + n] = torch.tensor(e.mask[1:])
            positions[r, t : t + n] = torch.arange(n)
            segments[r, t : t + n] = s
            t += n
        positions[r, t:] = torch.arange(seq_len - t)
        segments[r, t:] = len(members)
    n_tokens = sum(len(e.ids) - 1 for e in units.values())
    stats = PackStats(
        n_examples=len(units),
        n_truncated=n_truncated,
        n_dropped=len(examples) - len(units),
        n_rows=N,
        n_tokens=n_tokens,
        n_slots=N * seq_len,
    )
    return Packed(inputs=inputs, targets=targets, loss_mask=loss_mask, positions=positions, segments=segments, sources=rows, stats=stats)


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> bool (B, 1, T, T), True where a query may attend: earlier slots of its own segment."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal).unsqueeze(1)
