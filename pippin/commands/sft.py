"""`pippin sft`: full fine-tuning of every weight of a full-precision model on chats, with sequence packing.

  pippin sft --model default --data chats.jsonl --out runs/sft                 # {"messages": [...]} per line
  pippin sft --model default --data alpaca.json --format alpaca --out runs/sft --epochs 2 --seq-len 2048

The loss is on the assistant replies only. Examples are packed into --seq-len rows (each attends only to itself);
the run checkpoints every --save-every steps and the same command resumes a killed run. It ends with DIR/model (a
pippin checkpoint: `pippin generate --model DIR/model`), DIR/sft_config.json and DIR/train_log.jsonl. For a LoRA
adapter on a frozen (or compressed) base, use `pippin adapter train`.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="the model to fine-tune (full precision): a folder, .gguf, or omit for the default")
    p.add_argument("--data", required=True, help="training data: JSONL, or one JSON array of rows")
    p.add_argument("--format", default="chat", choices=["chat", "dialogsum", "xsum", "alpaca"], help="how to read --data")
    p.add_argument("--out", required=True, help="run folder (the trained model goes to OUT/model)")
    p.add_argument("--skip", type=int, default=0, help="skip the first N rows (hold them out)")
    p.add_argument("--limit", type=int, default=None, help="use at most N rows")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (default: --epochs passes over the packed rows)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=4, help="packed rows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row; longer examples are cut")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the result (steps, losses, packing) as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from pippin.api import load_any
    from pippin.errors import PippinError
    from pippin.train.data import read_conversations, tokenize_chat
    from pippin.train.sft import SFTConfig, train_sft

    if args.threads:
        torch.set_num_threads(args.threads)
    config = SFTConfig(
        steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
        lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_checkpointing=args.grad_checkpointing,
        save_every=args.save_every, seed=args.seed,
    )  # fmt: skip
    convs = read_conversations(args.data, args.format, skip=args.skip, limit=args.limit)
    loaded = load_any(args.model, progress=True)
    if loaded.tokenizer is None:
        raise PippinError(f"{loaded.path} has no tokenizer; convert it with `pippin convert` from a source that has one.")
    examples = [tokenize_chat(loaded.tokenizer, c) for c in convs]  # uncut: packing cuts and counts the long ones
    meta = {"data": str(args.data), "data_format": args.format}  # "format" names the checkpoint format
    res = train_sft(loaded, examples, config, out_dir=args.out, meta=meta)
    st = res.packing
    if args.json:
        out = {"model": str(res.path), "steps": res.steps, "resumed_from": res.resumed_from, "losses": res.losses}
        print(json.dumps({**out, "packing": st.to_dict()}))
        return 0
    note = f" (resumed at step {res.resumed_from})" if res.resumed_from else ""
    print(
        f"packed {st.n_examples} examples into {st.n_rows} rows of {config.seq_len}: {st.efficiency:.1%} real tokens; "
        f"{st.n_truncated} cut to --seq-len, {st.n_dropped} without a reply token left out",
        file=sys.stderr,
    )
    print(f"sft: {res.steps} steps{note} in {res.seconds:.0f} s, loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}", file=sys.stderr)
    print(f"model: {res.path}")
    return 0
