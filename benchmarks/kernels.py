"""Kernel benchmark: where a decode step's time goes, and what one integer-kernel row costs per bit width.

The runtime benchmark (benchmarks/runtime.py) compares whole engines; this one takes pippin's step apart, for the
figures in docs/benchmarks.md that explain it:
- rows: ns per 576-weight row of `lut_gemv_act8` for palettes of 2, 3, 4 and 6 bits (one 4096-row layer, one
  thread, caches warm: the instruction cost, not the memory stream), each width as the kernel runs it (3-bit
  layers widened to nibbles, 6-bit ones expanded to bytes);
- step: for a compressed model with act8, the median time of the blocks (`features`: embedding plus every layer),
  of the head (final norm plus output projection) and of a whole `decode_step`, at a batch of B rows;
- --loop S: decode for S seconds and exit, for a profiler (`perf record -g python benchmarks/kernels.py --loop 25`);
- --prefill-rows: ms for one act8 layer (576 -> 1536) at 16-512 rows, on the integer kernel (each variant this CPU runs)
  against dequantizing the weights for a GEMM (the reference path prefill took before);
- --prefill-profile: a 512-token prefill's wall time, and its time by operator (torch.profiler);
- --thread: ms per decode step on the main thread and on a second thread (the server's worker), same code;
- --r4: what down_proj's online input rotation (QuaRot's R4) costs: ns per `hadamard_rows` row at the model's ffn
  width (one thread), and the blocks and whole decode step of the model against a copy whose down_projs are
  re-palettized as W R at their widths (k-means, no calibration: the same kernel work plus the transform, and sane
  activations in both, since garbage ones can hit denormal slow paths), in alternating rounds.
It only calls public entry points (the FusedDecoder's `features` and `head`, `decode_step`), so a checkout of an older commit times the
same way. Usage:
  python benchmarks/kernels.py [--model PATH] [--batch 1,8] [--threads 2] [--rows] [--loop S] [--prefill-rows] [--prefill-profile]
  [--thread] [--r4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from pippin.api import load_any
from pippin.engine.generate import decode_step, prefill
from pippin.engine.kv_cache import KVCache
from pippin.kernels import ops
from pippin.kernels.decoder import FusedDecoder
from pippin.quant.compress import set_act8_
from pippin.quant.linear import PalettizedLinear
from pippin.quant.palettize import fit_palette
from pippin.quant.rotate import HadamardTransform, random_signs

MODEL = "~/.cache/pippin/models/smollm2-135m-instruct-3.5bpw-rot"


def median_ms(fn, n: int = 50) -> float:  # noqa: ANN001
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def rows(n: int = 4096, k: int = 576) -> None:
    torch.set_num_threads(1)
    w, x = torch.randn(n, k, generator=torch.Generator().manual_seed(0)), torch.randn(1, k)
    for bits in (2, 3, 4, 6):
        lin = PalettizedLinear.from_palette(fit_palette(w, bits=bits, group_size=16))
        lin.act8 = True
        packed, lut, scale, kernel_bits = lin.act8_kernel_args()
        ms = median_ms(lambda: ops().lut_gemv_act8(x, packed, lut, scale, kernel_bits, 16), 200)  # noqa: B023
        print(f"rows: {bits}-bit (kernel bits {kernel_bits}): {ms * 1e6 / n:.1f} ns per {k}-weight row")


def step(path: str, batch: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model = load_any(os.path.expanduser(path)).model
    set_act8_(model, True)
    dec = FusedDecoder.from_model(model)
    assert dec.fused, "pippin kernels unavailable"
    cache = KVCache(model.config, batch_size=batch, max_len=256)
    ids = torch.arange(100, 124).repeat(batch, 1)
    tok = prefill(dec, ids, torch.full((batch,), 24), cache).argmax(-1)
    with torch.inference_mode():
        positions = cache.lengths.unsqueeze(1)
        cache.begin(positions)  # every timed call below writes the same slot
        blocks = median_ms(lambda: dec.features(tok.unsqueeze(1), positions=positions, cache=cache))
        h = dec.features(tok.unsqueeze(1), positions=positions, cache=cache)
        head = median_ms(lambda: dec.head(h))

        def one_step() -> None:
            decode_step(dec, tok, cache)
            cache.lengths = cache.lengths - 1  # the same slot again

        whole = median_ms(one_step)
    print(f"step: {path} batch {batch}, {threads} threads: blocks {blocks:.2f} ms, head {head:.2f} ms, decode_step {whole:.2f} ms")


def loop(path: str, seconds: float, threads: int) -> None:
    torch.set_num_threads(threads)
    model = load_any(os.path.expanduser(path)).model
    set_act8_(model, True)
    dec = FusedDecoder.from_model(model)
    cache = KVCache(model.config, batch_size=1, max_len=256)
    end = time.time() + seconds
    while time.time() < end:
        tok = prefill(dec, torch.arange(100, 115).unsqueeze(0), torch.tensor([15]), cache).argmax(-1)
        for _ in range(128):
            tok = decode_step(dec, tok, cache).argmax(-1)


def prefill_rows(model: str, threads: int) -> None:
    torch.set_num_threads(threads)
    lin = load_any(os.path.expanduser(model)).model.layers[0].mlp.gate_proj
    set_act8_(lin, True)
    w, lut_i8, scale, bits = lin.act8_kernel_args()
    k = ops()
    variants = ["avx2-fma"] + (["avx512-vnni"] if k.cpu_has_vnni() else [])
    best = k.kernel_variant()
    for m in (16, 42, 128, 512):
        x = torch.randn(m, lin.in_features)
        ms = {}
        for v in variants:  # each kernel variant this CPU runs
            k.set_kernel_variant(v)
            ms[f"kernel {v}"] = 1e3 * statistics.median(_times(lambda: k.lut_gemv_act8(x, w, lut_i8, scale, bits, lin.group_size), 10))  # noqa: B023
        k.set_kernel_variant(best)
        ms["dequantize+GEMM"] = 1e3 * statistics.median(_times(lambda: lin._act8_reference(x), 10))  # noqa: B023
        print(f"act8 576->1536, {m} rows: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))


def prefill_profile(model: str, threads: int, n_tokens: int = 512) -> None:
    """Where a prefill of n_tokens goes, by operator (torch.profiler; the kernels' ops appear under their own names)."""
    torch.set_num_threads(threads)
    m = load_any(os.path.expanduser(model)).model
    set_act8_(m, True)
    dec = FusedDecoder.from_model(m)
    cache = KVCache(m.config, batch_size=1, max_len=1024)
    ids = torch.randint(0, m.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    run = lambda: prefill(dec, ids, torch.tensor([n_tokens]), cache)  # noqa: E731
    wall = statistics.median(_times(run, 5))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            run()
    print(f"prefill {n_tokens} tokens: {wall * 1e3:.1f} ms ({n_tokens / wall:.0f} tok/s), profile of 3 runs:")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40))


def thread(model: str, threads: int) -> None:
    import threading

    torch.set_num_threads(threads)
    m = load_any(os.path.expanduser(model)).model
    set_act8_(m, True)
    dec = FusedDecoder.from_model(m)

    def run(where: str) -> None:
        cache = KVCache(m.config, batch_size=1, max_len=512)
        prefill(dec, torch.tensor([[1, 2, 3, 4]]), torch.tensor([4]), cache)
        tok = torch.tensor([5])
        t = time.perf_counter()
        for _ in range(200):
            decode_step(dec, tok, cache)
        print(f"decode step on the {where}: {(time.perf_counter() - t) / 200 * 1e3:.3f} ms")

    for _ in range(2):
        run("main thread")
        th = threading.Thread(target=run, args=("second thread",))
        th.start()
        th.join()


def r4(path: str, batch: int, threads: int, rounds: int = 7) -> None:
    # Three copies: "a" and "b" as stored (their difference is this machine's noise between two copies of a model,
    # memory layout included), "r4" with its down_projs re-palettized as W R.
    models = {name: load_any(os.path.expanduser(path)).model for name in ("a", "r4", "b")}
    width = models["a"].config.ffn_dim
    t, x = HadamardTransform(random_signs(width, 0)), torch.randn(1, width)
    torch.set_num_threads(1)
    ns = median_ms(lambda: ops().hadamard_rows(x, t.sign_bits, t.block), 2000) * 1e6
    print(f"r4: hadamard_rows, 1 x {width}: {ns:.0f} ns per row (one thread, the op's call included)")
    torch.set_num_threads(threads)
    for i, block in enumerate(models["r4"].layers):
        down, signs = block.mlp.down_proj, random_signs(width, i)
        w = HadamardTransform(signs)(down.dequantize().double()).float()  # W R
        block.mlp.down_proj = PalettizedLinear.from_palette(fit_palette(w, bits=down.bits, group_size=down.group_size), in_signs=signs)
    for name in ("a", "b"):  # their down_projs in fresh memory too, as the new ones are (not pages of the loaded file)
        for block in models[name].layers:
            down = block.mlp.down_proj
            down.packed, down.lut = down.packed.clone(), down.lut.clone()
    decoders = {}
    for name, m in models.items():
        set_act8_(m, True)
        decoders[name] = FusedDecoder.from_model(m)
    cache = KVCache(models["a"].config, batch_size=batch, max_len=256)
    prefill(decoders["a"], torch.arange(100, 124).repeat(batch, 1), torch.full((batch,), 24), cache)
    tok = torch.full((batch,), 200)
    times: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        positions = cache.lengths.unsqueeze(1)
        cache.begin(positions)  # every timed call writes the same slot
        for _ in range(rounds):
            for name, dec in decoders.items():
                blocks = median_ms(lambda: dec.features(tok.unsqueeze(1), positions=positions, cache=cache))  # noqa: B023

                def one_step() -> None:
                    decode_step(dec, tok, cache)  # noqa: B023
                    cache.lengths = cache.lengths - 1  # the same slot again

                times.setdefault((name, "blocks"), []).append(blocks)
                times.setdefault((name, "step"), []).append(median_ms(one_step))
    med = {k: statistics.median(v) for k, v in times.items()}
    for part in ("blocks", "step"):
        a, r, b = med["a", part], med["r4", part], med["b", part]
        change = (r / ((a + b) / 2) - 1) * 100
        print(
            f"r4: batch {batch}, {threads} threads, {part}: {a:.3f} / {b:.3f} ms without (two copies), {r:.3f} ms with R4 ({change:+.1f} %)"
        )


def _times(fn, n: int) -> list[float]:  # noqa: ANN001
    fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", action="store_true", help="also the per-row kernel cost by bit width")
    ap.add_argument("--loop", type=float, default=0, help="only decode for this many seconds (for a profiler)")
    ap.add_argument("--prefill-rows", action="store_true", help="only the act8 layer at prefill row counts")
    ap.add_argument("--thread", action="store_true", help="only a decode step on the main thread against a second one")
    ap.add_argument("--prefill-profile", action="store_true", help="only a 512-token prefill's time by operator")
    ap.add_argument("--r4", action="store_true", help="only the cost of down_proj's online input rotation (R4)")
    args = ap.parse_args()
    if args.r4:
        for b in (int(x) for x in args.batch.split(",")):
            r4(args.model, b, args.threads)
        return
    if args.prefill_profile:
        prefill_profile(args.model, args.threads)
        return
    if args.prefill_rows or args.thread:
        if args.prefill_rows:
            prefill_rows(args.model, args.threads)
        if args.thread:
            thread(args.model, args.threads)
        return
    if args.loop:
        loop(args.model, args.loop, args.threads)
        return
    for b in (int(x) for x in args.batch.split(",")):
        step(args.model, b, args.threads)
    if args.rows:
        rows()


if __name__ == "__main__":
    main()
