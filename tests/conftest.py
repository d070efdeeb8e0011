"""Shared fixtures: tiny random models for logic, the real default model (converted once) for `real` tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pippin.model.config import ModelConfig
from pippin.model.transformer import Transformer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A random 2-layer model; weights scaled up so logits are not all near zero."""
    cfg = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.__post_init__()
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08 if "embed" not in name else 0.3)
    return model.eval()


@pytest.fixture(scope="session")
def real_model():
    """The default model (SmolLM2-135M-Instruct from the shipped GGUF), as pippin loads it."""
    from pippin.model.checkpoint import load_model

    return load_model()


@pytest.fixture(scope="session")
def hf_real():
    """transformers' own load of the same GGUF: the independent peer for parity tests."""
    transformers = pytest.importorskip("transformers")
    from pippin.model.checkpoint import default_gguf_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok
