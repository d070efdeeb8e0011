"""Calibration statistics for compression: input second moments per linear, diagonal Fisher per weight.

- `input_moments`: E[x_k^2] of every linear's input over calibration tokens (llama.cpp's imatrix, the
  GPTQ Hessian diagonal). It weights each input channel in the k-means fit.
- `input_second_moments`: the full E[x x^T] (K x K) of every linear's input, which GPTQ-style error
  feedback (`pippin.quant.palettize.error_feedback`) and the residual start of recovery adapters use.
- `fisher_diagonal`: the mean squared gradient of the LM loss per weight (SqueezeLLM, HAWQ). Summed
  against a layer's squared quantization error it estimates how much that layer alone, at those bits,
  raises the loss (second-order Taylor), which is what the bit allocator minimises.
- `sequential_second_moments`: the same E[x x^T], block by block on the model as the caller quantizes it (GPTQ).
The first three run on any nn.Module whose linears are nn.Linear; the model is called as model(tokens).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pippin.errors import PippinError


def read_calibration_text(path: str | Path) -> str:
    """Plain text, or JSON/JSONL rows whose string fields longer than 40 characters are taken (text, output...)."""
    path = Path(path)
    if not path.is_file():
        raise PippinError(f"Calibration file {path} does not exist.")
    raw = path.read_text(errors="replace")
    if path.suffix not in (".jsonl", ".json"):
        return raw
    rows = json.loads(raw) if path.suffix == ".json" else [json.loads(line) for line in raw.splitlines() if line.strip()]
    texts = []
    for row in rows if isinstance(rows, list) else [rows]:
        if isinstance(row, str):
            texts.append(row)
        elif isinstance(row, dict):
            texts.extend(v for v in row.values() if isinstance(v, str) and len(v) > 40)
    return "\n\n".join(texts)


def stdlib_docstrings(n_modules: int = 200) -> str:
    """The docstrings (module, classes, functions) of the first n standard-library modules by name: technical prose
    that ships with Python, read from the sources with `ast` (nothing is imported). The fidelity measure's technical
    text, the language reference in `pydoc_data`, is left out."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("_", "pydoc_data", "test", "site-packages")
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
    files += sorted(p / "__init__.py" for p in root.iterdir() if not p.name.startswith(skip) and (p / "__init__.py").is_file())
    texts = []
    for path in sorted(files, key=lambda p: p.parent.name if p.name == "__init__.py" else p.stem)[:n_modules]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        nodes = [tree] + [d for d in ast.walk(tree) if isinstance(d, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        texts += [d for node in nodes if (d := ast.get_docstring(node)) and len(d) > 40]
    if not texts:
        raise PippinError(f"No standard-library sources with docstrings under {root}.")
    return "\n\n".join(texts)


def mixed_windows(sources: Sequence[Sequence[int]], *, seq_len: int) -> list[int]:
    """Windows of seq_len tokens taken from each source in turn (one that runs out drops out), concatenated: the first
    n windows, which is what calibration reads, then draw on every source (chat, prose, code...), not on the first."""
    cuts = [[list(s[i : i + seq_len]) for i in range(0, len(s), seq_len)] for s in sources]
    out: list[int] = []
    for k in range(max((len(c) for c in cuts), default=0)):
        for c in cuts:
            if k < len(c):
                out += c[k]
    return out


def calibration_batches(tokens: list[int], *, seq_len: int, n_seqs: int, min_tokens: int = 256) -> torch.Tensor:
    """(n, seq_len) windows of the calibration tokens; too little text is a clear error."""
    if len(tokens) < min_tokens:
        raise PippinError(
            f"The calibration text has only {len(tokens)} tokens; give at least {min_tokens} (a few paragraphs of plain text)."
        )
    n = max(1, min(n_seqs, len(tokens) // seq_len))
    seq_len = min(seq_len, len(tokens))
    return torch.tensor(tokens[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def input_moments(model: nn.Module, batches: torch.Tensor, names: list[str], *, progress: bool = False) -> dict[str, torch.Tensor]:
    """E[x_k^2] per input channel of each named linear."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    hooks = []
    modules = dict(model.named_modules())
    for name in names:

        def hook(mod, inp, out, name=name):
            x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)

        hooks.append(modules[name].register_forward_hook(hook))
    try:
        for b in tqdm(batches, desc="activation stats", disable=not progress):
            model(b.unsqueeze(0))
            count += b.numel()
    finally:
        for h in hooks:
            h.remove()
    return {n: s / count for n, s in sums.items()}


def fisher_diagonal(model: nn.Module, batches: torch.Tensor, names: list[str], *, progress: bool = False) -> dict[str, torch.Tensor]:
    """Mean squared per-sequence gradient of the next-token loss for each named linear's weight."""
    modules = dict(model.named_modules())
    params = [modules[n].weight for n in names]
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(modules[n].weight) for n in names}
    try:
        for b in tqdm(batches, desc="fisher", disable=not progress):
            logits = model(b.unsqueeze(0))
            loss = F.cross_entropy(logits[0, :-1].float(), b[1:])
            grads = torch.autograd.grad(loss, params)
            for n, g in zip(names, grads):
                fisher[n] += g * g
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
    return {n: f / len(batches) for n, f in fisher.items()}


@torch.no_grad()
def input_second_moments(
    model: nn.Module, sequences: Sequence[torch.Tensor], names: list[str], *, progress: bool = False
) -> dict[str, torch.Tensor]:
    """H = E[x x^T] (float64, K x K) of the inputs of each named module over calibration token sequences (each (T,)).

    Modules that read the same tensor (q, k and v; gate and up) get one shared matrix, computed once: a first
    forward only looks at which modules read which tensor."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise PippinError(f"The model has no module named {missing[0]!r}.")
    read: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    leaders: set[str] = set()

    def hook(name: str):  # noqa: ANN202 - a forward hook
        def fn(mod, inp, out) -> None:  # noqa: ANN001
            if not leaders:  # discovery pass: hold the tensors, so that no two can share an id (or a freed buffer)
                read[name] = inp[0]
            elif name in leaders:
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
                xx = (x.T @ x).double()  # fp32 products (fast), a float64 running sum
                if name in sums:
                    sums[name] += xx
                else:
                    sums[name] = xx

        return fn

    was_training = model.training
    model.eval()
    hooks = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        model(sequences[0][:8].unsqueeze(0))
        leader_of = {}
        first_reader: dict[int, str] = {}
        for n in names:
            leader_of[n] = first_reader.setdefault(id(read[n]), n)
        leaders.update(leader_of.values())
        read.clear()
        for seq in tqdm(sequences, desc="input moments", disable=not progress):
            model(seq.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for h in sums.values():
        h /= sum(seq.numel() for seq in sequences)
    return {n: sums[leader_of[n]] for n in names}  # followers share their leader's tensor


BLOCK_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
"""The linears of a block in the order they run, grouped by the tensor they read."""


class _Stop(Exception):
    """Raised by a hook once it has its input: the rest of the block need not run."""


@torch.no_grad()
def sequential_second_moments(
    model: nn.Module, sequences: torch.Tensor, *, head: str | None = None, chunk: int = 4, progress: bool = False
) -> Iterator[tuple[tuple[str, ...], torch.Tensor]]:
    """Yield (names, H = E[x x^T]) for each group of linears that read one tensor, block by block in model order, then
    for the module named `head` (the head's input). Each H is measured on the model as it is when it is asked for:
    the caller quantizes the named modules before taking the next group, so later layers see the error of earlier
    ones and their quantization corrects it (GPTQ's sequential order). sequences: (n, T) calibration tokens.

    Needs the Llama layout (`embed_tokens`, `layers[i]` called as block(x, cos, sin, cache, mask), `head`); the
    block's hidden states are kept (n * T * dim floats) instead of rerunning the prefix."""
    T = sequences.shape[1]
    cos, sin = model.rope_cos[:T][None, None], model.rope_sin[:T][None, None]
    xs = [model.embed_tokens(sequences[i : i + chunk]) for i in range(0, len(sequences), chunk)]
    n_tokens = sequences.numel()

    def moment(module: nn.Module, run) -> torch.Tensor:  # noqa: ANN001 - run(x) drives the forward to the module
        acc: list[torch.Tensor] = []

        def hook(mod, inp, out) -> None:  # noqa: ANN001
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            xx = (x.T @ x).double()
            if acc:
                acc[0] += xx
            else:
                acc.append(xx)
            raise _Stop

        handle = module.register_forward_hook(hook)
        try:
            for x in xs:
                with contextlib.suppress(_Stop):
                    run(x)
        finally:
            handle.remove()
        return acc[0] / n_tokens

    for i, block in enumerate(tqdm(model.layers, desc="sequential", disable=not progress)):
        for group in BLOCK_GROUPS:
            H = moment(block.get_submodule(group[0]), lambda x, b=block: b(x, cos, sin, None, None))
            yield tuple(f"layers.{i}.{g}" for g in group), H
        xs = [block(x, cos, sin, None, None) for x in xs]
    if head is not None:
        yield (head,), moment(model.get_submodule(head), model.head)
