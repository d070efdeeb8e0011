"""Tiny compressed models for Talaria's tests (compressed once per session: about a second each)."""

from __future__ import annotations

import pytest

from pippin.quant.compress import CompressConfig, compress_
from tests.conftest import tiny_model

CALIB = list(range(3, 250)) * 4


def compressed_tiny(**config):
    """tiny_model() palettized by compress_ (allocated to a budget unless a plan is given); returns (model, report)."""
    model = tiny_model()
    cfg = CompressConfig(**{"candidate_bits": (2, 3, 4), "bpw": 4.0, "seq_len": 128, "n_seqs": 2, "hessian_seqs": 4} | config)
    report = compress_(model, CALIB, cfg)
    return model, report


@pytest.fixture(scope="session")
def tiny_compressed():
    """Mixed 2/3/4-bit linears, int8 embedding, act8 on."""
    return compressed_tiny(act8=True)
