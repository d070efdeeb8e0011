"""Where two IFEval runs differ: strict pass rate per instruction type, reply length, and how often each run's
replies show patterns a policy trained against the checkers may learn instead of the instruction (placeholder
highlights, replies cut at the length cap, empty replies). For post-training reports (docs/posttraining.md).

  python benchmarks/ifeval_compare.py eval-runs/ifeval-fp/results.json eval-runs/ifeval-fp-mdloo/results.json \
    --out docs/posttraining/ifeval_compare.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

PATTERNS = {
    "placeholder highlight (*highlighted section ...*)": re.compile(r"\*highlighted section", re.I),
    "repeats the prompt's words 'section'/'paragraph' as headers only": re.compile(r"^(SECTION|Section|PARAGRAPH) \d+\s*$", re.M),
    "has a P.S. line": re.compile(r"^\s*P\.S\.", re.M),
    "all lowercase": None,
    "all uppercase": None,
}


def stats(results: Path) -> dict:
    d = json.loads(results.read_text())
    (system,) = d["metrics"]
    items = [it for it in d["items"] if it["system"] == system]
    per_type: dict[str, list[bool]] = defaultdict(list)
    for it in items:
        for iid, ok in zip(it["instructions"], it["strict"]):
            per_type[iid].append(ok)
    texts = [it["response"] or "" for it in items]
    words = [len(t.split()) for t in texts]
    pats = {}
    for name, rx in PATTERNS.items():
        if name == "all lowercase":
            hit = [t.strip() != "" and t == t.lower() and t != t.upper() for t in texts]
        elif name == "all uppercase":
            hit = [t.strip() != "" and t == t.upper() and t != t.lower() for t in texts]
        else:
            hit = [bool(rx.search(t)) for t in texts]
        pats[name] = 100.0 * sum(hit) / len(texts)
    return {
        "system": system,
        "metrics": d["metrics"][system],
        "per_type": {k: (100.0 * sum(v) / len(v), len(v)) for k, v in sorted(per_type.items())},
        "mean_words": sum(words) / len(words),
        "empty %": 100.0 * sum(not t.strip() for t in texts) / len(texts),
        "patterns %": pats,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    a, b = stats(args.before), stats(args.after)
    print(f"{'':48s} {'before':>8s} {'after':>8s}")
    for k in a["metrics"]:
        print(f"{k:48s} {a['metrics'][k]:8.2f} {b['metrics'][k]:8.2f}")
    print(f"{'mean words per reply':48s} {a['mean_words']:8.1f} {b['mean_words']:8.1f}")
    print(f"{'empty replies %':48s} {a['empty %']:8.1f} {b['empty %']:8.1f}")
    for k in a["patterns %"]:
        print(f"{k[:48]:48s} {a['patterns %'][k]:8.1f} {b['patterns %'][k]:8.1f}")
    print("\nstrict pass % per instruction type (n), sorted by change:")
    rows = sorted(a["per_type"], key=lambda k: b["per_type"][k][0] - a["per_type"][k][0], reverse=True)
    for k in rows:
        (pa, n), (pb, _) = a["per_type"][k], b["per_type"][k]
        print(f"  {k:48s} {pa:6.1f} -> {pb:6.1f}  ({pb - pa:+6.1f}, n={n})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"before": a, "after": b}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
