"""The `pippin` command: one entry point, one module per subcommand, imported only when used.

Each module in pippin.commands has `add_arguments(parser)` and `run(args) -> int`. A `PippinError`
(bad input, missing file, impossible request) prints one clear line and exits with status 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pippin.errors import PippinError

COMMANDS = {
    "generate": "Generate a reply to a prompt (argument or stdin), streamed, with TTFT and tok/s.",
    "chat": "Interactive chat with history.",
    "demo": "Load the default model and stream one chat answer with its timings (the `make run` job).",
    "convert": "Convert a GGUF file or Hugging Face folder to pippin's format.",
    "export": "Export a model (full precision or compressed) to GGUF (llama.cpp, Ollama) or Core ML, with its fidelity report.",
    "info": "Architecture, parameter counts and bytes by tensor group of a model or preset.",
    "compress": "Palettize a model to a mixed 2/3/4-bit plan under a bits-per-weight budget.",
    "talaria": "Per-op size, FLOPs, bytes, estimated latency/energy and predicted ΔKL; what-if rules, auto plans, a web view.",
    "adapter": "LoRA adapters: train (SFT or distillation), list, info, merge.",
    "pretrain": "Pretrain or continue pretraining from token shards: FSDP2, tensor, context and data parallel under torchrun.",
    "sft": "Full fine-tuning of every weight on chats (assistant-only loss), with sequence packing; resumes after a kill.",
    "serve": "Serve models over an OpenAI-compatible API with per-request adapters, batching, metrics and a web playground.",
    "reward": "Reward models (AFM's soft-label Bradley-Terry with single-sided grading): train on preference pairs.",
    "rl": "Online RL (MDLOO or RLOO) of a model against a verifier or a trained reward model.",
    "itec": "iTeC: a teacher committee samples, a scorer keeps each prompt's best reply, an adapter learns them; in rounds.",
    "data": "Build training data: IFEval-style and safety prompt sets; `data run`: raw text to filtered, deduplicated token shards.",
    "crawl": "Crawl the web politely (robots.txt, per-host delays, retries) into page records with main text; resumable.",
    "eval": "Run an evaluation suite (IFEval, summarization, safety, preference, MT-Bench, writing, judge agreement) with reports.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pippin", description="pippin: a small language model with task adapters, on a device.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(f"pippin.commands.{name}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 1
    try:
        return importlib.import_module(f"pippin.commands.{args.command}").run(args)
    except PippinError as e:
        print(f"pippin {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine said no: disk full, permission denied, a file gone mid-run
        where = f" ({e.filename})" if e.filename else ""
        print(f"pippin {args.command}: error: {e.strerror or e}{where}; nothing was half-written (writes are atomic).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
