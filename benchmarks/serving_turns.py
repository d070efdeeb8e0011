"""Multi-turn chat through the server, with and without the prefix cache: time to first token per turn.

Two servers on the same model, one with the prefix cache (the default) and one with `--no-prefix-cache`. Each round
holds one conversation of `--turns` user messages with each server, interleaved turn by turn, through the official
openai client (streamed, greedy). Each turn's prompt is the whole conversation so far, so without the cache the
prefill grows with every turn; with it, only the new message (and the template around it) is prefilled. Reports the
median TTFT per turn, the prompt's length, and whether both servers gave the same replies.
  python benchmarks/serving_turns.py --model PATH --turns 6 --rounds 3 --out docs/benchmarks/serving-turns.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import run_header, served_once, start_server  # noqa: E402

MESSAGES = [
    "I am planning a trip to the mountains next month. What should I pack?",
    "What about food for three days?",
    "How do I keep the water safe to drink?",
    "Which of these things matter most if my bag is small?",
    "Write that as a short checklist.",
    "Thanks. Any advice for the first night?",
    "How early should I start walking each day?",
    "Summarize our plan in two sentences.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    flags = ["--model", f"bench={args.model}", "--threads", str(args.threads)]
    servers = {"prefix cache": start_server(flags), "no prefix cache": start_server([*flags, "--no-prefix-cache"])}
    rows = []
    try:
        for r in range(args.rounds):
            history = {k: [] for k in servers}
            for t in range(min(args.turns, len(MESSAGES))):
                order = list(servers) if (r + t) % 2 == 0 else list(servers)[::-1]
                for k in order:
                    history[k].append({"role": "user", "content": MESSAGES[t]})
                    out = served_once(servers[k][1], history[k], args.max_tokens)
                    history[k].append({"role": "assistant", "content": out["text"]})
                    rows.append({"round": r, "turn": t + 1, "server": k, **out})
                same = rows[-1]["text"] == rows[-2]["text"]
                print(json.dumps({"round": r, "turn": t + 1, "prompt_tokens": rows[-1]["prompt_tokens"], "same": same,
                                  **{x["server"]: round(x["ttft_s"], 3) for x in rows[-2:]}}), file=sys.stderr, flush=True)  # fmt: skip
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    turns = sorted({x["turn"] for x in rows})
    table = []
    for t in turns:
        at = [x for x in rows if x["turn"] == t]
        med = {k: statistics.median(x["ttft_s"] for x in at if x["server"] == k) for k in servers}
        table.append({"turn": t, "prompt_tokens": statistics.median(x["prompt_tokens"] for x in at), "ttft_s": med})
    same = all(a["text"] == b["text"] for a, b in zip(rows[::2], rows[1::2]))
    report = {**run_header(args.threads), "max_tokens": args.max_tokens, "turns": table, "same_text": same, "rows": rows}
    for x in table:
        ttft = ", ".join(f"{k} {v:.3f} s" for k, v in x["ttft_s"].items())
        print(f"turn {x['turn']}: {x['prompt_tokens']:.0f} prompt tokens, TTFT {ttft}")
    print(f"same replies with and without the cache: {same}")
    if args.out:
        from pippin.io import write_json_atomic

        write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
