"""Runtime benchmark: prefill and decode speed, peak memory and the bandwidth limit, against the anchors.

Engines, all on the default model with the same thread count, measured in one process, interleaved
(round-robin, shuffled each round) and summarised by medians:
  pippin-fp32        pippin with its CPU kernels (fused decode blocks, AVX2 matvecs), fp32 weights
  pippin-fp32-ref    pippin's plain PyTorch reference path (no kernels), fp32 weights
  transformers-fp32  transformers LlamaForCausalLM with the same fp32 weights (sdpa, DynamicCache)
  pippin-4bit-act8   pippin's 4-bit palette (one LUT per 16 rows, 8-bit embedding), 8-bit activations (integer kernels)
  pippin-served-act8 what `make run` serves: 4/6-bit LUTs with row scales, a 6-bit embedding, rotations (5.4 bpw)
  ...-avx2           the same on the AVX2 kernel variant (where the CPU also runs AVX-512 VNNI, which is the default)
  pippin-5.4bpw-4/6-act8  the mixed 4/6-bit model at 5.4 bpw (8-bit embedding), 8-bit activations (6-bit layers
                     run on expanded bytes)
  pippin-3.5bpw[-act8][-kv8]  the 3.5 bpw mixed 2/3/4-bit model (4-bit LUT embedding), with and without 8-bit
                     activations, and with an 8-bit KV cache
  llama.cpp-Q4_1     llama-cpp-python on the shipped Q4_1 GGUF, flash_attn off and on
  llama.cpp-Q4_0/Q3_K_M  llama.cpp's own quantizations of the same model (flash_attn on)
Prefill: one forward over a 512-token prompt. Decode: 128 greedy steps after a 15-token prompt, batch 1.
Peak RSS is measured per engine in a fresh subprocess. Every sample records the CPU time other
processes used meanwhile, so a noisy run shows itself. Usage:
  python benchmarks/runtime.py [--rounds 5] [--threads 2] [--out docs/benchmarks/runtime.json]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from pippin.engine.generate import decode_step, prefill
from pippin.engine.kv_cache import KVCache
from pippin.kernels import cpu_name, variant
from pippin.model.checkpoint import config_to_hf, default_gguf_path, load_model

PREFILL, DECODE, DECODE_PROMPT = 512, 128, 15


def busy_jiffies() -> int:
    """Total non-idle CPU jiffies on the machine (all processes)."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    return sum(f) - f[3] - f[4]


def own_jiffies() -> int:
    t = os.times()
    return int((t.user + t.system) * os.sysconf("SC_CLK_TCK"))


class Sample:
    """Times a block and records how many cores other processes kept busy during it."""

    def __enter__(self):
        self.b0, self.o0, self.t0 = busy_jiffies(), own_jiffies(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        foreign = (busy_jiffies() - self.b0) - (own_jiffies() - self.o0)
        self.foreign_cores = max(0.0, foreign / os.sysconf("SC_CLK_TCK") / self.seconds)


# --- engines: each returns (prefill_fn, decode_fn) where decode_fn runs DECODE steps -------------


def pippin_engine(kernels: bool, path: str | None = None, act8: bool = False, kv8: bool = False, kernel_variant: str | None = None):
    if path is None:
        model = load_model().model
    else:
        from pippin.api import load_any
        from pippin.quant.compress import set_act8_

        model = load_any(os.path.expanduser(path)).model
        set_act8_(model, act8)
    fwd = model
    if kernels:
        from pippin.kernels.decoder import FusedDecoder

        fwd = FusedDecoder.from_model(model)
        assert fwd.fused, "pippin kernels unavailable"
    cache = KVCache(model.config, batch_size=1, max_len=1024, kv8=kv8)

    def run_prefill(ids):
        prefill(fwd, torch.tensor([ids]), torch.tensor([len(ids)]), cache)

    def run_decode(ids):
        tok = prefill(fwd, torch.tensor([ids]), torch.tensor([len(ids)]), cache).argmax(-1)
        for _ in range(DECODE):
            tok = decode_step(fwd, tok, cache).argmax(-1)

    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if kernel_variant is None:
        return run_prefill, run_decode, nbytes
    from pippin.kernels import ops

    def pinned(fn):  # this engine's calls run on the named kernel variant; the others keep the CPU's best
        def run(ids):
            best = ops().kernel_variant()
            ops().set_kernel_variant(kernel_variant)
            try:
                fn(ids)
            finally:
                ops().set_kernel_variant(best)

        return run

    return pinned(run_prefill), pinned(run_decode), nbytes


def transformers_engine():
    import transformers

    loaded = load_model()
    cfg = loaded.model.config
    hf_cfg = {k: v for k, v in config_to_hf(cfg).items() if k != "model_type"}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg, attn_implementation="sdpa")).eval()
    hf.load_state_dict({f"model.{k}": v for k, v in loaded.model.state_dict().items()}, strict=False)
    hf.tie_weights()
    del loaded

    @torch.inference_mode()
    def run_prefill(ids):
        hf(torch.tensor([ids]), logits_to_keep=1)

    @torch.inference_mode()
    def run_decode(ids):
        out = hf(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(DECODE):
            out = hf(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    return run_prefill, run_decode, 4 * sum(p.numel() for p in hf.parameters())


def llama_cpp_variant(ftype: str) -> Path:
    """A llama.cpp quantization of the default model, made by llama.cpp's own quantizer from the shipped Q4_1 (to
    F32, an exact dequantization, then to `ftype`); cached under $PIPPIN_HOME/llama.cpp."""
    import llama_cpp

    from pippin.model.checkpoint import pippin_home

    folder = pippin_home() / "llama.cpp"
    folder.mkdir(parents=True, exist_ok=True)
    f32, dst = folder / "smollm2-135m-f32.gguf", folder / f"smollm2-135m-{ftype}.gguf"
    for src, out, t in ((default_gguf_path(), f32, "ALL_F32"), (f32, dst, f"MOSTLY_{ftype}")):
        if not out.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_{t}"), True, 2
            tmp = out.with_suffix(".part")
            if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
                raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype}")
            tmp.replace(out)
    return dst


def llama_argmax(llm) -> int:  # noqa: ANN001 - llama_cpp.Llama
    """The greedy next token from llama.cpp's last logits row. Without logits_all, llama-cpp-python 0.3.36 leaves
    `llm.scores` at zero (argmax 0 every step), so the row is read from the context itself."""
    import llama_cpp
    import numpy as np

    return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).argmax())


def llama_cpp_engine(threads: int, flash_attn: bool, ftype: str | None = None):
    import llama_cpp

    path = default_gguf_path() if ftype is None else llama_cpp_variant(ftype)
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=1024,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=flash_attn,
        verbose=False,
    )

    def run_prefill(ids):
        llm.reset()
        llm.eval(ids)

    def run_decode(ids):
        llm.reset()
        llm.eval(ids)
        for _ in range(DECODE):
            llm.eval([llama_argmax(llm)])  # greedy, like the other engines

    return run_prefill, run_decode, path.stat().st_size


COMPRESSED = os.environ.get("PIPPIN_BENCH_COMPRESSED", "~/.cache/pippin/models/smollm2-135m-instruct-3.5bpw-rot")
"""The 3.5 bpw checkpoint (`make compressed-3.5`); the 4-bit one is `make bench-models`' bench-4bit."""
SERVED = os.environ.get("PIPPIN_BENCH_SERVED", "~/.cache/pippin/models/smollm2-135m-instruct-5.4bpw-tuned")
"""What `make run` serves (`make compressed`): 4/6-bit LUTs, a 6-bit embedding, rotations (5.4 bpw)."""
FOUR_BIT = os.environ.get("PIPPIN_BENCH_4BIT", "~/.cache/pippin/models/bench-4bit")
MIXED_46 = os.environ.get("PIPPIN_BENCH_46", "~/.cache/pippin/models/bench-5.4bpw-46")
"""The 5.4 bpw mixed 4/6-bit model (`make bench-models`): the one whose perplexity beats llama.cpp's Q3_K_M."""

ENGINES = {
    "pippin-fp32": lambda th: pippin_engine(True),
    "pippin-fp32-ref": lambda th: pippin_engine(False),
    "pippin-served-act8": lambda th: pippin_engine(True, SERVED, act8=True),
    "pippin-served-act8-avx2": lambda th: pippin_engine(True, SERVED, act8=True, kernel_variant="avx2-fma"),
    "pippin-3.5bpw-act8-avx2": lambda th: pippin_engine(True, COMPRESSED, act8=True, kernel_variant="avx2-fma"),
    "pippin-5.4bpw-4/6-act8": lambda th: pippin_engine(True, MIXED_46, act8=True),
    "pippin-4bit-act8": lambda th: pippin_engine(True, FOUR_BIT, act8=True),
    "pippin-3.5bpw-act8": lambda th: pippin_engine(True, COMPRESSED, act8=True),
    "pippin-3.5bpw-act8-kv8": lambda th: pippin_engine(True, COMPRESSED, act8=True, kv8=True),
    "pippin-3.5bpw": lambda th: pippin_engine(True, COMPRESSED),
    "transformers-fp32": lambda th: transformers_engine(),
    "llama.cpp-Q4_1": lambda th: llama_cpp_engine(th, False),
    "llama.cpp-Q4_1-fa": lambda th: llama_cpp_engine(th, True),
    "llama.cpp-Q4_0-fa": lambda th: llama_cpp_engine(th, True, "Q4_0"),
    "llama.cpp-Q3_K_M-fa": lambda th: llama_cpp_engine(th, True, "Q3_K_M"),
}


def read_bandwidth() -> float:
    """Read bandwidth in GB/s: torch sum over 1 GiB, median of 5."""
    x = torch.ones(2**28)
    x.sum()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.nbytes / statistics.median(times) / 1e9


def peak_rss_kb() -> int:
    """This process's own peak resident set (VmHWM), fresh since its exec."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_of(engine: str, threads: int) -> float:
    """Peak RSS (MB) of a fresh process that loads the engine and runs one prefill and one decode."""
    code = (
        f"import torch, resource, sys; torch.set_num_threads({threads}); sys.path.insert(0, {str(Path(__file__).parent)!r});"
        f"import runtime as r; p, d, _ = r.ENGINES[{engine!r}]({threads}); ids = list(range(100, 100 + {PREFILL}));"
        f"p(ids); d(ids[:{DECODE_PROMPT}]); print(r.peak_rss_kb())"
    )
    # ru_maxrss would be wrong here: Linux carries it over fork+exec from this (large) parent process.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.engines.split(",") if n]
    engines = {}
    for n in names:
        try:
            engines[n] = ENGINES[n](args.threads)
        except ImportError as e:
            print(f"skipping {n}: {e}", file=sys.stderr)
    rng = random.Random(0)
    prompt = [rng.randrange(100, 49000) for _ in range(PREFILL)]
    samples: dict[str, dict[str, list]] = {n: {"prefill": [], "decode": [], "foreign": []} for n in engines}
    for p, d, _ in engines.values():  # warm-up (and kernel builds) outside the measurement
        p(prompt[:64])
        d(prompt[:DECODE_PROMPT])
    for r in range(args.rounds):
        order = list(engines)
        rng.shuffle(order)
        for n in order:
            p, d, _ = engines[n]
            gc.collect()
            with Sample() as s:
                p(prompt)
            samples[n]["prefill"].append(PREFILL / s.seconds)
            samples[n]["foreign"].append(s.foreign_cores)
            with Sample() as s:
                d(prompt[:DECODE_PROMPT])
            # The decode sample includes the 15-token prefill (~2-5% of it); subtract nothing, report as is.
            samples[n]["decode"].append(DECODE / s.seconds)
            samples[n]["foreign"].append(s.foreign_cores)
        print(
            f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {statistics.median(samples[n]['decode']):.1f}" for n in engines),
            file=sys.stderr,
        )
    bw = read_bandwidth()
    results = {}
    for n, (_, _, nbytes) in engines.items():
        s = samples[n]
        results[n] = {
            "prefill_tok_s": statistics.median(s["prefill"]),
            "decode_tok_s": statistics.median(s["decode"]),
            "decode_samples": s["decode"],
            "prefill_samples": s["prefill"],
            "max_foreign_cores": max(s["foreign"]),
            "weight_bytes_per_token": nbytes,
            "decode_limit_tok_s": bw * 1e9 / nbytes,
        }
    del engines
    gc.collect()
    if not args.no_rss:
        for n in results:
            results[n]["peak_rss_mb"] = rss_of(n, args.threads)
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "kernels": variant(),
        "threads": args.threads,
        "rounds": args.rounds,
        "read_bandwidth_GBps": bw,
        "command": "python " + " ".join(sys.argv),
        "results": results,
    }
    base = results.get("transformers-fp32", {}).get("decode_tok_s")
    print(f"\n| engine | prefill {PREFILL} tok/s | decode tok/s | × transformers | limit tok/s | % of limit | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, r in results.items():
        ratio = f"{r['decode_tok_s'] / base:.2f}×" if base else "-"
        print(
            f"| {n} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {ratio} | {r['decode_limit_tok_s']:.0f} | "
            f"{100 * r['decode_tok_s'] / r['decode_limit_tok_s']:.0f} % | {r.get('peak_rss_mb', float('nan')):.0f} |"
        )
    print(
        f"\nread bandwidth {bw:.1f} GB/s; max foreign load in any sample {max(r['max_foreign_cores'] for r in results.values()):.2f} cores"
    )
    if args.out:
        from pippin.io import write_json_atomic

        write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
