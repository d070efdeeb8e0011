"""The Python API in a few calls: load a model into an engine, then generate or stream text.

    import pippin
    engine, tok = pippin.load_engine()                      # the default model, kernels on
    print(pippin.generate("What is RoPE?", engine=engine, tokenizer=tok).text)

Everything here is a thin composition of pippin.model (checkpoints, tokenizer) and pippin.engine.
"""

from __future__ import annotations

import os

import torch

from pippin.engine.engine import Engine
from pippin.engine.sampling import SamplingParams
from pippin.engine.stream import Final, complete
from pippin.errors import PippinError
from pippin.model.checkpoint import LoadedModel, load_model
from pippin.model.tokenizer import Tokenizer


def _prepare(model: torch.nn.Module, meta: dict) -> None:
    """Rebuild compressed module layouts recorded in a checkpoint's config.json."""
    if "quantization" in meta:
        from pippin.quant.compress import apply_structure_

        apply_structure_(model, meta["quantization"])


def load_any(model: str | os.PathLike | None = None, *, progress: bool = False) -> LoadedModel:
    """Like pippin.model.checkpoint.load_model, but also loads compressed (palettized) checkpoints."""
    return load_model(model, progress=progress, prepare=_prepare)


def load_engine(
    model: str | os.PathLike | None = None,
    *,
    kernels: bool = True,
    max_len: int | None = None,
    max_batch: int = 1,
    threads: int | None = None,
    progress: bool = False,
) -> tuple[Engine, Tokenizer]:
    """Load a checkpoint (None = the default model) and wrap it in an Engine with its tokenizer."""
    if threads:
        torch.set_num_threads(threads)
    loaded = load_any(model, progress=progress)
    if loaded.tokenizer is None:
        raise PippinError(f"{loaded.path} has no tokenizer; convert it with `pippin convert` from a source that has one.")
    if kernels:
        from pippin.kernels.modules import use_kernels_

        use_kernels_(loaded.model)
    return Engine(loaded.model, max_len=max_len, max_batch=max_batch), loaded.tokenizer


def generate(
    prompt: str | list[dict[str, str]],
    *,
    engine: Engine,
    tokenizer: Tokenizer,
    params: SamplingParams | None = None,
) -> Final:
    """The full reply to a text prompt (str) or a chat (list of {"role", "content"} messages)."""
    return complete(engine, tokenizer, prompt, params or SamplingParams())
