"""`pippin itec`: rejection-sampling fine-tuning with a teacher committee (AFM's iTeC), in rounds.

  pippin itec --prompts ifeval-style.jsonl --committee pippin:default --committee openai:http://host:8000/v1#big \
      --student default --scorer verifier --k 4 --rounds 2 --out runs/itec
  pippin itec --prompts chats.jsonl --committee pippin:default --student models/smol-3.5bpw \
      --scorer judge:openai:http://host:8000/v1#judge --rounds 1 --out runs/recovery      (recovery distillation)

Each round every member samples --k replies per prompt, the scorer keeps each prompt's best reply, and a LoRA adapter
trained on those winners for --student joins the committee of the next round. With the full-precision model as the
only member and a compressed student, this distils a recovery adapter from full precision's best replies. The run
folder keeps each round's samples.jsonl, sft.jsonl, adapter/ and summary.json; rerunning the same command resumes a
killed run (and a finished run with a larger --rounds goes on). See pippin.train.itec.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Recovery distillation: --committee pippin:default --student COMPRESSED_MODEL trains, on the compressed base, a recovery "
        "adapter on full precision's best replies."
    )
    p.add_argument(
        "--prompts",
        action="append",
        required=True,
        help="JSONL: IFEval rows (key, prompt, instruction_id_list, kwargs), `pippin data safety` rows, chats {messages} or "
        "{prompt}; repeatable (the files' ids must not collide)",
    )
    p.add_argument(
        "--committee",
        action="append",
        required=True,
        metavar="SPEC",
        help="a member that samples replies (repeatable): pippin:MODEL[:ADAPTER] or openai:URL#model; pippin:default alone "
        "with a compressed --student distils a recovery adapter",
    )
    p.add_argument("--student", required=True, help="the base the adapters are trained on: model folder, .gguf or 'default'")
    p.add_argument(
        "--scorer",
        default="verifier",
        help="verifier (IFEval's checkers; the harmlessness reward on safety rows), reward:RUN_DIR (a reward model) "
        "or judge:SPEC (1-10 rating)",
    )
    p.add_argument("--k", type=int, default=4, help="replies per prompt from each member")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", required=True, help="run folder (a rerun resumes it)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--min-score", type=float, default=None, help="keep a prompt's best reply only at or above this score")
    p.add_argument("--chunk", type=int, default=16, help="prompts between atomic writes (the work a kill can lose)")
    p.add_argument("--seq-len", type=int, default=512, help="max tokens per SFT example")
    p.add_argument("--steps", type=int, default=100, help="adapter training steps per round")
    p.add_argument("--batch-size", type=int, default=4, help="adapter training batch")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--init-from", default=None, help="adapter folder each round's adapter starts from (e.g. the recovery adapter)")
    p.add_argument(
        "--teacher-system",
        default=None,
        metavar="TEXT",
        help="a system prompt the committee samples under and the SFT set leaves out (context distillation)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gen-batch", type=int, default=8, help="rows a pippin member generates at once (requests in flight for openai)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the round summaries as JSON")


def summary_table(rounds: list[dict]) -> str:
    """Per round: prompts, kept winners, mean best score, then each member's mean score and wins."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = []
    for r in rounds:
        lines.append(
            f"round {r['round']}: {r['n_prompts']} prompts, {r['n_chosen']} winners kept, mean best score {fmt(r['mean_best_score'])}"
        )
        width = max(len(m) for m in r["members"])
        lines.append(f"  {'member':<{width}}  {'mean score':>10}  {'wins':>6}")
        for spec, m in r["members"].items():
            lines.append(f"  {spec:<{width}}  {fmt(m['mean_score']):>10}  {m['wins']:>6}")
        lines.append(f"  adapter: {r['adapter']} (final loss {fmt(r['train']['final_loss'])})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from pippin.adapters.lora import LoraConfig
    from pippin.api import load_any
    from pippin.eval.systems import load_system
    from pippin.train.adapter import TrainConfig
    from pippin.train.itec import ItecConfig, run_itec

    if args.threads:
        torch.set_num_threads(args.threads)
    train = TrainConfig(
        lora=LoraConfig(rank=args.rank, alpha=args.alpha), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        init_from=args.init_from, seed=args.seed,
    )  # fmt: skip
    config = ItecConfig(
        prompts=args.prompts, committee=args.committee, student=args.student, scorer=args.scorer, k=args.k, rounds=args.rounds,
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, min_score=args.min_score, chunk=args.chunk,
        seq_len=args.seq_len, train=train, seed=args.seed, teacher_system=args.teacher_system,
    )  # fmt: skip
    result = run_itec(
        config,
        out_dir=args.out,
        load_model=lambda path: load_any(path, progress=True),
        open_system=lambda spec: load_system(spec, batch_size=args.gen_batch, threads=args.threads),
    )
    if args.json:
        print(json.dumps(result.rounds))
    else:
        print(summary_table(result.rounds))
        print(f"last adapter: {result.adapter} (use it as pippin:{args.student}:{result.adapter})", file=sys.stderr)
    return 0
