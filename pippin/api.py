"""The Python API in a few calls: load a model into an engine, then generate or stream text.

    import pippin
    engine, tok = pippin.load_engine()                      # the default model, kernels on
    print(pippin.generate("What is RoPE?", engine=engine, tokenizer=tok).text)

Everything here is a thin composition of pippin.model (checkpoints, tokenizer) and pippin.engine.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pippin.adapters.lora import LoraConfig, apply_lora
from pippin.adapters.store import AdapterStore
from pippin.engine.engine import Engine
from pippin.engine.sampling import SamplingParams
from pippin.engine.stream import Final, complete
from pippin.errors import PippinError
from pippin.model.checkpoint import LoadedModel, load_model, pippin_home
from pippin.model.tokenizer import Tokenizer

ADAPTER_SLOTS = 9
"""Default LoRA slots per model: 8 different adapters in one batch, plus slot 0 ("none")."""
MAX_ADAPTER_RANK = 16


def _prepare(model: torch.nn.Module, meta: dict) -> None:
    """Rebuild compressed module layouts recorded in a checkpoint's config.json."""
    if "quantization" in meta:
        from pippin.quant.compress import apply_structure_

        apply_structure_(model, meta["quantization"])


def load_any(model: str | os.PathLike | None = None, *, progress: bool = False) -> LoadedModel:
    """Like pippin.model.checkpoint.load_model, but also loads compressed (palettized) checkpoints."""
    return load_model(model, progress=progress, prepare=_prepare)


def default_adapters_dir(loaded: LoadedModel) -> Path:
    """Adapters live with the base they were trained on: <model folder>/adapters (or under $PIPPIN_HOME for a GGUF)."""
    if loaded.path.is_dir():
        return loaded.path / "adapters"
    return pippin_home() / "adapters" / loaded.path.stem


def attach_adapters(
    loaded: LoadedModel, adapters_dir: str | os.PathLike | None = None, *, n_slots: int = ADAPTER_SLOTS, max_rank: int = MAX_ADAPTER_RANK
) -> AdapterStore:
    """Give the model LoRA slots on every default target and an AdapterStore over `adapters_dir`."""
    apply_lora(loaded.model, LoraConfig(rank=max_rank), n_slots=n_slots)
    root = Path(adapters_dir) if adapters_dir is not None else default_adapters_dir(loaded)
    return AdapterStore(root, model=loaded.model)


def load_engine(
    model: str | os.PathLike | None = None,
    *,
    kernels: bool = True,
    max_len: int | None = None,
    max_batch: int = 1,
    threads: int | None = None,
    progress: bool = False,
    adapters: bool | str | os.PathLike = False,
    kv8: bool | None = None,
) -> tuple[Engine, Tokenizer]:
    """Load a checkpoint (None = the default model) and wrap it in an Engine with its tokenizer.

    kv8: an 8-bit KV cache; None follows the checkpoint (`pippin compress --kv8` records it).

    adapters: True to serve the adapters stored with the model (see default_adapters_dir), or a folder of
    adapters; requests then name one per row (`engine.generate(..., adapters=[...])`).
    """
    if threads:
        torch.set_num_threads(threads)
    loaded = load_any(model, progress=progress)
    if loaded.tokenizer is None:
        raise PippinError(f"{loaded.path} has no tokenizer; convert it with `pippin convert` from a source that has one.")
    store = None
    if adapters is not False:
        store = attach_adapters(loaded, None if adapters is True else adapters)
    kv8 = uses_kv8(loaded) if kv8 is None else kv8
    return Engine(loaded.model, max_len=max_len, max_batch=max_batch, adapters=store, kv8=kv8, kernels=kernels), loaded.tokenizer


def uses_kv8(loaded: LoadedModel) -> bool:
    """Whether a checkpoint asks for an 8-bit KV cache."""
    return bool(loaded.meta.get("quantization", {}).get("kv8"))


SELF_PROMPTS = (
    "Write a short news article about a new public library opening in a small town.",
    "Explain how vaccines train the immune system, for a curious teenager.",
    "Write a story about a lighthouse keeper who finds a message in a bottle.",
    "Give step-by-step instructions for baking a loaf of bread.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "Summarize the causes and effects of the French Revolution.",
    "Write a polite email asking a landlord to fix a broken heater.",
    "Describe the water cycle and why it matters for farming.",
    "What are the pros and cons of working from home? Answer in a few paragraphs.",
    "Write a dialogue between two friends planning a weekend hiking trip.",
    "Explain the difference between weather and climate with examples.",
    "Write a product review of a pair of running shoes after three months of use.",
    "List ten tips for learning a new language and explain each briefly.",
    "Describe how a bill becomes a law in a parliamentary democracy.",
    "Write a poem about the sea at night, then explain its imagery.",
    "Explain what a neural network is, using an analogy a child would understand.",
)


def self_generated_text(model: torch.nn.Module, tokenizer: Tokenizer, *, n_seqs: int = 16, max_new_tokens: int = 256, seed: int = 0) -> str:
    """Text the model writes itself (sampled answers to varied prompts): calibration and distillation data that
    needs nothing from outside, as in data-free quantization (LLM-QAT). Sampling at T=0.8, top-p 0.95."""
    prompts = [tokenizer.encode_chat([{"role": "user", "content": SELF_PROMPTS[i % len(SELF_PROMPTS)]}]) for i in range(n_seqs)]
    engine = Engine(model, max_batch=8, max_len=max(map(len, prompts)) + max_new_tokens)
    texts = []
    for i in range(0, n_seqs, 8):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, seed=seed + i)
        texts += [tokenizer.decode(ids) for ids in engine.generate_ids(prompts[i : i + 8], params)]
    return "\n\n".join(t.strip() for t in texts if t.strip())


def read_text_source(source: str, model: torch.nn.Module, tokenizer: Tokenizer) -> str:
    """A calibration/distillation text argument: a file path, 'self[:N]' for N sequences the model writes itself, or
    'docstrings[:N]' for the docstrings of N standard-library modules (technical prose)."""
    if source == "self" or source.startswith("self:"):
        n = int(source.partition(":")[2] or 16)
        return self_generated_text(model, tokenizer, n_seqs=n)
    if source == "docstrings" or source.startswith("docstrings:"):
        from pippin.quant.calibrate import stdlib_docstrings

        return stdlib_docstrings(int(source.partition(":")[2] or 200))
    from pippin.quant.calibrate import read_calibration_text

    return read_calibration_text(source)


def generate(
    prompt: str | list[dict[str, str]],
    *,
    engine: Engine,
    tokenizer: Tokenizer,
    params: SamplingParams | None = None,
    adapter: str | None = None,
) -> Final:
    """The full reply to a text prompt (str) or a chat (list of {"role", "content"} messages)."""
    return complete(engine, tokenizer, prompt, params or SamplingParams(), adapter=adapter)
