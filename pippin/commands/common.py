"""Flags shared by the commands that load a model and generate, and the stats line they print."""

from __future__ import annotations

import argparse
import sys

from pippin.engine.engine import GenerationStats
from pippin.engine.sampling import SamplingParams


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="pippin or HF folder, .gguf file, or omit for the default model")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--no-kernels", action="store_true", help="use the plain PyTorch reference path")
    p.add_argument("--max-len", type=int, default=None, help="KV-cache capacity in tokens (default 4096)")
    p.add_argument(
        "--kv8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="8-bit KV cache (default: as the checkpoint says; `pippin compress --kv8` records it)",
    )
    p.add_argument("--adapter", default=None, help="LoRA adapter name (from --adapters-dir) or adapter folder")
    p.add_argument("--adapters-dir", default=None, help="where named adapters live (default: <model folder>/adapters)")


def load_engine_from_args(args: argparse.Namespace):  # noqa: ANN201 - (Engine, Tokenizer, adapter name or None)
    """The engine for --model/--threads/--no-kernels/--max-len/--kv8, with LoRA slots when --adapter is given."""
    from pathlib import Path

    from pippin.api import load_engine

    use = args.adapters_dir or bool(args.adapter)
    engine, tok = load_engine(
        args.model,
        kernels=not args.no_kernels,
        max_len=args.max_len,
        threads=args.threads,
        progress=True,
        adapters=use,
        kv8=getattr(args, "kv8", None),
    )
    name = args.adapter
    if name and ("/" in name or name.startswith("~")):  # a folder given directly: register it under its folder name
        folder = Path(name).expanduser()
        engine.adapters.add(folder.name, folder)
        name = folder.name
    if name:
        engine.adapters.get(name)  # validate now: a bad adapter is reported before any prompt is read
    return engine, tok, name


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def format_stats(s: GenerationStats) -> str:
    return (
        f"[{s.prompt_tokens} prompt tokens, {s.generated_tokens} generated | TTFT {s.ttft_s * 1000:.0f} ms | "
        f"prefill {s.prefill_tok_s:.0f} tok/s | decode {s.decode_tok_s:.1f} tok/s]"
    )


def print_stats(s: GenerationStats) -> None:
    print(format_stats(s), file=sys.stderr)
