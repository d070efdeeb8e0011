"""Shared fixtures: tiny random models for logic, the real default model (converted once) for `real` tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pippin.model.config import ModelConfig
from pippin.model.transformer import Transformer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under CI the kernel tests must run, not skip: a kernel build that fails ends the run (14 tests would skip)."""
    if os.environ.get("CI") and os.environ.get("PIPPIN_KERNELS", "1") != "0":
        from pippin.kernels import ops

        if ops() is None:
            pytest.exit("CI: pippin's CPU kernels did not build (see the warning above); the kernel tests cannot be skipped", returncode=1)


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


@contextlib.contextmanager
def fused_block_calls() -> Iterator[list[bool]]:
    """Record every decoder block that runs on the kernels (a FusedDecoder's plan, built while this is open): one
    bool per block and step, True when its rows ran at their own cache offsets (ragged rows)."""
    from pippin.kernels.decoder import FusedDecoder

    calls: list[bool] = []
    build = FusedDecoder.from_model.__func__

    class Plan:
        def __init__(self, plan, n_layers: int) -> None:  # noqa: ANN001
            self.plan, self.n_layers = plan, n_layers

        def forward(self, *a):  # noqa: ANN002, ANN201
            calls.extend([a[6] is not None] * self.n_layers)  # a[6]: per-row starts
            return self.plan.forward(*a)

    def spy(cls, model):  # noqa: ANN001, ANN202
        dec = build(cls, model)
        if dec.plan is not None:
            dec.plan = Plan(dec.plan, len(model.layers))
        return dec

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FusedDecoder, "from_model", classmethod(spy))
        yield calls


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


def kernel_variants() -> list[str]:
    """The act8 kernel variants this CPU can run (AVX2 always; AVX-512 VNNI where present)."""
    from pippin.kernels import ops

    k = ops()
    return [] if k is None else ["avx2-fma"] + (["avx512-vnni"] if k.cpu_has_vnni() else [])


@contextlib.contextmanager
def use_variant(name: str) -> Iterator[None]:
    """Run the block with the named act8 kernel variant, then restore the one that was running."""
    from pippin.kernels import ops

    before = ops().kernel_variant()
    ops().set_kernel_variant(name)
    try:
        yield
    finally:
        ops().set_kernel_variant(before)


def assert_fused_like_reference(run, reference, fused) -> list[torch.Tensor]:  # noqa: ANN001 - run(forward) -> logits
    """The fused decoder's logits equal the reference's (1e-4), and the same on one thread as on several (1e-6): the
    plan's phases are split over the threads. Returns the fused run's logits."""
    want, got = run(reference), run(fused)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for a, b in zip(run(fused), got, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    finally:
        torch.set_num_threads(threads)
    return got


_BROWSER: dict[str, int] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count the web playground's browser tests by outcome (see pytest_terminal_summary)."""
    if "test_browser.py" in report.nodeid and (report.when == "call" or report.skipped):
        _BROWSER[report.outcome] = _BROWSER.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's TerminalReporter
    """Say in every run whether the browser tests ran in chromium, so CI output shows it (they skip without chromium)."""
    if _BROWSER:
        counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(_BROWSER.items()))
        terminalreporter.write_line(f"web playground in headless chromium: {counts}")
