"""`pippin rl`: online RL of a model against a verifier or a trained reward model, with MDLOO (AFM) or RLOO.

  pippin rl --model M --data prompts.jsonl --reward verifier --out DIR [--algo mdloo|rloo] [--iterations N]
  pippin rl --model M --data prompts.jsonl --reward runs/rm --out DIR

The prompts are IFEval's JSONL format. With `--reward verifier` a response earns the share of its prompt's
instructions it follows (IFEval's strict checkers); with a reward-model run folder (`pippin reward train --out`), the
reward model's score of prompt + response. The run checkpoints every --save-every iterations and resumes after a
kill; it ends with DIR/model (a pippin checkpoint of the trained policy) and DIR/rl_history.json.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="the policy to train (full precision): a folder, .gguf, or omit for the default")
    p.add_argument("--data", required=True, help="prompts with verifiable instructions, IFEval's JSONL format (not its test set)")
    p.add_argument("--reward", default="verifier", help="'verifier' (IFEval's checkers) or a reward-model run folder")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--algo", choices=["mdloo", "rloo"], default="mdloo")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--prompts-per-iteration", type=int, default=8)
    p.add_argument("--samples", type=int, default=4, help="K: responses per prompt (the leave-one-out baseline)")
    p.add_argument("--beta", type=float, default=0.05, help="weight of the KL to the starting policy in the reward")
    p.add_argument("--alpha", type=float, default=0.1, help="MDLOO: weight of the KL to the sampling policy per step")
    p.add_argument("--inner-steps", type=int, default=4, help="MDLOO: gradient steps per iteration")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the reward history as JSON")


def run(args: argparse.Namespace) -> int:
    import copy
    from dataclasses import asdict
    from pathlib import Path

    import torch

    from pippin.api import load_any
    from pippin.errors import PippinError
    from pippin.eval.ifeval import check_response, load_ifeval
    from pippin.io import write_json_atomic
    from pippin.model.checkpoint import LoadedModel, save_pippin
    from pippin.train.mdloo import RLConfig, train_rl
    from pippin.train.reward import load_reward_model, reward_base

    if args.threads:
        torch.set_num_threads(args.threads)
    items = load_ifeval(args.data)
    loaded = load_any(args.model, progress=True)
    tok = loaded.tokenizer
    if tok is None:
        raise PippinError(f"{loaded.path} has no tokenizer; convert it with `pippin convert` from a source that has one.")
    if "quantization" in loaded.meta:
        raise PippinError("RL trains a full-precision policy; give an uncompressed model (--model default, or a convert).")
    prompts = [tok.encode_chat([{"role": "user", "content": it.prompt}]) for it in items]
    by_prompt = {tuple(p): it for p, it in zip(prompts, items)}
    if args.reward == "verifier":

        def reward(prompt: list[int], response: list[int]) -> float:
            ok = check_response(by_prompt[tuple(prompt)], tok.decode(response))
            return sum(ok) / len(ok)
    else:
        rm = load_reward_model(args.reward, load_any(reward_base(args.reward)).model)

        @torch.no_grad()
        def reward(prompt: list[int], response: list[int]) -> float:
            ids = torch.tensor([list(prompt) + list(response)])
            return float(rm(ids, torch.tensor([ids.shape[1]]))[0][0])

    config = RLConfig(
        algo=args.algo, iterations=args.iterations, prompts_per_iteration=args.prompts_per_iteration, samples=args.samples,
        beta=args.beta, alpha=args.alpha, inner_steps=args.inner_steps, lr=args.lr, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, save_every=args.save_every, seed=args.seed,
    )  # fmt: skip
    out = Path(args.out)
    write_json_atomic(out / "rl_config.json", {"model": str(loaded.path), "data": args.data, "reward": args.reward, **config.to_dict()})

    def show(s) -> None:  # noqa: ANN001 - RLStats
        print(f"iteration {s.iteration + 1}/{config.iterations}: reward {s.mean_reward:.3f}, KL to start {s.mean_kl:.3f}", file=sys.stderr)

    policy = loaded.model
    res = train_rl(
        policy, copy.deepcopy(policy), prompts, reward, config, eos_ids=policy.config.eos_token_ids, on_iteration=show, out_dir=out
    )
    meta = {"name": f"{loaded.meta.get('name') or loaded.path.name}-{args.algo}", "rl": {**config.to_dict(), "reward": args.reward}}
    save_pippin(LoadedModel(model=policy, tokenizer=tok, path=out / "model", meta=meta), out / "model")
    history = [asdict(h) for h in res.history]
    write_json_atomic(out / "rl_history.json", {"resumed_from": res.resumed_from, "history": history})
    if args.json:
        print(json.dumps({"resumed_from": res.resumed_from, "history": history}))
    else:
        print(f"policy: {out / 'model'} (reward {history[0]['mean_reward']:.3f} -> {history[-1]['mean_reward']:.3f})")
    return 0
