"""`pippin compress MODEL --bpw 3.5 --calib FILE`: palettize to a bit budget and save the compressed model.

Indices are chosen with GPTQ-style error feedback on the calibration inputs unless `--no-error-feedback`;
`--rotate` folds Hadamard rotations into the weights first (and rotates down_proj's input online, unless
`--no-rotate-down`), `--sequential` fits each block on the inputs of the
model as already quantized, and `--tune-steps N` then trains the LUTs and row scales end to end against the
uncompressed model (pippin.train.lut_tuning).
Prints the per-layer bits and the measured bpw (every stored byte counted), writes the plan as JSON
next to the checkpoint, and the allocator's per-layer estimates as sensitivity.json (`pippin talaria` reads them);
`--plan plan.json` applies an edited plan instead of allocating.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model to compress (default: the default model)")
    p.add_argument("--bpw", type=float, default=3.5, help="target average bits per weight, all weights counted")
    p.add_argument(
        "--calib",
        required=True,
        action="append",
        help="calibration text: .txt, .json/.jsonl rows with text fields, 'self[:N]' (the model's own text) or 'docstrings[:N]' "
        "(N standard-library modules' docstrings); repeat it to mix sources, window by window",
    )
    p.add_argument("--plan", default=None, help="JSON {layer: bits} to apply instead of allocating")
    p.add_argument("--bits", default="2,3,4", help="candidate bit widths for the allocator")
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument(
        "--no-row-scale",
        dest="row_scale",
        action="store_false",
        help="no fp16 scale per output row of each palettized linear (the LUTs then hold the rows as they are)",
    )
    p.add_argument("--act8", action="store_true", help="dynamic 8-bit activations on palettized linears (fast 4-bit integer kernel)")
    p.add_argument("--kv8", action="store_true", help="run the compressed model with an 8-bit KV cache (recorded in config.json)")
    p.add_argument("--embed-bits", type=int, default=8, choices=[4, 6, 8], help="tied embedding/head: 8 = int8 rows (AFM), 4/6 = LUT")
    p.add_argument("--calib-seqs", type=int, default=8, help="calibration sequences of 256 tokens for the Fisher (bit allocation)")
    p.add_argument("--hessian-seqs", type=int, default=32, help="calibration sequences of 256 tokens for the input second moments")
    p.add_argument(
        "--no-error-feedback",
        dest="error_feedback",
        action="store_false",
        help="round each weight to its nearest LUT entry instead of GPTQ-style error feedback",
    )
    p.add_argument("--rotate", action="store_true", help="fold randomized Hadamard rotations into the weights first (QuaRot)")
    p.add_argument("--rotate-seed", type=int, default=0, help="seed of the rotations' random signs")
    p.add_argument(
        "--no-rotate-down",
        dest="rotate_down",
        action="store_false",
        help="with --rotate, leave down_proj's input unrotated (no online Hadamard transform per token: QuaRot's R4)",
    )
    p.add_argument(
        "--sequential", action="store_true", help="quantize block by block on the inputs of the model as already quantized (GPTQ)"
    )
    p.add_argument(
        "--tune-steps",
        type=int,
        default=0,
        help="then train the LUTs and row scales end to end, distilling full precision on calibration windows (0: off; "
        "pippin.train.lut_tuning)",
    )
    p.add_argument("--tune-lr", type=float, default=1e-3, help="LUT tuning's peak Adam step, relative to each tensor's RMS")
    p.add_argument("--out", default=None, help="output folder (default: $PIPPIN_HOME/models/<name>-<bpw>bpw)")
    p.add_argument(
        "--no-fidelity",
        dest="fidelity",
        action="store_false",
        help="skip the fidelity measure against the uncompressed model that runs when compression finishes",
    )
    p.add_argument("--data", default=None, help="evaluation data for the fidelity measure (default: $PIPPIN_EVAL_DATA or ../shared/data)")


def run(args: argparse.Namespace) -> int:
    from pippin.api import load_any, read_text_source
    from pippin.io import remove, write_json_atomic
    from pippin.model.checkpoint import pippin_home, save_pippin
    from pippin.quant.calibrate import mixed_windows
    from pippin.quant.compress import SENSITIVITY_FILE, CompressConfig, compress_, load_plan, quantization_meta, sensitivity_record

    loaded = load_any(args.model, progress=True)
    sources = [loaded.tokenizer.encode(read_text_source(c, loaded.model, loaded.tokenizer)) for c in args.calib]
    cfg = CompressConfig(
        bpw=args.bpw,
        candidate_bits=tuple(int(b) for b in args.bits.split(",")),
        embed_bits=args.embed_bits,
        row_scale=args.row_scale,
        group_size=args.group_size,
        plan=load_plan(args.plan) if args.plan else None,
        n_seqs=args.calib_seqs,
        hessian_seqs=args.hessian_seqs,
        error_feedback=args.error_feedback,
        rotate=args.rotate,
        rotate_seed=args.rotate_seed,
        rotate_down=args.rotate_down,
        sequential=args.sequential,
        act8=args.act8,
        kv8=args.kv8,
    )
    tokens = sources[0] if len(sources) == 1 else mixed_windows(sources, seq_len=cfg.seq_len)
    name = loaded.meta.get("name", Path(str(loaded.path)).name)
    out = Path(args.out) if args.out else pippin_home() / "models" / f"{name}-{args.bpw:g}bpw"
    report = compress_(loaded.model, tokens, cfg, progress=True)
    # Relative errors: of the weights, and (with error feedback) of the layer's outputs on the calibration inputs.
    print(f"{'layer':<40} {'bits':>4} {'weight err':>10} {'output err':>10}")
    for row in report.layers:
        out_err = f"{row['rel_output_error']:>10.4f}" if "rel_output_error" in row else f"{'-':>10}"
        print(f"{row['name']:<40} {row['bits']:>4} {row['rel_error']:>10.4f} {out_err}")
    hist = Counter(report.plan.values())
    print("bits: " + ", ".join(f"{b}-bit x{n}" for b, n in sorted(hist.items())))
    print(f"measured bpw: {report.bpw:.3f} over all weights (linears alone: {report.linear_bpw:.3f})")
    quant = {**quantization_meta(report, cfg), "calibration": args.calib}
    if args.tune_steps:
        quant["lut_tuning"] = _tune(loaded.model, args, tokens, cfg.seq_len, out)
    shutil.rmtree(out / "fidelity", ignore_errors=True)  # a report on the model this one replaces
    if any((out / "adapters").glob("*/adapter_model.safetensors")):
        print(f"warning: the adapters in {out / 'adapters'} were trained on the model this one replaces; retrain them", file=sys.stderr)
    save_pippin(loaded, out, extra_meta={"quantization": quant, "name": f"{name}-{args.bpw:g}bpw"})
    write_json_atomic(out / "plan.json", {"plan": report.plan, "bpw": report.bpw})
    if report.costs:  # the allocator's per-layer estimates, for `pippin talaria`; a given plan has none
        write_json_atomic(out / SENSITIVITY_FILE, sensitivity_record(report, cfg))
    else:
        remove(out / SENSITIVITY_FILE)  # estimates for the model this one replaces
    shutil.rmtree(out / TUNE_CHECKPOINT, ignore_errors=True)  # the tuned model is saved: nothing left to resume
    print(f"wrote {out}")
    if args.fidelity:
        report_fidelity(out, args.model, args.data)
    return 0


TUNE_CHECKPOINT = "lut-tuning-checkpoint"


def _tune(model, args: argparse.Namespace, tokens: list[int], seq_len: int, out: Path) -> dict:  # noqa: ANN001 - the compressed model
    """Tune the compressed model's LUTs against the model it came from on the calibration windows (resumable under
    OUT); the record config.json keeps."""
    from pippin.api import load_any
    from pippin.quant.calibrate import calibration_batches
    from pippin.train.lut_tuning import LutTuneConfig, tune_luts, write_log

    tcfg = LutTuneConfig(steps=args.tune_steps, lr=args.tune_lr)
    windows = calibration_batches(tokens, seq_len=seq_len + 1, n_seqs=len(tokens))  # every window: inputs and targets
    n = len(windows)
    teacher = load_any(args.model).model
    res = tune_luts(model, teacher, windows, tcfg, checkpoint=out / TUNE_CHECKPOINT)
    write_log(out / "lut_tuning.jsonl", res)
    last = res.losses[-10:]
    kl = f"KL on the last {len(last)} batches {sum(last) / len(last):.4f} (first {res.losses[0]:.4f})"
    print(f"LUT tuning: {res.n_params} values, {res.steps} steps in {res.seconds:.0f} s; {kl}")
    return {"steps": tcfg.steps, "lr": tcfg.lr, "batch_size": tcfg.batch_size, "seq_len": seq_len, "windows": n, "seed": tcfg.seed}


def report_fidelity(out: Path, source: str | None, data: str | None) -> None:
    """Measure the new model against the one it was compressed from; the report goes to OUT/fidelity/."""
    from pippin.commands.eval import default_data_dir
    from pippin.eval.fidelity import summary
    from pippin.eval.report import table
    from pippin.eval.tasks.fidelity import measure

    data_dir = Path(data) if data else default_data_dir()
    if not data_dir.is_dir():
        print(f"fidelity: not measured, no evaluation data at {data_dir} (pass --data DIR, or run `pippin eval fidelity` later)")
        return
    print(table(measure(str(out), reference=f"pippin:{source or 'default'}", data_dir=data_dir, out_dir=out / "fidelity")))
    print(f"fidelity ({out / 'fidelity' / 'report.md'}): {summary(out)}")  # the line `pippin serve` prints too
