"""`pippin data`: build training data sets.

  pippin data ifprompts --out DIR [--n 5000] [--seed 0] [--val-fraction 0.1] [--ifeval PATH]
  pippin data safety --out DIR [--val-fraction 0.1] [--data DIR]
  pippin data run PIPELINE.json [--workers N] [--json]

`ifprompts` generates prompts with verifiable instructions (IFEval's 25 types over many requests, kept clear of IFEval's
test prompts by 13-gram decontamination; see pippin.data.ifprompts) and writes DIR/train.jsonl, DIR/validation.jsonl
in IFEval's row shape (what `pippin rl --data`, `pippin reward pairs --data` and `pippin itec --prompts` read) and
DIR/manifest.json.

`safety` writes the harmlessness reward's prompts: the train split of AdvBench (expect a refusal) and XSTest (safe
look-alikes expect an answer, unsafe contrast prompts a refusal), never the split the safety suite evaluates (see
pippin.data.safety), as DIR/train.jsonl, DIR/validation.jsonl and DIR/manifest.json.

`run` runs (or resumes) the pretraining data pipeline a JSON file describes (pippin.data.pipeline.PipelineConfig:
inputs, output, steps and their settings, tasks, workers, executor): language, quality, PII, safety, MinHash dedup,
decontamination, then token shards for the trainer, and prints the removal table (also OUTPUT/report.json).
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
    s = sub.add_parser("safety", help="the harmlessness reward's prompts (AdvBench and XSTest train split, not the test split)")
    s.add_argument("--out", required=True, help="folder for train.jsonl, validation.jsonl and manifest.json")
    s.add_argument("--val-fraction", type=float, default=0.1, help="share of the train split held out for validation")
    s.add_argument("--data", default=None, help="folder with advbench/ and xstest/ (default: $PIPPIN_EVAL_DATA or ../shared/data)")
    s.add_argument("--json", action="store_true", help="print the manifest as JSON")
    r = sub.add_parser("run", help="run or resume the pretraining data pipeline of a JSON file, writing token shards")
    r.add_argument("pipeline", help="the pipeline file (see pippin.data.pipeline.PipelineConfig; recipes/pipeline-offline.json)")
    r.add_argument("--workers", type=int, default=None, help="tasks run at once (overrides the file; does not change the result)")
    r.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    if args.action == "safety":
        return _safety(args)
    if args.action == "run":
        return _run_pipeline(args)
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


def _safety(args: argparse.Namespace) -> int:
    from pippin.commands.eval import default_data_dir
    from pippin.data.safety import build_safety_prompts, write_safety_prompts

    prompt_set = build_safety_prompts(args.data or default_data_dir(), val_fraction=args.val_fraction)
    paths = write_safety_prompts(args.out, prompt_set)
    m = prompt_set.manifest
    if args.json:
        print(json.dumps(m))
        return 0
    print(f"{'set':<52}{'prompts':>8}")
    for part, counts in m["counts"].items():
        for key, n in counts.items():
            print(f"{part + ': ' + key:<52}{n:>8}")
    print(f"split: {m['split_rule']}")
    print(f"train: {m['n_train']} -> {paths['train']}")
    print(f"validation: {m['n_validation']} -> {paths['validation']}")
    return 0


def _run_pipeline(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pippin.data.pipeline import load_config
    from pippin.data.report import format_table
    from pippin.errors import PippinError

    try:
        from pippin.data.stages import run_pipeline
    except ImportError as e:  # datatrove and friends are the `data` extra
        raise PippinError(f"`pippin data run` needs the data extra ({e.name} is missing): pip install -e '.[data]'") from None

    config = load_config(args.pipeline)
    if args.workers is not None:
        config = replace(config, workers=args.workers)
    report = run_pipeline(config)
    if report is None:
        print(f"submitted the pipeline's jobs ({config.executor}); the report will be in {config.output}/report.json")
    elif args.json:
        print(json.dumps(report))
    else:
        print(format_table(report["steps"]))
        print(f"shards: {report['n_tokens']} tokens, {report['n_documents']} documents, {report['n_shards']} files in {config.output}")
    return 0
