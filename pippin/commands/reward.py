"""`pippin reward`: a reward model (AFM §3.2) from preference pairs, and pairs from verifiable instructions.

  pippin reward train --model M --data prefs.jsonl --out DIR [--steps N] [--batch-size B] [--lr LR]
  pippin reward pairs --model M --data prompts.jsonl --out prefs.jsonl [--samples 4] [--temperature 1.0]

The data is JSONL (see pippin.train.reward): prompt, chosen, rejected, a preference level and optional single-sided
grades on four aspects. The run writes DIR/reward_config.json, resumes from DIR/checkpoint after a kill, and ends
with DIR/reward_model.safetensors and DIR/reward_result.json (the held-out pair accuracy).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a reward model on preference pairs (JSONL)")
    t.add_argument("--model", default=None, help="the base: a pippin or HF folder, a .gguf, or omit for the default model")
    t.add_argument("--data", required=True, help="preference pairs, JSONL")
    t.add_argument("--out", required=True, help="run folder (resumed when it holds a checkpoint of the same run)")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    t.add_argument("--lr", type=float, default=1e-5, help="learning rate of the base")
    t.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the reward and grading heads")
    t.add_argument("--grading-weight", type=float, default=0.5, help="lambda, the weight of the single-sided grading loss")
    t.add_argument("--max-len", type=int, default=512, help="tokens per prompt + response (the prompt is cut from the left)")
    t.add_argument("--holdout", type=float, default=0.1, help="share of pairs held out for the accuracy")
    t.add_argument("--save-every", type=int, default=50)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    g = sub.add_parser("pairs", help="preference pairs from samples that verifiable instructions rank (IFEval's checkers)")
    g.add_argument("--model", default=None, help="the policy that samples: a model folder, .gguf, or omit for the default")
    g.add_argument("--adapter", default=None, help="an adapter of that model")
    g.add_argument("--data", required=True, help="prompts with verifiable instructions, IFEval's JSONL format (not its test set)")
    g.add_argument("--out", required=True, help="preference pairs, JSONL (what `pippin reward train --data` reads)")
    g.add_argument("--samples", type=int, default=4, help="replies per prompt; the best and the worst make a pair")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--limit", type=int, default=None, help="at most this many prompts")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--threads", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    return _pairs(args) if args.action == "pairs" else _train(args)


def _pairs(args: argparse.Namespace) -> int:
    from pippin.engine.sampling import SamplingParams
    from pippin.eval.ifeval import load_ifeval
    from pippin.eval.systems import PippinSystem
    from pippin.train.reward import verified_pairs, write_preferences

    items = load_ifeval(args.data)[: args.limit]
    system = PippinSystem.load(args.model, adapter=args.adapter, batch_size=args.batch_size, threads=args.threads)

    def generate(convs: list, k: int) -> list[str]:
        print(f"sample {k + 1} of {args.samples} for {len(convs)} prompts", file=sys.stderr)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=k)
        return system.generate(convs, params)

    pairs = verified_pairs(generate, items, samples=args.samples)
    write_preferences(args.out, pairs)
    print(f"{len(pairs)} pairs from {len(items)} prompts (the rest: every sample scored the same) -> {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from pippin.api import load_any
    from pippin.errors import PippinError
    from pippin.train.reward import RewardConfig, RewardModel, encode_pairs, read_preferences, train_reward

    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = read_preferences(args.data)
    loaded = load_any(args.model, progress=True)
    if loaded.tokenizer is None:
        raise PippinError(f"{loaded.path} has no tokenizer; convert it with `pippin convert` from a source that has one.")
    if "quantization" in loaded.meta:
        raise PippinError("A reward model trains a full-precision base; give an uncompressed model (--model default, or a convert).")
    config = RewardConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr, grading_weight=args.grading_weight,
        max_len=args.max_len, holdout=args.holdout, save_every=args.save_every, seed=args.seed,
    )  # fmt: skip
    rows = encode_pairs(loaded.tokenizer, pairs, max_len=args.max_len)
    res = train_reward(RewardModel(loaded.model), rows, config, out_dir=args.out, base=str(loaded.path))
    summary = {"steps": res.steps, "resumed_from": res.resumed_from, "heldout_accuracy": res.heldout_accuracy, "n_heldout": res.n_heldout}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"reward model: {args.out}/reward_model.safetensors", file=sys.stderr)
        print(f"held-out pair accuracy: {res.heldout_accuracy:.3f} on {res.n_heldout} pairs (resumed from step {res.resumed_from})")
    return 0
