"""`pippin export MODEL --to gguf|coreml --out PATH`: a pippin model (full precision or compressed) for another runtime.

GGUF: exact for full precision, nearest llama.cpp types for compressed tensors, with the fidelity lost measured on
held-out text (KL against pippin's own model) and printed; the report is written next to the file as
<stem>.export.json. Core ML: a stateful decoder mlprogram (KV cache as state; prefill and decode) with pippin's LUTs as
palettized weights, verified weight by weight against pippin; its report goes to <out>.export.json. See pippin.export.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pippin.errors import PippinError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="pippin or HF folder, .gguf file, or 'default' (compressed pippin models too)")
    p.add_argument("--to", required=True, choices=("gguf", "coreml"), help="target format")
    p.add_argument("--out", required=True, help="output file (.gguf) or folder (.mlpackage)")
    p.add_argument(
        "--type",
        action="append",
        default=[],
        metavar="BITS=TYPE",
        help="GGUF: write BITS-wide compressed tensors as TYPE instead of the nearest type (e.g. 3=Q8_0, 4=F32); repeatable",
    )
    p.add_argument("--fidelity-tokens", type=int, default=512, help="GGUF: held-out tokens for the KL report (0 = skip)")
    p.add_argument(
        "--context", type=int, default=None, help="Core ML: positions the KV cache state holds (default: 2048, or the model's if shorter)"
    )


def _types(specs: list[str]) -> dict[int, str]:
    out = {}
    for spec in specs:
        bits, sep, name = spec.partition("=")
        if not sep or not bits.strip().isdigit():
            raise PippinError(f"--type {spec!r}: write BITS=TYPE, e.g. 3=Q8_0.")
        out[int(bits)] = name.strip()
    return out


def run(args: argparse.Namespace) -> int:
    from pippin.api import load_any

    loaded = load_any(args.model, progress=True)
    if args.to == "gguf":
        from pippin.export.gguf import export_gguf, fidelity_tokens, report_path

        tokens = fidelity_tokens(loaded, args.fidelity_tokens) if args.fidelity_tokens > 0 else None
        report = export_gguf(loaded, args.out, types=_types(args.type), fidelity_tokens=tokens, progress=True)
        print(f"wrote {report.path}: {report.size_bytes / 1e6:.1f} MB, {report.bpw:.2f} bits per weight, tokenizer {report.tokenizer}")
        print("types: " + ", ".join(f"{k} x{v}" for k, v in sorted(report.types.items())))
        print("exact: every tensor equals pippin's bit for bit" if report.exact else "exact: no (compressed tensors re-quantized)")
        for note in report.notes:
            print(f"note: {note}")
        f = report.fidelity
        if f:
            print(
                f"fidelity on {f['n_tokens']} held-out tokens: KL(pippin || gguf) mean {f['kl_mean']:.4f}, "
                f"max {f['kl_max']:.3f}, top-1 agreement {100 * f['top1_agreement']:.1f} %"
            )
        print(f"report: {report_path(args.out)}")
        return 0
    from pippin.export.coreml import export_coreml
    from pippin.io import write_json_atomic

    report = export_coreml(loaded, args.out, context=args.context)
    out = Path(args.out)
    write_json_atomic(out.with_name(out.name + ".export.json"), report.to_dict())
    bad = [c["name"] for c in report.checks if not c["equal"]]
    print(
        f"wrote {report.path}: stateful decoder, KV cache of {report.context} positions, {report.palettized} palettized weights, "
        f"{report.dense} dense (fp16)"
    )
    if bad:
        print(f"MISMATCH: these weights differ from pippin's: {bad[:5]}")
    else:
        print("verified: every palettized weight is pippin's LUT and indices, every dense weight pippin's in fp16")
    return 0 if not bad else 1
