"""Compression benchmark: perplexity, size and decode speed of pippin's compressed models and llama.cpp's.

Perplexity is measured on held-out English (XSum articles, never used for calibration) with the same
token ids for every engine: pippin's tokenizer, non-overlapping windows, every token but each window's
first scored. llama.cpp variants are made from the shipped Q4_1 by llama.cpp's own quantizer (first to
F32, an exact dequantization, then to each type) and scored through llama-cpp-python's logits.
bpw counts every stored byte for both (llama.cpp: file size; pippin: every tensor in the checkpoint).
Decode speed: 2 threads, batch 1, 64 greedy steps, medians of interleaved rounds in shuffled order. Each pippin
checkpoint is also measured with 8-bit activations switched on (the integer kernels; same weights) and with an
8-bit KV cache.
  python benchmarks/compression.py --xsum ../shared/data/xsum/test.jsonl \\
      --pippin full=default --pippin 4bit=PATH ... --llama Q4_0,Q3_K_M,Q2_K --out docs/benchmarks/compression.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from pippin.api import load_any
from pippin.engine.generate import decode_step, prefill
from pippin.engine.kv_cache import KVCache
from pippin.kernels.decoder import FusedDecoder
from pippin.model.checkpoint import default_gguf_path
from pippin.quant.compress import set_act8_, stored_bits

sys.path.insert(0, str(Path(__file__).parent))
from runtime import llama_argmax  # noqa: E402 - the sibling benchmark

N_PARAMS = 134_515_008


def heldout_ids(tokenizer, path: str, n_tokens: int) -> list[int]:
    docs = [json.loads(line)["document"] for line in Path(path).read_text().splitlines()[:400]]
    return tokenizer.encode("\n\n".join(docs))[:n_tokens]


@torch.no_grad()
def pippin_ppl(model, windows: list[list[int]], *, kv8: bool = False) -> float:
    """kv8: attend over an 8-bit KV cache (each window prefilled through it, so every query sees int8 keys/values)."""
    nll, n = 0.0, 0
    for w in windows:
        x = torch.tensor([w])
        if kv8:
            cache = KVCache(model.config, batch_size=1, max_len=len(w), kv8=True)
            positions = torch.arange(len(w)).unsqueeze(0)
            cache.begin(positions)
            logits = model(x, positions=positions, cache=cache, mask=cache.attention_mask(positions))
        else:
            logits = model(x)
        nll += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        n += len(w) - 1
    return math.exp(nll / n)


def llama_ppl(llm, windows: list[list[int]]) -> float:
    import numpy as np

    nll, n = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(sum(logp[i, w[i + 1]] for i in range(len(w) - 1)))
        n += len(w) - 1
    return math.exp(nll / n)


def make_llama_variants(types: list[str], workdir: Path) -> dict[str, Path]:
    import llama_cpp

    def quantize(src: Path, dst: Path, ftype: int) -> None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = ftype, True, 2
        if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {src} to {dst}")

    f32 = workdir / "f32.gguf"
    quantize(default_gguf_path(), f32, llama_cpp.LLAMA_FTYPE_ALL_F32)
    out = {"Q4_1 (shipped)": default_gguf_path()}
    for t in types:
        dst = workdir / f"{t}.gguf"
        quantize(f32, dst, getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{t}"))
        out[t] = dst
    return out


def pippin_decode(model, *, act8: bool = False) -> callable:
    cache = KVCache(model.config, batch_size=1, max_len=512)

    def run() -> float:
        set_act8_(model, act8)
        dec = FusedDecoder.from_model(model)  # after the switch: the plan holds the act8 kernels' arguments
        tok = prefill(dec, torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), torch.tensor([8]), cache).argmax(-1)
        t = time.perf_counter()
        for _ in range(64):
            tok = decode_step(dec, tok, cache).argmax(-1)
        return 64 / (time.perf_counter() - t)

    return run


def llama_decode(llm) -> callable:
    def run() -> float:
        llm.reset()
        llm.eval([1, 2, 3, 4, 5, 6, 7, 8])
        t = time.perf_counter()
        for _ in range(64):
            llm.eval([llama_argmax(llm)])
        return 64 / (time.perf_counter() - t)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xsum", required=True, help="XSum test.jsonl (held-out text)")
    ap.add_argument("--pippin", action="append", default=[], help="LABEL=PATH of a pippin checkpoint ('default' = full precision)")
    ap.add_argument("--llama", default="Q4_0,Q3_K_M,Q2_K", help="llama.cpp types to make and score ('' for none)")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="PNG of perplexity against bpw")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_any(None)
    ids = heldout_ids(base.tokenizer, args.xsum, args.windows * args.ctx)
    windows = [ids[i : i + args.ctx] for i in range(0, len(ids), args.ctx)][: args.windows]
    rows, speed = {}, {}
    for spec in args.pippin:
        label, path = spec.split("=", 1)
        model = load_any(None if path == "default" else path).model
        # Each checkpoint is measured with and without 8-bit activations (a runtime switch: same weights).
        has_act8 = set_act8_(model, False) > 0
        row = {"engine": "pippin", "bpw": stored_bits(model) / N_PARAMS, "ppl": pippin_ppl(model, windows)}
        row["ppl_kv8"] = pippin_ppl(model, windows, kv8=True)
        if has_act8:
            set_act8_(model, True)
            row["ppl_act8"] = pippin_ppl(model, windows)
            row["ppl_act8_kv8"] = pippin_ppl(model, windows, kv8=True)
        rows[label] = row
        speed[(label, "decode_tok_s")] = pippin_decode(model)
        if has_act8:
            speed[(label, "decode_act8_tok_s")] = pippin_decode(model, act8=True)
        print(f"{label}: {row}", file=sys.stderr)
    tmp = tempfile.TemporaryDirectory()
    types = [t for t in args.llama.split(",") if t]
    if types:
        import llama_cpp

        for label, path in make_llama_variants(types, Path(tmp.name)).items():
            label = f"llama.cpp {label}"
            scorer = llama_cpp.Llama(str(path), n_ctx=args.ctx, n_batch=args.ctx, logits_all=True, n_threads=args.threads, verbose=False)
            rows[label] = {"engine": "llama.cpp", "bpw": path.stat().st_size * 8 / N_PARAMS, "ppl": llama_ppl(scorer, windows)}
            del scorer
            llm = llama_cpp.Llama(
                str(path), n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, flash_attn=True, verbose=False
            )
            speed[(label, "decode_tok_s")] = llama_decode(llm)
            print(f"{label}: {rows[label]}", file=sys.stderr)
    samples = {k: [] for k in speed}
    order = list(speed)
    for _ in range(args.rounds):
        random.shuffle(order)  # interleaved, in a new order each round: slow drifts of the machine hit all alike
        for k in order:
            samples[k].append(speed[k]())
    for (label, key), values in samples.items():
        rows[label][key] = statistics.median(values)
        rows[label][key.replace("_tok_s", "_samples")] = values
    full = rows.get("full", {}).get("ppl")

    def cell(r: dict, key: str, fmt: str = "{:.2f}") -> str:
        return fmt.format(r[key]) if key in r else "–"

    print("\n| model | bpw (all weights) | PPL | vs full | PPL, kv8 | PPL, act8 | PPL, act8 + kv8 | decode tok/s | decode act8 tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, r in sorted(rows.items(), key=lambda kv: -kv[1]["bpw"]):
        rel = f"{100 * (r['ppl'] / full - 1):+.1f} %" if full else "-"
        print(
            f"| {k} | {r['bpw']:.2f} | {r['ppl']:.2f} | {rel} | {cell(r, 'ppl_kv8')} | {cell(r, 'ppl_act8')} | {cell(r, 'ppl_act8_kv8')} "
            f"| {cell(r, 'decode_tok_s', '{:.1f}')} | {cell(r, 'decode_act8_tok_s', '{:.1f}')} |"
        )
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "tokens_scored": sum(len(w) - 1 for w in windows),
        "threads": args.threads,
        "results": rows,
    }
    if args.out:
        from pippin.io import write_json_atomic

        write_json_atomic(args.out, report)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for engine, marker in (("pippin", "o"), ("llama.cpp", "s")):
            pts = [(r["bpw"], r["ppl"], k) for k, r in rows.items() if r["engine"] == engine and r["bpw"] < 20]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=engine)
            for x, y, k in pts:
                ax.annotate(k, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if full:
            ax.axhline(full, color="gray", ls="--", lw=1, label="full precision")
        ax.set_xlabel("bits per weight (all stored bytes)")
        ax.set_ylabel(f"perplexity, XSum ({report['tokens_scored']} tokens)")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("SmolLM2-135M-Instruct: perplexity vs size")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
