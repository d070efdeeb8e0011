"""Calibration statistics for compression: input second moments per linear, diagonal Fisher per weight.

- `input_moments`: E[x_k^2] of every linear's input over calibration tokens (llama.cpp's imatrix, the
  GPTQ Hessian diagonal). It weights each input channel in the k-means fit.
- `fisher_diagonal`: the mean squared gradient of the LM loss per weight (SqueezeLLM, HAWQ). Summed
  against a layer's squared quantization error it estimates how much that layer alone, at those bits,
  raises the loss (second-order Taylor), which is what the bit allocator minimises.
Both run on any nn.Module whose linears are nn.Linear; the model is called as model(tokens).
"""

from __future__ import annotations

import json
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
