"""`pippin demo`: prepare the default model (converted once, cached) and stream one chat answer with timings."""

from __future__ import annotations

import argparse
import sys

from pippin.commands.common import add_model_arguments, format_stats, load_engine_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="Give me three tips for staying focused while studying.")
    p.add_argument("--max-new-tokens", type=int, default=160)
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    import time

    from pippin.engine.sampling import SamplingParams
    from pippin.engine.stream import Delta, Final, stream_chat

    t0 = time.perf_counter()
    engine, tok, adapter = load_engine_from_args(args)
    print(f"model ready in {time.perf_counter() - t0:.1f} s\n", file=sys.stderr)
    print(f"user> {args.prompt}\nassistant> ", end="", flush=True)
    for ev in stream_chat(
        engine, tok, [{"role": "user", "content": args.prompt}], SamplingParams(max_new_tokens=args.max_new_tokens), adapter=adapter
    ):
        if isinstance(ev, Delta):
            print(ev.text, end="", flush=True)
        elif isinstance(ev, Final):
            print("\n")
            print(format_stats(ev.stats))
    return 0
