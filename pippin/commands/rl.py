"""`pippin rl`: online RL of a model against verifiers and/or a trained reward model, with MDLOO (AFM) or RLOO.

  pippin rl --model M --data ifp/train.jsonl --out DIR [--algo mdloo|rloo] [--iterations N]
  pippin rl --model M --data ifp/train.jsonl --data safety/train.jsonl --val-data ifp/validation.jsonl --out DIR
  pippin rl --model M --data prompts.jsonl --reward verifier --reward runs/rm --out DIR
  pippin rl --data ifp/train.jsonl --init-from runs/itec/round-1/adapter --out DIR     (RL after SFT, as AFM)

Prompt files are IFEval's JSONL (`pippin data ifprompts`: a reply earns the share of its prompt's instructions that
IFEval's strict checkers pass) or `pippin data safety` rows (the harmlessness reward: refuse the harmful, answer the
safe look-alikes); several --data files mix. `--reward verifier` (the default) scores with those verifiers; a
reward-model run folder (`pippin reward train --out`) adds its scalar score of prompt + reply times --rm-weight. The
policy is a LoRA adapter on M (a full-precision or a compressed model, the on-device setting) unless --full. The run
checkpoints every --save-every iterations and resumes after a kill; it ends with DIR/adapter (or DIR/model with
--full), DIR/rl_history.json (reward, KL, length, entropy and validation reward per iteration) and
DIR/samples/iteration-N.jsonl (every prompt and reply with its reward, KL and advantage: where reward hacking shows).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="the base (a folder, .gguf, or omit for the default); compressed bases train LoRA only")
    p.add_argument("--data", action="append", required=True, help="prompts: IFEval JSONL or `pippin data safety` rows (repeatable)")
    p.add_argument("--val-data", action="append", default=[], help="validation prompts, scored greedily every --val-every iterations")
    p.add_argument("--val-limit", type=int, default=64, help="validation prompts used from each --val-data file")
    p.add_argument("--val-every", type=int, default=5)
    p.add_argument("--reward", action="append", default=None, help="'verifier' and/or a reward-model run folder (default: verifier)")
    p.add_argument("--rm-weight", type=float, default=1.0, help="weight of the reward model's score when given")
    p.add_argument(
        "--guard", action=argparse.BooleanOptionalAction, default=True,
        help="pay no IFEval-verifier reward for a degenerate reply: template spans without content, or a loop (default on)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--algo", choices=["mdloo", "rloo"], default="mdloo")
    p.add_argument("--full", action="store_true", help="train all weights (full-precision models) instead of a LoRA adapter")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument(
        "--init-from", default=None, metavar="ADAPTER",
        help="start from this adapter (e.g. an iTeC or SFT round's) and keep the KL to it, not to the bare base",
    )  # fmt: skip
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--prompts-per-iteration", type=int, default=8)
    p.add_argument("--samples", type=int, default=4, help="K: responses per prompt (the leave-one-out baseline)")
    p.add_argument("--beta", type=float, default=0.05, help="weight of the KL to the starting policy in the reward")
    p.add_argument("--alpha", type=float, default=0.1, help="MDLOO: weight of the KL to the sampling policy per step")
    p.add_argument("--inner-steps", type=int, default=4, help="MDLOO: gradient steps per iteration")
    p.add_argument("--lr", type=float, default=None, help="default: 2e-4 for LoRA, 1e-5 for --full")
    p.add_argument("--minibatch", type=int, default=8, help="sequences per forward/backward pass (memory only)")
    p.add_argument("--bf16", action="store_true", help="the policy's passes under bf16 autocast (faster where the CPU has bf16)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="where the policy trains, e.g. cuda (there it samples without the engine's kernels)")
    p.add_argument("--json", action="store_true", help="print the history as JSON")


def read_prompt_files(paths: list[str]) -> list[tuple[str, object]]:
    """(prompt text, row) for every row of every file: IFEvalItem rows or SafetyPrompt rows, told apart by their fields."""
    from pippin.errors import PippinError
    from pippin.eval.ifeval import load_ifeval
    from pippin.io import jsonl_rows
    from pippin.train.harmless import holds_safety_rows, read_safety_prompts

    out: list[tuple[str, object]] = []
    for path in paths:
        first = next(iter(jsonl_rows(path)), (0, None))[1]
        if isinstance(first, dict) and "instruction_id_list" in first:
            out += [(it.prompt, it) for it in load_ifeval(path)]
        elif holds_safety_rows(path):
            out += [(sp.prompt, sp) for sp in read_safety_prompts(path)]
        else:
            raise PippinError(f"{path}: not a prompt file RL can score (IFEval rows, or `pippin data safety` rows).")
    return out


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from pathlib import Path

    import torch

    from pippin.adapters.lora import LoraConfig
    from pippin.adapters.peft_format import adapter_from_model, save_adapter
    from pippin.api import load_any
    from pippin.errors import PippinError
    from pippin.eval.ifeval import IFEvalItem, check_response
    from pippin.io import write_atomic, write_json_atomic
    from pippin.model.checkpoint import LoadedModel, save_pippin
    from pippin.train.guard import DegenerateGuard
    from pippin.train.harmless import harmlessness_reward
    from pippin.train.mdloo import RLConfig, train_rl
    from pippin.train.reward import load_reward_model, reward_base

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = read_prompt_files(args.data)
    val_rows = [r for path in args.val_data for r in read_prompt_files([path])[: args.val_limit]]
    loaded = load_any(args.model, progress=True)
    tok = loaded.tokenizer
    if tok is None:
        raise PippinError(f"{loaded.path} has no tokenizer; convert it with `pippin convert` from a source that has one.")
    if args.full and "quantization" in loaded.meta:
        raise PippinError("--full trains every weight, which a compressed model cannot; leave it out to train a LoRA adapter.")
    by_prompt: dict[tuple[int, ...], object] = {}
    encoded = {}
    for text, row in rows + val_rows:
        ids = tuple(tok.encode_chat([{"role": "user", "content": text}]))
        if by_prompt.setdefault(ids, row) != row:
            raise PippinError(f"The prompt {text[:60]!r} appears twice with different checks; keep one.")
        encoded[id(row)] = list(ids)
    prompts = [encoded[id(r)] for _, r in rows]
    val_prompts = [encoded[id(r)] for _, r in val_rows]

    rewards = args.reward or ["verifier"]
    rm = None
    if rm_dirs := [r for r in rewards if r != "verifier"]:
        if len(rm_dirs) > 1:
            raise PippinError("Give at most one reward-model run folder.")
        rm = load_reward_model(rm_dirs[0], load_any(reward_base(rm_dirs[0])).model)

    guard = DegenerateGuard() if args.guard else None

    def verify(row: object, reply: str) -> float:
        if isinstance(row, IFEvalItem):
            ok = check_response(row, reply)
            return guard(sum(ok) / len(ok), reply) if guard else sum(ok) / len(ok)
        return harmlessness_reward(row.expect, reply)

    @torch.no_grad()
    def reward(prompt: list[int], response: list[int]) -> float:
        r = verify(by_prompt[tuple(prompt)], tok.decode(response)) if "verifier" in rewards else 0.0
        if rm is not None:
            ids = torch.tensor([list(prompt) + list(response)])
            r += args.rm_weight * float(rm(ids, torch.tensor([ids.shape[1]]))[0][0])
        return r

    config = RLConfig(
        algo=args.algo, iterations=args.iterations, prompts_per_iteration=args.prompts_per_iteration, samples=args.samples,
        beta=args.beta, alpha=args.alpha, inner_steps=args.inner_steps, lr=args.lr or (1e-5 if args.full else 2e-4),
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, lora=None if args.full else LoraConfig(rank=args.rank),
        init_from=args.init_from,
        minibatch=args.minibatch, bf16=args.bf16, val_every=args.val_every if val_prompts else 0, save_every=args.save_every,
        seed=args.seed,
    )  # fmt: skip
    out = Path(args.out)
    record = {"model": str(loaded.path), "data": args.data, "val_data": args.val_data, "val_limit": args.val_limit}
    record |= {"reward": rewards, "rm_weight": args.rm_weight, "guard": asdict(guard) if guard else None}
    write_json_atomic(out / "rl_config.json", {**record, **config.to_dict()})
    reward_spec = {"reward": rewards, "rm_weight": args.rm_weight if rm is not None else None}
    if guard:  # a run from before the guard (none recorded) resumes with --no-guard
        reward_spec["guard"] = asdict(guard)

    def show(s) -> None:  # noqa: ANN001 - RLStats
        val = f", validation {s.val_reward:.3f}" if s.val_reward is not None else ""
        print(
            f"iteration {s.iteration + 1}/{config.iterations}: reward {s.mean_reward:.3f}{val}, KL {s.mean_kl:.3f}, "
            f"length {s.mean_length:.0f}, entropy {s.entropy:.2f}, {s.seconds:.0f} s",
            file=sys.stderr,
        )

    def keep(it: int, rows: list[dict]) -> None:
        text = [{**r, "prompt": by_prompt[tuple(r["prompt"])].prompt, "response": tok.decode(r["response"])} for r in rows]
        write_atomic(out / "samples" / f"iteration-{it + 1:04d}.jsonl", "".join(json.dumps(t) + "\n" for t in text).encode())

    policy = loaded.model.to(args.device)
    eos = policy.config.eos_token_ids
    res = train_rl(
        policy,
        prompts,
        reward,
        config,
        val_prompts=val_prompts,
        eos_ids=eos,
        on_iteration=show,
        on_samples=keep,
        out_dir=out,
        reward_spec=reward_spec,
    )
    name = f"{loaded.meta.get('name') or loaded.path.name}-{args.algo}"
    info = {"rl": {**record, **config.to_dict()}, "final_reward": res.history[-1].mean_reward if res.history else None}
    if config.lora is not None:
        from pippin.adapters.lora import base_fingerprint

        info["base_fingerprint"] = base_fingerprint(policy)  # of the base: the adapter's own weights are left out
        adapter = adapter_from_model(policy, config.lora, name=name, meta=info)
        result_path = save_adapter(adapter, out / "adapter", base_model=loaded.meta.get("name", str(loaded.path)))
    else:
        result_path = out / "model"
        save_pippin(LoadedModel(model=policy.cpu(), tokenizer=tok, path=result_path, meta={"name": name, **info}), result_path)
    history = [asdict(h) for h in res.history]
    summary = {"resumed_from": res.resumed_from, "start_val_reward": res.start_val_reward, "history": history, "result": str(result_path)}
    write_json_atomic(out / "rl_history.json", summary)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"policy: {result_path} (reward {history[0]['mean_reward']:.3f} -> {history[-1]['mean_reward']:.3f})")
    return 0
