"""Counts over saved safety runs that docs/posttraining.md quotes: how often an RL run's samples earned the
harmlessness reward and how many K-sample groups had any advantage; an iTeC round's winners and their openings; and
the refusals, reply length and openings of an eval run's replies (XSTest's refusal rule, pippin.eval.refusal).

  python benchmarks/safety_counts.py rl runs/rl-safety-mdloo --prompts runs/safety/train.jsonl
  python benchmarks/safety_counts.py itec runs/itec-safety/round-1 --prompts runs/safety/train.jsonl
  python benchmarks/safety_counts.py replies eval-runs/ifeval-fp-itec-safety/cache.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def opening(text: str, words: int = 4) -> str:
    return " ".join(text.split()[:words])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("rl", "itec", "replies"))
    ap.add_argument("path", help="an RL run folder, an iTeC round folder, or an eval run's cache.jsonl")
    ap.add_argument("--prompts", help="the `pippin data safety` file the run trained on (rl, itec)")
    args = ap.parse_args()
    path = Path(args.path)
    expect = {}
    if args.prompts:
        expect = {r["prompt"]: r["expect"] for r in rows(Path(args.prompts))} | {r["id"]: r["expect"] for r in rows(Path(args.prompts))}
    out: dict = {}
    if args.kind == "rl":
        k = json.loads((path / "rl_config.json").read_text())["samples"]
        samples = [r for f in sorted((path / "samples").glob("*.jsonl")) for r in rows(f)]
        groups = [samples[i : i + k] for i in range(0, len(samples), k)]  # a prompt's K samples are consecutive
        harmful = [r for r in samples if expect.get(r["prompt"]) == "refuse"]
        out = {
            "samples": len(samples),
            "harmful-prompt samples": len(harmful),
            "of them paid (a refusal opening)": sum(r["reward"] == 1.0 for r in harmful),
            "groups": len(groups),
            "groups whose K rewards all agree (zero advantage)": sum(len({r["reward"] for r in g}) == 1 for g in groups),
        }
    elif args.kind == "itec":
        samples = rows(path / "samples.jsonl")
        for e in ("refuse", "comply"):
            mine = [r for r in samples if expect.get(r["prompt_id"]) == e]
            out[e] = {
                "prompts": len({r["prompt_id"] for r in mine}),
                "samples scoring 1": f"{sum(r['score'] == 1.0 for r in mine)} of {len(mine)}",
                "winners": sum(r["chosen"] for r in mine),
                "winners' openings": Counter(opening(r["text"]) for r in mine if r["chosen"]).most_common(6),
            }
    else:
        from pippin.eval.refusal import RefusalRule, is_refusal

        replies = [r for r in rows(path) if isinstance(r.get("text"), str)]
        out = {
            "replies": len(replies),
            "refusals (XSTest rule)": sum(is_refusal(r["text"], RefusalRule.XSTEST) for r in replies),
            "mean words": round(sum(len(r["text"].split()) for r in replies) / max(1, len(replies)), 1),
            "openings": Counter(opening(r["text"]) for r in replies).most_common(6),
        }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
