"""Served single stream against the engine, for several servers at once, interleaved: which change paid.

Each round sends the same three prompts to `pippin generate` (the engine's figure, its own process) and then, in
alternating order, to each server as one streamed chat completion through the official openai client. It prints the
median of served tok/s over the engine's tok/s of the same request, per server. A server is LABEL=TREE or
LABEL=TREE|FLAGS: `pippin serve` from that source tree (e.g. a `git worktree` of an older commit) with extra flags.
  python benchmarks/serving_ab.py --model PATH --rounds 5 --server "before=/tmp/old" --server "now=.|--stream-interval-ms 0"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import PROMPTS, engine_once, run_header, served_once, start_server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--server", action="append", required=True, help="LABEL=TREE or LABEL=TREE|FLAGS")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    servers = {}
    try:
        for spec in args.server:
            label, _, rest = spec.partition("=")
            tree, _, flags = rest.partition("|")
            base = ["--model", f"bench={args.model}", "--threads", str(args.threads)]
            servers[label] = start_server([*base, *flags.split()], tree=tree)
            served_once(servers[label][1], PROMPTS[0], 16)  # warm
        ratios: dict[str, list[float]] = {k: [] for k in servers}
        engine = []
        for r in range(args.rounds):
            for prompt in PROMPTS[:3]:
                e = engine_once(args.model, prompt, args.max_tokens, args.threads)["tok_s"]
                engine.append(e)
                for label, (_, url) in list(servers.items())[:: 1 if r % 2 == 0 else -1]:
                    ratios[label].append(served_once(url, prompt, args.max_tokens)["tok_s"] / e)
            print(r, {k: round(statistics.median(v), 3) for k, v in ratios.items()}, file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    report = {
        **run_header(args.threads),
        "servers": args.server,
        "engine_tok_s_median": statistics.median(engine),
        "served_vs_engine_median": {k: statistics.median(v) for k, v in ratios.items()},
        "served_vs_engine": ratios,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        from pippin.io import write_json_atomic

        write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
