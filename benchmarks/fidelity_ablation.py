"""Where compression loses fidelity: compress one part of the default model at a time and measure it against full precision.

Each variant starts from the full-precision model and compresses only the embedding or only the linears (with
`pippin.quant.compress`, calibrated on AlpacaEval outputs as `make compressed` is), then measures perplexity on the
three held-out domains and KL / top-1 agreement on chat transcripts with `pippin.eval.fidelity`, on a smaller sample
than the full suite: 4 windows of 512 tokens per domain and 32 transcripts (every second MT-Bench first turn,
full precision's greedy reply, 128 tokens). No act8: the weights alone. docs/benchmarks.md's first fidelity table.

  python benchmarks/fidelity_ablation.py emb8 emb6 emb4 emb4-ef emb4-rows emb4-rows-ef linears=plan.json uniform=4

Variants: embN (int8 rows for N=8, an N-bit LUT otherwise; no error feedback, no row scales), emb4-ef, emb4-rows,
emb4-rows-ef (the default now), linears=PLAN (a plan.json, e.g. the 3.5 bpw model's), uniform=B (every linear at B bits).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from pippin.api import load_any
from pippin.engine.engine import Engine
from pippin.engine.sampling import SamplingParams
from pippin.eval.fidelity import DOMAINS, agreement, domain_text, perplexity, token_windows, transcript
from pippin.quant.calibrate import read_calibration_text
from pippin.quant.compress import TARGETS, CompressConfig, compress_


def variant_config(name: str, linears: list[str]) -> CompressConfig:
    kind, _, arg = name.partition("=")
    if kind == "linears":
        return CompressConfig(plan=json.loads(Path(arg).read_text())["plan"], embed_bits=8)
    if kind == "uniform":
        return CompressConfig(plan={n: int(arg) for n in linears}, embed_bits=8)
    bits = int(kind[3])  # embN...
    rows, ef = "rows" in kind, kind.endswith("-ef")
    # 32 calibration windows for the input statistics either way (error feedback's default), so that the k-means
    # importance is the same with and without it.
    return CompressConfig(plan={}, embed_bits=bits, embed_row_scale=rows, error_feedback=ef, n_seqs=32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    data = Path(args.data)
    torch.set_num_threads(2)
    loaded = load_any(None)
    tok, ref = loaded.tokenizer, loaded.model.eval()
    windows = {d: token_windows(tok.encode(domain_text(d, data)), window=512, n_tokens=8192)[:4] for d in DOMAINS}
    questions = [json.loads(line)["turns"][0] for line in (data / "mt_bench" / "question.jsonl").read_text().splitlines()][::2][:32]
    messages = [[{"role": "user", "content": q}] for q in questions]
    fast = copy.deepcopy(ref)
    replies = Engine(fast, max_batch=8).generate_ids([tok.encode_chat(m) for m in messages], SamplingParams(max_new_tokens=128))
    transcripts = [t for m, r in zip(messages, replies) if (t := transcript(tok, m, tok.decode(r))) is not None]
    del fast
    calib = tok.encode(read_calibration_text(data / "alpaca_eval" / "gpt4_1106_preview_model_outputs.json"))
    linears = [n for n, m in ref.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    with torch.no_grad():
        full = {d: perplexity(ref, w) for d, w in windows.items()}
    results = {"full": {"ppl": full}}
    print("full: " + " ".join(f"{d} {p:.2f}" for d, p in full.items()))
    for name in args.variants:
        model = copy.deepcopy(ref)
        t = time.time()
        report = compress_(model, calib, variant_config(name, linears))
        with torch.no_grad():
            ppl = {d: perplexity(model, w) for d, w in windows.items()}
            (a,) = agreement(ref, [model], transcripts)
        results[name] = {"bpw": report.bpw, "ppl": ppl, "ratio": {d: ppl[d] / full[d] for d in DOMAINS}, "kl": a.kl, "top1": a.top1}
        ratios = " ".join(f"{d} {ppl[d] / full[d]:.2f}x" for d in DOMAINS)
        print(f"{name}: {ratios}  KL {a.kl:.4f}  top-1 {a.top1:.1f} %  ({time.time() - t:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
