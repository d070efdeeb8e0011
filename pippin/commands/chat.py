"""`pippin chat`: an interactive chat that keeps the conversation as history.

Commands at the prompt: /reset clears the history, /exit (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import sys

from pippin.commands.common import add_model_arguments, add_sampling_arguments, load_engine_from_args, print_stats, sampling_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system message")
    add_model_arguments(p)
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    from pippin.engine.stream import Delta, Final, stream_chat
    from pippin.errors import PippinError

    params = sampling_from_args(args)
    engine, tok, adapter = load_engine_from_args(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print("pippin chat: /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        try:
            for ev in stream_chat(engine, tok, system + history, params, adapter=adapter):
                if isinstance(ev, Delta):
                    print(ev.text, end="", flush=True)
                elif isinstance(ev, Final):
                    print()
                    print_stats(ev.stats)
                    history.append({"role": "assistant", "content": ev.text})
        except PippinError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            history.pop()
            print(f"\nerror: {e} Use /reset to start over.", file=sys.stderr)
