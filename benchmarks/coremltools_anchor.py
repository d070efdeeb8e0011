"""coremltools anchor: Apple's own post-training palettizer against pippin's, at equal bits and equal LUT groups.

Both palettize every linear layer of the default model (q, k, v, o, gate, up, down; the tied embedding is left as
is) with one LUT of 2^b fp16 entries per 16 output channels, so both store b + 2^b/K bits per linear weight (K the
input width): equal bpw by construction. pippin also stores the embedding in int8 (lossless here, see
docs/benchmarks.md); coremltools leaves it in float. coremltools 9's `PostTrainingPalettizer` (k-means per group, run in
PyTorch on Linux) is the data-free anchor; pippin's `compress_` weights its k-means by calibration activations and
then picks the indices with GPTQ-style error feedback (its default; the LUTs are the same k-means ones).
Perplexity is scored on the same held-out XSum windows as benchmarks/compression.py (same token ids).
  python benchmarks/coremltools_anchor.py --xsum ../shared/data/xsum/test.jsonl \\
      --calib ../shared/data/alpaca_eval/gpt4_1106_preview_model_outputs.json --bits 4,3,2 --out docs/benchmarks/coremltools.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from compression import heldout_ids, pippin_ppl  # noqa: E402 - the shared held-out text and scorer

from pippin.api import load_any, read_text_source  # noqa: E402
from pippin.quant.compress import CompressConfig, compress_  # noqa: E402

GROUP = 16


def coreml_palettize(model: nn.Module, bits: int) -> nn.Module:
    import coremltools as ct
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    config = PostTrainingPalettizerConfig.from_dict(
        {"module_type_configs": {nn.Linear: {"n_bits": bits, "granularity": "per_grouped_channel", "group_size": GROUP}}}
    )
    print(f"coremltools {ct.__version__}: {bits}-bit, group {GROUP}", file=sys.stderr)
    return PostTrainingPalettizer(model, config).compress()


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xsum", required=True)
    ap.add_argument("--calib", required=True, help="calibration text for pippin (file or self:N)")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_any(None)
    ids = heldout_ids(base.tokenizer, args.xsum, args.windows * args.ctx)
    windows = [ids[i : i + args.ctx] for i in range(0, len(ids), args.ctx)][: args.windows]
    calib = base.tokenizer.encode(read_text_source(args.calib, base.model, base.tokenizer))
    names = linear_names(base.model)
    k_total = sum(dict(base.model.named_modules())[n].weight.numel() for n in names)
    rows = {"full": {"ppl": pippin_ppl(base.model, windows)}}
    for bits in [int(b) for b in args.bits.split(",")]:
        lut_bits = sum(dict(base.model.named_modules())[n].weight.shape[0] // GROUP * 2**bits * 16 for n in names)
        linear_bpw = bits + lut_bits / k_total
        t = time.perf_counter()
        cm = coreml_palettize(load_any(None).model, bits)
        ppl = pippin_ppl(cm, windows)
        rows[f"coremltools {bits}-bit"] = {"bits": bits, "linear_bpw": linear_bpw, "ppl": ppl, "s": time.perf_counter() - t}
        t = time.perf_counter()
        pm = load_any(None).model
        compress_(pm, calib, CompressConfig(plan=dict.fromkeys(names, bits), group_size=GROUP), progress=True)
        ppl = pippin_ppl(pm, windows)
        rows[f"pippin {bits}-bit"] = {"bits": bits, "linear_bpw": linear_bpw, "ppl": ppl, "s": time.perf_counter() - t}
        print({k: v for k, v in rows.items() if str(bits) in k}, file=sys.stderr)
    full = rows["full"]["ppl"]
    print("\n| palettizer | bits (linears) | linear bpw | PPL | vs full |\n| --- | --- | --- | --- | --- |")
    for k, r in rows.items():
        if k != "full":
            print(f"| {k} | {r['bits']} | {r['linear_bpw']:.2f} | {r['ppl']:.2f} | {100 * (r['ppl'] / full - 1):+.1f} % |")
    if args.out:
        report = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "group_size": GROUP,
            "tokens_scored": sum(len(w) - 1 for w in windows),
            "rows": rows,
        }
        from pippin.io import write_json_atomic

        write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
