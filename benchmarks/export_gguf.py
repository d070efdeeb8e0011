"""GGUF export in llama.cpp: the exported full-precision and 3.5 bpw models, greedy, token by token against pippin.

For each model: `pippin.export.gguf.export_gguf` writes the file (with its fidelity report: KL(pippin || export) on
held-out text, read back by pippin), llama-cpp-python loads it, and 5 chat prompts are answered greedily for 64 tokens
by llama.cpp and by pippin (the plain PyTorch path with a KV cache, fp32 activations: act8 off, as in the KL report).
Full precision is also run from the shipped GGUF in llama.cpp: the export must give the same tokens as the original.
Printed as a table and written as JSON.
  nice -n 10 python benchmarks/export_gguf.py --out docs/benchmarks/export_gguf.json [--workdir DIR]
(--workdir keeps the exports; a second run reuses them and their reports and only repeats the greedy comparison.)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from pippin.api import load_any
from pippin.engine.generate import decode_step, prefill
from pippin.engine.kv_cache import KVCache
from pippin.export.gguf import GGUFReport, TensorRecord, export_gguf, fidelity_tokens, report_path
from pippin.kernels import cpu_name
from pippin.model.checkpoint import default_gguf_path
from pippin.quant.compress import set_act8_

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for a job interview.",
    "How many legs does a spider have?",
]
MODELS = {"full precision": "default", "3.5 bpw (rotated)": "~/.cache/pippin/models/smollm2-135m-instruct-3.5bpw-rot"}


@torch.inference_mode()
def pippin_greedy(model: torch.nn.Module, ids: list[int], n: int, stop: set[int]) -> list[int]:
    cache = KVCache(model.config, batch_size=1, max_len=len(ids) + n + 1)
    logits = prefill(model, torch.tensor([ids]), torch.tensor([len(ids)]), cache)
    out: list[int] = []
    for _ in range(n):
        tok = int(logits[0].argmax())
        out.append(tok)
        if tok in stop:
            break
        logits = decode_step(model, torch.tensor([tok]), cache)
    return out


def llama_greedy(llm, ids: list[int], n: int, stop: set[int]) -> list[int]:  # noqa: ANN001 - llama_cpp.Llama
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        out.append(tok)
        if tok in stop:
            break
        llm.eval([tok])
    return out


def agreement(a: list[int], b: list[int]) -> dict[str, float | bool | int]:
    """Identical sequences; the shared prefix; the share of positions (over the longer) with the same token."""
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    same = sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1)
    return {"identical": a == b, "prefix": prefix, "same_position": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--workdir", default=None, help="where the exports go; exports already there (with their report) are reused")
    args = ap.parse_args()
    import llama_cpp

    torch.set_num_threads(args.threads)
    results: dict = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_name()} ({platform.machine()}), {args.threads} threads",
        "llama_cpp": llama_cpp.__version__,
        "tokens": args.tokens,
        "models": {},
    }
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pippin-export-"))
    for label, path in MODELS.items():
        t0 = time.perf_counter()
        loaded = load_any(path)
        file = workdir / f"{label.split()[0]}.gguf"
        if file.is_file() and report_path(file).is_file():
            saved = json.loads(report_path(file).read_text())
            report = GGUFReport(**{**saved, "tensors": [TensorRecord(**r) for r in saved["tensors"]]})
            export_s = None  # reused
        else:
            report = export_gguf(loaded, file, fidelity_tokens=fidelity_tokens(loaded, 512))
            export_s = time.perf_counter() - t0
        set_act8_(loaded.model, False)
        tok = loaded.tokenizer
        stop = set(loaded.model.config.eos_token_ids)
        files = {"export": report.path} | ({"shipped gguf": str(default_gguf_path())} if report.exact else {})
        engines = {
            # logits_all: llama-cpp-python keeps `scores` only then (without it they stay zero, argmax reads garbage).
            name: llama_cpp.Llama(file, n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, logits_all=True, verbose=False)
            for name, file in files.items()
        }
        rows = []
        for prompt in PROMPTS:
            ids = tok.encode_chat([{"role": "user", "content": prompt}])
            ours = pippin_greedy(loaded.model, ids, args.tokens, stop)
            row = {"prompt": prompt, "pippin": tok.decode(ours)}
            outs = {name: llama_greedy(llm, ids, args.tokens, stop) for name, llm in engines.items()}
            for name, theirs in outs.items():
                row[name] = {"text": tok.decode(theirs), **agreement(ours, theirs)}
            if "shipped gguf" in outs:
                row["export equals shipped"] = outs["export"] == outs["shipped gguf"]
            rows.append(row)
        shipped = "shipped gguf" in engines
        del engines
        summary = {
            "file_mb": report.size_bytes / 1e6,
            "bpw": report.bpw,
            "types": report.types,
            "exact": report.exact,
            "fallbacks": report.fallbacks,
            "fidelity": report.fidelity,
            "export_s": export_s,
            "identical_greedy": sum(r["export"]["identical"] for r in rows),
            "same_position": sum(r["export"]["same_position"] for r in rows) / len(rows),
            "prompts": rows,
        }
        if shipped:
            summary["export_equals_shipped_in_llama_cpp"] = sum(r["export equals shipped"] for r in rows)
            summary["shipped_identical_to_pippin"] = sum(r["shipped gguf"]["identical"] for r in rows)
        results["models"][label] = summary
    print(f"{results['machine']}, llama-cpp-python {results['llama_cpp']}, {results['date']}")
    n = f"{len(PROMPTS)} × {args.tokens}"
    print(f"| model | file MB | bpw | types | KL(pippin‖gguf) | top-1 % | greedy identical to pippin ({n}) | same position % |")
    print("|---|---|---|---|---|---|---|---|")
    for label, s in results["models"].items():
        f = s["fidelity"]
        types = ", ".join(f"{k} ×{v}" for k, v in sorted(s["types"].items()))
        print(
            f"| {label} | {s['file_mb']:.1f} | {s['bpw']:.2f} | {types} | {f['kl_mean']:.4f} | {100 * f['top1_agreement']:.1f} | "
            f"{s['identical_greedy']}/{len(PROMPTS)} | {100 * s['same_position']:.1f} |"
        )
        if "export_equals_shipped_in_llama_cpp" in s:
            same = s["export_equals_shipped_in_llama_cpp"]
            print(f"  llama.cpp on the export = llama.cpp on the shipped file: {same}/{len(PROMPTS)} prompts")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
