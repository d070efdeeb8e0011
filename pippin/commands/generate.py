"""`pippin generate`: one prompt in (argument or stdin), the reply streamed out, stats on stderr."""

from __future__ import annotations

import argparse
import json
import sys

from pippin.commands.common import add_model_arguments, add_sampling_arguments, format_stats, load_engine_from_args, sampling_from_args
from pippin.errors import PippinError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="the prompt; omit or '-' to read stdin")
    p.add_argument("--raw", action="store_true", help="plain text completion, no chat template")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object (text + stats) instead of streaming")
    add_model_arguments(p)
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    from pippin.engine.stream import Delta, Final, stream_chat, stream_text

    prompt = args.prompt
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise PippinError("No prompt given; pass it as an argument or pipe it on stdin.")
        prompt = sys.stdin.read()
    params = sampling_from_args(args)
    engine, tok, adapter = load_engine_from_args(args)
    if args.raw:
        events = stream_text(engine, tok, prompt, params, adapter=adapter)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        events = stream_chat(engine, tok, messages, params, adapter=adapter)
    for ev in events:
        if isinstance(ev, Delta) and not args.json:
            print(ev.text, end="", flush=True)
        elif isinstance(ev, Final):
            if args.json:
                s = ev.stats
                print(json.dumps({"text": ev.text, "finish_reason": ev.finish_reason, "stats": s.__dict__}))
            else:
                print()
                print(format_stats(ev.stats), file=sys.stderr)
    return 0
