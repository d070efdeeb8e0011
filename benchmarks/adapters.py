"""Adapter benchmark: accuracy recovery, swap latency, mixed-adapter throughput (vs PEFT), task-adapter gain.

Sections (each optional):
- recovery: held-out XSum perplexity of full precision, each compressed model, and each compressed model
  with its `recovery` adapter; "gap closed" = (PPL_q - PPL_q+adapter) / (PPL_q - PPL_full).
- swap: time to make a rank-16 adapter current, from the memory cache and from disk; adapter size.
- throughput: decode tok/s of a batch of 8 rows with 8 different adapters against the same batch on the
  base alone (2 threads, kernels, medians of interleaved rounds); the same for transformers + PEFT with
  `adapter_names` (PEFT's mixed-adapter batch inference) as the anchor.
- summarization: ROUGE on held-out DialogSum dialogues (rows [0, n) never trained on) for the base, the
  recovery adapter and the summarization adapter.
  python benchmarks/adapters.py --xsum ../shared/data/xsum/test.jsonl --compressed 3.5bpw=PATH \\
      --dialogsum ../shared/data/dialogsum/dialogsum.test.jsonl --out docs/benchmarks/adapters.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from pippin.adapters.lora import lora_modules
from pippin.adapters.peft_format import Adapter, LoraConfig, save_adapter
from pippin.api import attach_adapters, default_adapters_dir, load_any
from pippin.engine.engine import Engine
from pippin.engine.sampling import SamplingParams
from pippin.train.data import SUMMARIZE_DIALOGUE
from pippin.train.losses import perplexity


def heldout_windows(tokenizer, path: str, n: int, ctx: int) -> list[list[int]]:
    docs = [json.loads(line)["document"] for line in Path(path).read_text().splitlines()[:400]]
    ids = tokenizer.encode("\n\n".join(docs))[: n * ctx]
    return [ids[i : i + ctx] for i in range(0, len(ids), ctx)][:n]


def recovery(args, full_ppl: float, windows) -> dict:
    out = {}
    for spec in args.compressed:
        label, path = spec.split("=", 1)
        lm = load_any(path)
        row = {"path": path, "ppl": perplexity(lm.model, windows)}
        names = [n for n in args.recovery_names.split(",") if (default_adapters_dir(lm) / n).is_dir()]
        if names:
            store = attach_adapters(lm, n_slots=2)
        for name in names:  # e.g. the closed-form start alone, and the trained adapter
            store.route([name])
            key = "" if name == "recovery" else f"_{name}"
            row[f"ppl_recovery{key}"] = perplexity(lm.model, windows)
            row[f"gap_closed{key}"] = (row["ppl"] - row[f"ppl_recovery{key}"]) / (row["ppl"] - full_ppl)
        out[label] = row
        print(f"recovery {label}: {row}", file=sys.stderr)
    return out


def random_adapter(model, name: str, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    w = {
        n: ((torch.randn(16, m.in_features, generator=g) * 0.02).half(), (torch.randn(m.out_features, 16, generator=g) * 0.02).half())
        for n, m in lora_modules(model).items()
    }
    return Adapter(name=name, config=LoraConfig(), weights=w, scales=dict.fromkeys(w, 2.0))


def swap_and_throughput(args, path: str | None) -> dict:
    lm = load_any(path)
    tmp = Path(tempfile.mkdtemp())
    store = attach_adapters(lm, tmp, n_slots=9)
    names = [f"a{i}" for i in range(8)]
    for i, n in enumerate(names):
        save_adapter(random_adapter(lm.model, n, i), tmp / n)
    size_mb = (tmp / "a0" / "adapter_model.safetensors").stat().st_size / 1e6
    # Swap from memory: the adapter is cached but not in a slot (the slot was reassigned).
    mem, disk = [], []
    for _ in range(args.swap_rounds):
        store.route(names)  # fills all 8 slots
        store.get("a0")
        store._slots.pop("a0")  # forget only the slot assignment (the weights stay cached)
        t = time.perf_counter()
        store.slot_for("a0")
        mem.append((time.perf_counter() - t) * 1000)
        store.unload("a0")
        t = time.perf_counter()
        store.slot_for("a0")
        disk.append((time.perf_counter() - t) * 1000)
    # Throughput: 8 rows, equal prompt lengths, 64 greedy tokens each.
    tok = lm.tokenizer
    prompts = [
        tok.encode_chat([{"role": "user", "content": f"Write a short story about a {w}."}])[:24]
        for w in ["cat", "dog", "fox", "owl", "bee", "elk", "yak", "ant"]
    ]
    prompts = [p + [p[-1]] * (24 - len(p)) for p in prompts]
    engine = Engine(lm.model, max_batch=8, max_len=256, adapters=store)
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)

    def run(adapters):
        def go() -> float:
            engine.generate_ids(prompts, params, adapters=adapters)
            return engine.last_stats.decode_tok_s * len(prompts)

        return go

    cases = {"base": run(None), "8 adapters": run(names), "1 adapter": run(["a0"] * 8)}
    samples = {k: [] for k in cases}
    for _ in range(args.rounds):
        for k, fn in cases.items():
            samples[k].append(fn())
    tput = {k: statistics.median(v) for k, v in samples.items()}
    out = {
        "adapter_size_mb": size_mb,
        "swap_from_memory_ms": statistics.median(mem),
        "swap_from_disk_ms": statistics.median(disk),
        "decode_tok_s": tput,
        "decode_samples": samples,
        "ratio_8_adapters_vs_base": tput["8 adapters"] / tput["base"],
    }
    if args.peft:
        out["peft"] = peft_throughput(args, tmp, names, prompts)
    print(f"swap/throughput: {out}", file=sys.stderr)
    return out


def peft_throughput(args, folder: Path, names: list[str], prompts: list[list[int]]) -> dict:
    """transformers + PEFT, the same 8 adapters, mixed in one batch with `adapter_names`."""
    import peft
    import transformers

    from pippin.model.checkpoint import default_gguf_path

    gguf = default_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, str(folder / names[0]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(folder / n), adapter_name=n)
    ids = torch.tensor(prompts)
    n_new = 32

    def go(adapter_names) -> float:
        kw = {"adapter_names": adapter_names} if adapter_names else {}
        with torch.no_grad():
            t = time.perf_counter()
            if adapter_names:
                pm.generate(input_ids=ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, **kw)
            else:
                with pm.disable_adapter():
                    pm.generate(input_ids=ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        return len(prompts) * n_new / (time.perf_counter() - t)

    samples = {"base": [], "8 adapters": []}
    for _ in range(max(1, args.rounds - 1)):
        samples["base"].append(go(None))
        samples["8 adapters"].append(go(names))
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"tok_s_incl_prefill": med, "ratio_8_adapters_vs_base": med["8 adapters"] / med["base"], "samples": samples}


def summarize_with(engine, tok, rows: list[dict], adapter: str | None) -> list[str]:
    params = SamplingParams(max_new_tokens=96)
    preds = []
    for i in range(0, len(rows), 8):
        chunk = rows[i : i + 8]
        msgs = [[{"role": "user", "content": SUMMARIZE_DIALOGUE.format(dialogue=r["dialogue"].strip())}] for r in chunk]
        ids = engine.generate_ids([tok.encode_chat(m) for m in msgs], params, adapters=[adapter] * len(chunk))
        preds += [tok.decode(x).strip() for x in ids]
    return preds


def summarization(args, path: str | None) -> dict:
    from pippin.eval.tasks.summarization import ROUGE_TYPES, best_rouge

    rows = [json.loads(line) for line in Path(args.dialogsum).read_text().splitlines()[: args.n_summaries]]
    refs = [[r[k] for k in ("summary1", "summary2", "summary3") if k in r] for r in rows]

    def score(preds: list[str]) -> dict:
        # F1 x100, best of the references per dialogue, averaged over dialogues.
        scores = [best_rouge(p, rs) for p, rs in zip(preds, refs)]
        return {m: statistics.mean(s[m] for s in scores) for m in ROUGE_TYPES}

    out = {}
    full = load_any(None)
    preds = summarize_with(Engine(full.model, max_batch=8, max_len=1024), full.tokenizer, rows, None)
    out["full precision"] = {**score(preds), "example": preds[0]}
    del full
    lm = load_any(path)
    store = attach_adapters(lm, n_slots=3)
    engine = Engine(lm.model, max_batch=8, max_len=1024, adapters=store)
    for system in [None, *[a for a in ("recovery", "summarize") if a in store.names()]]:
        preds = summarize_with(engine, lm.tokenizer, rows, system)
        label = f"3.5 bpw + {system}" if system else "3.5 bpw"
        out[label] = {**score(preds), "example": preds[0]}
        print(f"summarization {label}: {out[label]}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xsum", default=None, help="XSum test.jsonl (held-out text for recovery)")
    ap.add_argument("--compressed", action="append", default=[], help="LABEL=PATH of a compressed model (its adapters/recovery is used)")
    ap.add_argument("--recovery-names", default="recovery", help="comma list of recovery adapters to score (those present)")
    ap.add_argument("--dialogsum", default=None, help="DialogSum jsonl (rows [0, n) held out)")
    ap.add_argument("--summarize-model", default=None, help="model whose adapters dir holds 'summarize' (default: first compressed)")
    ap.add_argument("--n-summaries", type=int, default=48)
    ap.add_argument("--throughput-model", default=None, help="model for swap/throughput (default: first compressed)")
    ap.add_argument("--peft", action="store_true", help="also measure transformers + PEFT mixed-adapter batches")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--swap-rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: recovery,swap,summarization")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    first = args.compressed[0].split("=", 1)[1] if args.compressed else None
    report = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "command": "python " + " ".join(sys.argv), "threads": args.threads}
    if args.xsum and "recovery" not in skip:
        full = load_any(None)
        windows = heldout_windows(full.tokenizer, args.xsum, args.windows, args.ctx)
        report["full_ppl"] = perplexity(full.model, windows)
        report["tokens_scored"] = sum(len(w) - 1 for w in windows)
        del full
        report["recovery"] = recovery(args, report["full_ppl"], windows)
    if "swap" not in skip:
        report["adapters"] = swap_and_throughput(args, args.throughput_model or first)
    if args.dialogsum and "summarization" not in skip:
        report["summarization"] = summarization(args, args.summarize_model or first)
    print(json.dumps(report, indent=2, default=str))
    if args.out:
        from pippin.io import write_json_atomic

        write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
