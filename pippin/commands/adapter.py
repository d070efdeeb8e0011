"""`pippin adapter train|list|info|merge`: LoRA adapters for a base model, trained and kept next to it.

  pippin adapter train summarize --model M --data dialogsum.jsonl --format dialogsum --init-from recovery
  pippin adapter train recovery --model M-3.5bpw --teacher default --init-residual --data calib.json --format text
  pippin adapter train recovery --model M-3.5bpw --teacher default --init-residual --data alpaca.json --format alpaca \
      --objective distill --teacher-replies 128 --text-data calib.json
  pippin adapter train recovery-bw --model M-3.5bpw --teacher default --init-residual --objective blockwise ... \
      --steps 100 (per block); then --objective distill --init-from recovery-bw        (--device cuda --bf16 on a GPU)
  pippin adapter list --model M
  pippin adapter info summarize --model M
  pippin adapter merge summarize --model default --out merged/      (full-precision bases only)

Adapters live in <model folder>/adapters/<name> (PEFT format) unless --adapters-dir says otherwise; an
argument with a '/' (e.g. ./my-adapter) is an adapter folder path instead of a name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pippin.errors import PippinError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train an adapter on a frozen base (SFT or distillation)")
    t.add_argument("name", help="adapter name (its folder under the adapters dir)")
    t.add_argument("--data", required=True, help="training data: JSONL; for --format text a text/JSON file or 'self[:N]'")
    t.add_argument("--format", default="chat", choices=["chat", "dialogsum", "xsum", "alpaca", "text"], help="how to read --data")
    t.add_argument(
        "--objective",
        default=None,
        choices=["sft", "distill", "blockwise"],
        help="default: sft, or distill for --format text; blockwise: each block's LoRA matches the teacher's block outputs, "
        "block after block (--steps per block)",
    )
    t.add_argument("--teacher", default=None, help="teacher model for distillation ('default' = the full-precision default model)")
    t.add_argument(
        "--teacher-replies",
        type=int,
        default=0,
        metavar="N",
        help="the teacher answers each chat's prompt itself (greedy, up to N tokens; cached in the adapter folder) and the "
        "adapter distils those chats: recovery adapters that recover chat",
    )
    t.add_argument(
        "--text-data", default=None, help="distillation: plain text (file or 'self[:N]') in --seq-len windows, one per --data example"
    )
    t.add_argument("--init-from", default=None, help="adapter name or folder to start from (AFM: the recovery adapter)")
    t.add_argument(
        "--init-residual",
        action="store_true",
        help="recovery adapters: start from each layer's compression error (rank-r SVD weighted by the model's inputs; needs --teacher)",
    )
    t.add_argument("--skip", type=int, default=0, help="skip the first N rows (hold them out)")
    t.add_argument("--limit", type=int, default=None, help="use at most N rows")
    t.add_argument("--rank", type=int, default=16)
    t.add_argument("--alpha", type=float, default=32.0)
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--seq-len", type=int, default=512, help="max tokens per example (text: window length)")
    t.add_argument("--grad-checkpointing", action="store_true")
    t.add_argument("--save-every", type=int, default=25)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--block-seqs", type=int, default=64, help="blockwise: examples whose hidden states are cached (fp32)")
    t.add_argument("--device", default="cpu", help="where the model and the teacher train: cpu, cuda or cuda:N")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward passes (LoRA weights stay fp32)")
    _model_args(t)

    for name, help_text in (("list", "list the adapters of a model"), ("info", "show one adapter")):
        q = sub.add_parser(name, help=help_text)
        if name == "info":
            q.add_argument("name", help="adapter name or folder")
        q.add_argument("--json", action="store_true")
        _model_args(q)

    m = sub.add_parser("merge", help="fold an adapter into a full-precision base and save a dense model")
    m.add_argument("name", help="adapter name or folder")
    m.add_argument("--out", required=True, help="output folder (pippin format)")
    _model_args(m)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model folder / .gguf ('default' or omit: the default model)")
    p.add_argument("--adapters-dir", default=None, help="adapters folder (default: <model folder>/adapters)")


def is_path(name: str) -> bool:
    """An adapter argument is a folder path when it looks like one (has a '/'); otherwise a name under the root."""
    return "/" in name or name.startswith("~")


def _adapter_path(name: str, root: Path) -> Path:
    from pippin.adapters.store import check_name

    if is_path(name):
        return Path(name).expanduser()
    return root / check_name(name)


def run(args: argparse.Namespace) -> int:
    return {"train": _train, "list": _list, "info": _info, "merge": _merge}[args.action](args)


def _teacher_chats(convs: list, teacher, tok, args: argparse.Namespace, out: Path) -> list:  # noqa: ANN001 - model, tokenizer
    """The conversations' prompts answered by the teacher (greedy, continuous batching on its kernels), cached in
    <adapter>/teacher_replies.json under the teacher's fingerprint and the reply length."""
    from pippin.adapters.lora import base_fingerprint
    from pippin.engine.engine import Engine
    from pippin.engine.sampling import SamplingParams
    from pippin.eval.systems import PippinSystem
    from pippin.train.data import prompt_of, teacher_chats

    if teacher is None or args.format == "text":
        raise PippinError("--teacher-replies needs --teacher and chat-shaped --data (--format chat, alpaca, dialogsum or xsum).")
    key = f"teacher {base_fingerprint(teacher)}, greedy, {args.teacher_replies} tokens"
    fits = [c for c in convs if len(tok.encode_chat(prompt_of(c))) < args.seq_len]
    if len(fits) < len(convs):
        print(f"{len(convs) - len(fits)} of {len(convs)} prompts are --seq-len {args.seq_len} tokens or longer; left out", file=sys.stderr)
    if not fits:
        raise PippinError(f"Every prompt is at least --seq-len {args.seq_len} tokens long; raise it.")
    system = PippinSystem(Engine(teacher, max_batch=8, max_len=args.seq_len + args.teacher_replies), tok, spec="teacher")
    params = SamplingParams(max_new_tokens=args.teacher_replies, temperature=0.0)
    return teacher_chats(fits, lambda batch: system.generate(batch, params), cache=out / "teacher_replies.json", key=key)


def _root(args: argparse.Namespace, loaded) -> Path:  # noqa: ANN001 - LoadedModel
    from pippin.api import default_adapters_dir

    return Path(args.adapters_dir) if args.adapters_dir else default_adapters_dir(loaded)


def _train(args: argparse.Namespace) -> int:
    import torch

    from pippin.adapters.lora import LoraConfig
    from pippin.api import load_any
    from pippin.train.adapter import TrainConfig, train_adapter
    from pippin.train.data import all_positions, read_conversations, text_examples, tokenize_chat

    if args.threads:
        torch.set_num_threads(args.threads)
    objective = args.objective or ("distill" if args.format == "text" else "sft")
    distils = objective in ("distill", "blockwise")  # a teacher on every position of the data
    if (distils or args.init_residual) and not args.teacher:
        what = f"--objective {objective}" if distils else "--init-residual"
        raise PippinError(f"{what} needs --teacher (e.g. --teacher default for the full-precision model).")
    loaded = load_any(args.model, progress=True)
    tok = loaded.tokenizer
    if tok is None:
        raise PippinError(f"{loaded.path} has no tokenizer.")
    root = _root(args, loaded)
    out = _adapter_path(args.name, root)
    if args.device != "cpu":  # say so before minutes of loading and teacher replies
        from pippin.train.placement import resolve_device

        resolve_device(args.device)
    teacher = load_any(args.teacher).model if distils or args.init_residual else None
    if args.format == "text":
        from pippin.api import read_text_source

        # 'self[:N]': text the teacher (or else the model) writes itself; no outside data needed.
        text = read_text_source(args.data, teacher if teacher is not None else loaded.model, tok)
        examples = text_examples(tok.encode(text), seq_len=args.seq_len)
        examples = examples[args.skip : None if args.limit is None else args.skip + args.limit]
    else:
        convs = read_conversations(args.data, args.format, skip=args.skip, limit=args.limit)
        if args.teacher_replies:
            convs = _teacher_chats(convs, teacher, tok, args, out)
        examples = [tokenize_chat(tok, c, max_len=args.seq_len) for c in convs]
        if distils:  # the teacher's distribution (or hidden states) at every position, prompt included
            examples = [all_positions(e) for e in examples]
    if args.text_data:
        from pippin.api import read_text_source

        if not distils:
            raise PippinError("--text-data adds plain text to distil on; use it with --objective distill or blockwise and --teacher.")
        text = read_text_source(args.text_data, teacher, tok)
        examples += text_examples(tok.encode(text), seq_len=args.seq_len)[: len(examples)]  # one window per chat
    init = str(_adapter_path(args.init_from, root)) if args.init_from else None
    cfg = TrainConfig(
        lora=LoraConfig(rank=args.rank, alpha=args.alpha),
        objective=objective,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        grad_checkpointing=args.grad_checkpointing,
        save_every=args.save_every,
        seed=args.seed,
        init_from=init,
        init_residual=args.init_residual,
        block_seqs=args.block_seqs,
        device=args.device,
        bf16=args.bf16,
    )
    meta = {"base_model": loaded.meta.get("name", str(loaded.path)), "data": str(args.data), "format": args.format}
    meta |= {"teacher_replies": args.teacher_replies, "text_data": args.text_data} if args.teacher_replies or args.text_data else {}
    res = train_adapter(loaded.model, examples, cfg, out_dir=out, name=Path(out).name, teacher=teacher, meta=meta)
    note = f" (resumed at step {res.resumed_from})" if res.resumed_from else ""
    if res.n_dropped:
        note += f"; {res.n_dropped} examples longer than --seq-len {args.seq_len} were skipped"
    steps = f"{res.steps} steps per block" if objective == "blockwise" else f"{res.steps} steps"
    print(f"adapter {out.name}: {steps}{note} in {res.seconds:.0f} s, final loss {res.losses[-1]:.4f} -> {out}", file=sys.stderr)
    return 0


def _describe(path: Path, fingerprint: str | None) -> dict:
    from pippin.adapters.peft_format import load_adapter

    a = load_adapter(path)
    fp = a.meta.get("base_fingerprint")
    return {
        "name": a.name,
        "path": str(path),
        "rank": a.rank,
        "alpha": a.config.alpha,
        "modules": len(a.weights),
        "targets": sorted({m.rsplit(".", 1)[-1] for m in a.weights}),
        "size_mb": round(a.nbytes / 1e6, 2),
        "base_matches": None if fp is None or fingerprint is None else fp == fingerprint,
        **{k: v for k, v in a.meta.items() if k not in ("base_fingerprint",)},
    }


def _fingerprint(loaded) -> str:  # noqa: ANN001 - LoadedModel
    from pippin.adapters.lora import base_fingerprint

    return base_fingerprint(loaded.model)


def _list(args: argparse.Namespace) -> int:
    from pippin.adapters.peft_format import CONFIG_FILE
    from pippin.api import load_any

    loaded = load_any(args.model)
    root, fp = _root(args, loaded), _fingerprint(loaded)
    rows = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if (d / CONFIG_FILE).is_file():
            try:
                rows.append(_describe(d, fp))
            except PippinError as e:
                rows.append({"name": d.name, "path": str(d), "error": str(e)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"No adapters in {root}. Train one with `pippin adapter train NAME --data ...`.")
        return 0
    print(f"{'name':<20} {'rank':>4} {'MB':>6} {'base':>5}  objective  init_from")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<20} unreadable: {r['error']}")
            continue
        base = {True: "ok", False: "OTHER", None: "?"}[r["base_matches"]]
        print(f"{r['name']:<20} {r['rank']:>4} {r['size_mb']:>6.1f} {base:>5}  {r.get('objective', '?'):<9}  {r.get('init_from') or '-'}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from pippin.api import load_any

    loaded = load_any(args.model)
    info = _describe(_adapter_path(args.name, _root(args, loaded)), _fingerprint(loaded))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>16}: {v}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from pippin.adapters.lora import merge_lora_
    from pippin.api import attach_adapters, load_any
    from pippin.model.checkpoint import save_pippin

    loaded = load_any(args.model)
    if "quantization" in loaded.meta:
        raise PippinError(
            f"{loaded.path} is compressed; merging would round the adapter away. Merge into the full-precision model instead."
        )
    store = attach_adapters(loaded, args.adapters_dir, n_slots=2)
    name = args.name
    if is_path(name):
        store.add(Path(name).expanduser().name, Path(name).expanduser())
        name = Path(name).expanduser().name
    slot = store.slot_for(name)
    merge_lora_(loaded.model, slot=slot)
    meta = {"name": f"{loaded.meta.get('name', loaded.path.name)}+{name}", "merged_adapter": name, "base": str(loaded.path)}
    out = save_pippin(loaded, args.out, extra_meta=meta)
    print(f"merged {name} into {out}", file=sys.stderr)
    return 0
