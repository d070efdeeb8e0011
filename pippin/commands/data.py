"""`pippin data`: build training data sets.

  pippin data ifprompts --out DIR [--n 5000] [--seed 0] [--val-fraction 0.1] [--ifeval PATH]

`ifprompts` generates prompts with verifiable instructions (IFEval's 25 types over many requests, kept clear of IFEval's
test prompts by 13-gram decontamination; see pippin.data.ifprompts) and writes DIR/train.jsonl, DIR/validation.jsonl
in IFEval's row shape (what `pippin rl --data`, `pippin reward pairs --data` and `pippin itec --prompts` read) and
DIR/manifest.json.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    g = sub.add_parser("ifprompts", help="generate prompts with verifiable instructions (IFEval's types, not its test set)")
    g.add_argument("--out", required=True, help="folder for train.jsonl, validation.jsonl and manifest.json")
    g.add_argument("--n", type=int, default=5000, help="prompts in all, after decontamination")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of requests held out for validation")
    g.add_argument(
        "--ifeval", default=None, help="IFEval's input_data.jsonl, the prompts to stay clear of (default: ../shared/data/ifeval)"
    )
    g.add_argument("--json", action="store_true", help="print the manifest as JSON")


def run(args: argparse.Namespace) -> int:
    from pippin.commands.eval import default_data_dir
    from pippin.data.ifprompts import IFPromptsConfig, build_ifprompts, write_ifprompts
    from pippin.eval.ifeval import load_ifeval

    config = IFPromptsConfig(n=args.n, seed=args.seed, val_fraction=args.val_fraction)
    reference = load_ifeval(args.ifeval or default_data_dir() / "ifeval" / "input_data.jsonl")
    prompt_set = build_ifprompts(config, reference=[item.prompt for item in reference])
    paths = write_ifprompts(args.out, prompt_set)
    m = prompt_set.manifest
    if args.json:
        print(json.dumps(m))
        return 0
    print(f"{'instruction':<48}{'prompts':>8}")
    for iid, count in m["instruction_counts"].items():
        print(f"{iid:<48}{count:>8}")
    per_prompt = ", ".join(f"{k}: {v}" for k, v in m["instructions_per_prompt"].items())
    print(f"instructions per prompt: {per_prompt}")
    d = m["decontamination"]
    print(f"dropped for a {d['ngram']}-gram shared with IFEval's {d['reference_prompts']} prompts: {d['dropped']}")
    print(f"train: {m['n_train']} -> {paths['train']}")
    print(f"validation: {m['n_validation']} -> {paths['validation']}")
    return 0
