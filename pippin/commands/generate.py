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
    p.add_argument("--draft", default=None, help="speculative decoding: a draft model (e.g. a compressed copy) proposes tokens")
    p.add_argument("--draft-k", type=int, default=4, help="draft tokens proposed per target forward")
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
    if args.draft:
        return _speculative(args, prompt, params)
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


def _speculative(args: argparse.Namespace, prompt: str, params) -> int:  # noqa: ANN001 - SamplingParams
    """Greedy output equals plain decoding; sampled output keeps the target's distribution (accept/reject)."""
    from pippin.api import load_any
    from pippin.engine.speculative import SpeculativeDecoder

    if args.adapter or params.stop:
        raise PippinError("--draft does not combine with --adapter or --stop yet.")
    target, draft = load_any(args.model, progress=True), load_any(args.draft, progress=True)
    tok = target.tokenizer
    ids = (
        tok.encode(prompt)
        if args.raw
        else tok.encode_chat(([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}])
    )
    dec = SpeculativeDecoder(target.model, draft.model, k=args.draft_k, max_len=args.max_len, kernels=not args.no_kernels)
    out: list[int] = []
    shown = ""
    for t in dec.generate(ids, params):
        out.append(t)
        text = tok.decode(out)
        if not args.json and not text.endswith("\ufffd"):
            print(text[len(shown) :], end="", flush=True)
            shown = text
    s = dec.stats
    info = {"generated_tokens": s.generated, "tok_s": s.generated / max(s.total_s, 1e-9), "acceptance_rate": s.acceptance_rate,
            "tokens_per_target_forward": s.tokens_per_target_forward}  # fmt: skip
    if args.json:
        print(json.dumps({"text": tok.decode(out), "stats": info}))
    else:
        print()
        line = (
            f"[speculative k={args.draft_k} | {info['generated_tokens']} tokens, {info['tok_s']:.1f} tok/s | "
            f"acceptance {info['acceptance_rate']:.2f}, {info['tokens_per_target_forward']:.2f} tokens per target forward]"
        )
        print(line, file=sys.stderr)
    return 0
