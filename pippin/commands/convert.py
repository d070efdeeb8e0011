"""`pippin convert SRC OUT`: a GGUF file or Hugging Face folder to pippin's self-describing format."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a .gguf file, a Hugging Face model folder, or 'default'")
    p.add_argument("output", help="output folder (config.json + model.safetensors + tokenizer)")


def run(args: argparse.Namespace) -> int:
    from pippin.model.checkpoint import load_model, save_pippin

    loaded = load_model(args.source, progress=True)
    out = save_pippin(loaded, args.output, extra_meta={"source": str(args.source)})
    n = sum(p.numel() for p in loaded.model.parameters())
    print(f"wrote {out} ({n / 1e6:.1f}M parameters)")
    return 0
