"""Where compression loses fidelity: compress one part of the default model at a time and measure it against full precision.

Each variant starts from the full-precision model and compresses only the embedding or only the linears (with
`pippin.quant.compress`, calibrated on AlpacaEval outputs as `make compressed` is), then measures perplexity on the
three held-out domains and KL / top-1 agreement on chat transcripts with `pippin.eval.fidelity`, on a smaller sample
than the full suite: 4 windows of 512 tokens per domain and 32 transcripts (every second MT-Bench first turn,
full precision's greedy reply, 128 tokens). No act8: the weights alone. docs/benchmarks.md's first fidelity table.

  python benchmarks/fidelity_ablation.py emb8 emb6 emb4 emb4-ef emb4-rows emb4-rows-ef linears=plan.json uniform=4

Variants: bpw=X (the whole model at X bpw with a row-scaled 4-bit embedding, as `make compressed-3.5`), embN (int8
rows for N=8, an N-bit LUT otherwise; no error feedback, no row scales), emb4-ef, emb4-rows, emb4-rows-ef (the default
now), linears=PLAN (a plan.json, e.g. the 3.5 bpw model's), uniform=B (every linear at B bits). Options as suffixes:
+rot folds the rotations of `pippin.quant.rotate` into the weights first, +seq quantizes block by block on the
quantized model's inputs, +gN gives each N rows one LUT (16 by default), +norows drops the linears' row scales (on by
default), +nor4 drops +rot's online Hadamard on down_proj's input. llama=TYPE (Q4_0, Q3_K_M, Q2_K...) scores
llama.cpp's own quantization of the shipped model through llama-cpp-python (`make bench-setup`) on the same sample.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pippin.api import load_any
from pippin.engine.engine import Engine
from pippin.engine.sampling import SamplingParams
from pippin.eval.fidelity import DOMAINS, agreement, domain_text, perplexity, token_windows, transcript
from pippin.quant.calibrate import read_calibration_text
from pippin.quant.compress import TARGETS, CompressConfig, compress_


def variant_config(name: str, linears: list[str]) -> CompressConfig:
    name, *options = name.split("+")
    extra = {"rotate": "rot" in options}
    for o in options:
        if o.startswith("g"):
            extra["group_size"] = int(o[1:])
        elif o == "seq":
            extra["sequential"] = True
        elif o == "norows":
            extra["row_scale"] = False
        elif o == "nor4":
            extra["rotate_down"] = False
    kind, _, arg = name.partition("=")
    if kind == "bpw":  # the whole model under a budget, as `make compressed-3.5` builds it
        return CompressConfig(bpw=float(arg), embed_bits=4, **extra)
    if kind == "linears":
        return CompressConfig(plan=json.loads(Path(arg).read_text())["plan"], embed_bits=8, **extra)
    if kind == "uniform":
        return CompressConfig(plan={n: int(arg) for n in linears}, embed_bits=8, **extra)
    bits = int(kind[3])  # embN...
    rows, ef = "rows" in kind, kind.endswith("-ef")
    # 32 calibration windows for the input statistics either way (error feedback's default), so that the k-means
    # importance is the same with and without it.
    return CompressConfig(plan={}, embed_bits=bits, embed_row_scale=rows, error_feedback=ef, n_seqs=32, **extra)


def llama_forward(ftype: str, workdir: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """llama.cpp's quantization of the shipped model (made by its own quantizer, as benchmarks/compression.py does) as
    a forward(ids (1, T)) -> logits (1, T, V) through llama-cpp-python, and its bpw (file size over parameters)."""
    import llama_cpp
    import numpy as np
    from compression import N_PARAMS, make_llama_variants

    path = make_llama_variants([ftype], workdir)[ftype]
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=1024, logits_all=True, n_threads=2, verbose=False)

    def forward(x: torch.Tensor) -> torch.Tensor:
        ids = x[0].tolist()
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(np.asarray(llm.scores[: len(ids)], dtype=np.float32)).unsqueeze(0)

    return forward, path.stat().st_size * 8 / N_PARAMS


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
    tmp = tempfile.TemporaryDirectory()
    print("full: " + " ".join(f"{d} {p:.2f}" for d, p in full.items()))
    for name in args.variants:
        t = time.time()
        if name.startswith("llama="):
            model, bpw = llama_forward(name.removeprefix("llama="), Path(tmp.name))
        else:
            model = copy.deepcopy(ref)
            bpw = compress_(model, calib, variant_config(name, linears)).bpw
        with torch.no_grad():
            ppl = {d: perplexity(model, w) for d, w in windows.items()}
            (a,) = agreement(ref, [model], transcripts)
        results[name] = {"bpw": bpw, "ppl": ppl, "ratio": {d: ppl[d] / full[d] for d in DOMAINS}, "kl": a.kl, "top1": a.top1}
        ratios = " ".join(f"{d} {ppl[d] / full[d]:.2f}x" for d in DOMAINS)
        print(f"{name}: {ratios}  KL {a.kl:.4f}  top-1 {a.top1:.1f} %  ({time.time() - t:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
