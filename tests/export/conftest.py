"""Tiny models for the export tests: full precision on GGML grids, and compressed (palettized, rotated)."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from pippin.model.checkpoint import LoadedModel
from pippin.quant.compress import CompressConfig, compress_
from tests.conftest import tiny_model

CALIB = list(range(3, 250)) * 4
PLAN_BITS = (2, 3, 4, 6)


def loaded(model) -> LoadedModel:  # noqa: ANN001
    return LoadedModel(model=model, tokenizer=None, path=Path("tiny"), meta={"name": "tiny"})


def on_ggml_grid(model) -> None:  # noqa: ANN001
    """Put every linear on the Q4_1 grid and the embedding on Q8_0's, as the default model's weights are."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                qtype = gguf.GGMLQuantizationType.Q8_0 if "embed" in name else gguf.GGMLQuantizationType.Q4_1
                back = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)
                p.copy_(torch.from_numpy(np.asarray(back, dtype=np.float32).reshape(p.shape)))


@pytest.fixture(scope="session")
def compressed_tiny():
    """A tiny model rotated and palettized: each layer's width cycles through 2/3/4/6 bits, a 4-bit LUT embedding
    with row scales (the 3.5 bpw model's layout)."""
    model = tiny_model(seed=1)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    plan = {n: PLAN_BITS[i % len(PLAN_BITS)] for i, n in enumerate(names)}
    cfg = CompressConfig(plan=plan, embed_bits=4, rotate=True, n_seqs=2, seq_len=128, hessian_seqs=2)
    compress_(model, CALIB, cfg)
    return model, plan
