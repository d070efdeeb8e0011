"""Talaria's latency model against the engine on this machine: predicted and measured decode and prefill for 6 plans.

For SmolLM2-135M shapes (the default model), every plan is built with random indices and LUTs through pippin's own
compressed modules (pippin.talaria.profile.build_model: latency depends on shapes and widths only) and measured on the
engine's code: the decode step at context L (fused kernels) and the prefill of N tokens, medians and IQRs of repeats,
and each op alone (pippin.talaria.profile). Two fit plans (random 2/3/4-bit widths per linear, one with a LUT embedding
and one with an int8 one) calibrate the roofline (pippin.talaria.fit); the 6 scored plans are predicted by the plain
roofline on the measured `this-machine` profile (before) and by the fitted one (after), never fitted on. Then auto
solves for a decode-latency target on the fitted profile; its plan is built and measured, and set against the
allocator's plans (auto for sizes between uniform 2 and 4 bits, and uniform 2/3/4), measured the same way, on quality
(Talaria's calibrated prior ΔKL: no sensitivities are stored for this model) against measured decode latency.
The engine's steps are timed in interleaved rounds (every plan once a round, shuffled), medians over all rounds.
  python benchmarks/talaria_latency.py [--threads 2] [--context 512] [--prefill 512] [--out docs/benchmarks/talaria-latency.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime

import torch

from pippin.commands.talaria import engine_steps
from pippin.io import write_json_atomic
from pippin.kernels import cpu_name, variant
from pippin.model.checkpoint import pippin_home
from pippin.talaria.devices import this_machine_profile
from pippin.talaria.fit import errors, fit_latency
from pippin.talaria.ops import ops_table
from pippin.talaria.plan import Plan, is_linear, plan_from_config
from pippin.talaria.profile import Profile, Timing, build_model, profile_ops, time_steps
from pippin.talaria.quality import sensitivity_for
from pippin.talaria.roofline import estimate
from pippin.talaria.source import open_model
from pippin.talaria.whatif import Target, TargetKind, auto, write_plan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runtime import busy_jiffies, own_jiffies  # noqa: E402 - the sibling benchmark's load meter

FITTED_PROFILE = pippin_home() / "talaria" / "this-machine-fit.json"
"""Where the fitted profile goes: `pippin talaria --device-profile` takes the file."""
ALLOCATED = pippin_home() / "models" / "smollm2-135m-instruct-3.5bpw"
"""The shipped 3.5 bpw model: its config.json holds the bpw allocator's plan (Fisher-scaled output error)."""


def plans(cfg, base: Plan) -> tuple[dict[str, Plan], dict[str, Plan]]:  # noqa: ANN001 - a ModelConfig
    """(fit plans, scored plans): all act8, LUTs per 16 rows, a 4-bit LUT embedding with row scales unless named."""
    linears = [n for n in base.bits if is_linear(n)]
    tied = cfg.tie_embeddings

    def widths(rule) -> dict[str, int]:  # noqa: ANN001 - name -> bits
        return {n: rule(n) for n in linears}

    rng_a, rng_b = random.Random(1), random.Random(2)
    fit = {
        "fit: random 2/3/4": base.with_bits(widths(lambda n: rng_a.choice((2, 3, 4))), tied=tied),
        "fit: random 2/3/4, int8 embedding": base.with_bits(widths(lambda n: rng_b.choice((2, 3, 4))) | {"embed_tokens": 8}, tied=tied),
    }
    stored = json.loads((ALLOCATED / "config.json").read_text())["quantization"]["plan"]
    mixed = {"q_proj": 4, "k_proj": 4, "v_proj": 4, "o_proj": 4, "gate_proj": 3, "up_proj": 3, "down_proj": 2}
    scored = {
        "uniform 4-bit": base.with_bits(widths(lambda n: 4), tied=tied),
        "uniform 3-bit": base.with_bits(widths(lambda n: 3), tied=tied),
        "allocator 3.5 bpw (shipped plan)": base.with_bits(stored, tied=tied),
        "mixed 2/3/4: attention 4, gate/up 3, down 2": base.with_bits(widths(lambda n: mixed[n.rsplit(".", 1)[-1]]), tied=tied),
        "down_proj at 2 bits, rest 4": base.with_bits(widths(lambda n: 2 if n.endswith("down_proj") else 4), tied=tied),
        "uniform 4-bit, int8 embedding": base.with_bits(widths(lambda n: 4) | {"embed_tokens": 8}, tied=tied),
    }
    return fit, scored


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--op-repeats", type=int, default=15, help="repeats of each op's decode timing (prefill: a third)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the engine's steps over every plan")
    p.add_argument("--step-repeats", type=int, default=6, help="decode steps per plan and round (one prefill)")
    p.add_argument("--target-decode-ms", type=float, default=None, help="auto's target (default: between uniform 2 and 4 bits)")
    p.add_argument("--measure", action="store_true", help="measure the this-machine profile again first")
    p.add_argument("--out", default="docs/benchmarks/talaria-latency.json")
    p.add_argument("--plan-out", default="docs/benchmarks/talaria-auto-plan.json", help="where auto's plan is written")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    device = this_machine_profile(refresh=args.measure, threads=args.threads)
    src = open_model(None)
    cfg = src.config
    base = plan_from_config(cfg, embed_bits=4, act8=True)
    fit_plans, scored = plans(cfg, base)
    steps = engine_steps()
    L, N = args.context, args.prefill
    b0, o0 = busy_jiffies(), own_jiffies()

    # Auto for a decode-latency target on the profile fitted below needs the fit first; the allocator's references
    # do not: auto for sizes between uniform 2 and 4 bits (the bpw knapsack with Talaria's quality predictor).
    sens = sensitivity_for(cfg, base, folder=None)
    linears = [n for n in base.bits if is_linear(n)]
    uniform = {b: base.with_bits(dict.fromkeys(linears, b), tied=cfg.tie_embeddings) for b in (2, 3, 4)}
    kw = {"sensitivity": sens, "context": L, "prefill": N}
    refs = {f"every linear at {b} bits": uniform[b] for b in (2, 3, 4)}
    lo, hi = (sum(r.stored_bytes for r in ops_table(cfg, uniform[b], context=L, prefill=N)) for b in (2, 4))
    for frac in (0.25, 0.5, 0.75):
        size = float(f"{(lo + frac * (hi - lo)) / 1e6:.4g}")
        refs[f"allocator: size ≤ {size:g} MB"] = auto(
            cfg, base, device, Target(kind=TargetKind.SIZE_MB, value=size), bits=(2, 3, 4), **kw
        ).plan

    # Each op alone (the per-op columns, and what the fit reads), one plan after another.
    rows, profs = {}, {}
    for name, plan in {**fit_plans, **scored}.items():
        rows[name] = ops_table(cfg, plan, context=L, prefill=N)
        reps = {"decode_repeats": args.op_repeats, "prefill_repeats": max(2, args.op_repeats // 3)}
        profs[name] = profile_ops(build_model(cfg, plan), rows[name], steps=steps, context=L, prefill=N, **reps)
        print(f"profiled {name}", file=sys.stderr, flush=True)

    # The engine's steps, every plan in each round in a shuffled order: a burst of other work hits all plans alike.
    def rounds(plans_: dict[str, Plan], decode_only: set[str]) -> dict[str, dict[str, Timing]]:
        models = {n: build_model(cfg, plan) for n, plan in plans_.items()}
        samples: dict[str, dict[str, list[float]]] = {n: {"decode": [], "prefill": []} for n in plans_}
        order = list(plans_)
        for r in range(args.rounds):
            random.Random(r).shuffle(order)
            rb, ro, rt = busy_jiffies(), own_jiffies(), time.perf_counter()
            for n in order:
                reps = {"decode_repeats": args.step_repeats, "prefill_repeats": 1, "skip_prefill": n in decode_only}
                st = time_steps(models[n], steps=steps, context=L, prefill=N, **reps)
                samples[n]["decode"] += st.decode_samples
                samples[n]["prefill"] += st.prefill_samples
            busy = ((busy_jiffies() - rb) - (own_jiffies() - ro)) / os.sysconf("SC_CLK_TCK") / (time.perf_counter() - rt)
            foreign_rounds.append(busy)
            print(f"round {r + 1}/{args.rounds}: other processes {busy:.2f} cores", file=sys.stderr, flush=True)
        return {n: {ph: Timing.of(v) for ph, v in s.items() if v} for n, s in samples.items()}

    foreign_rounds: list[float] = []
    step = rounds({**fit_plans, **scored}, set())
    # Fit on the fit plans' ops and their interleaved step times; then auto for a decode target between the fitted
    # predictions of uniform 2, 3 and 4 bits, measured beside the allocator's plans in rounds of their own.
    fitted = fit_latency(device, [(rows[n], _with_steps(profs[n], step[n])) for n in fit_plans], note=f"fitted on {', '.join(fit_plans)}")
    t_u = [estimate(ops_table(cfg, uniform[b], context=L, prefill=N), fitted, context=L, prefill=N).decode_s for b in (2, 3, 4)]
    target_ms = args.target_decode_ms or float(f"{(min(t_u) + max(t_u)) / 2 * 1e3:.3g}")
    target = Target(kind=TargetKind.DECODE_MS, value=target_ms)
    auto_name = "auto: " + target.describe()
    chosen_whatif = auto(cfg, base, fitted, target, bits=(2, 3, 4), **kw)
    chosen = chosen_whatif.plan
    # The fitted profile (for `pippin talaria --device-profile FILE`) and auto's plan (for `pippin compress --plan`).
    write_json_atomic(FITTED_PROFILE, fitted.to_dict())
    write_plan(args.plan_out, chosen_whatif, profile=fitted, model=src.name, target=target)
    step |= rounds({auto_name: chosen, **refs}, {auto_name, *refs})
    results, pred = {}, {"plain": {"decode": [], "prefill": []}, "fitted": {"decode": [], "prefill": []}}
    meas = {"decode": [], "prefill": []}
    op_sums = {"decode": [], "prefill": []}
    for name in scored:
        plain, fit = estimate(rows[name], device, context=L, prefill=N), estimate(rows[name], fitted, context=L, prefill=N)
        prof = _with_steps(profs[name], step[name])
        for phase in ("decode", "prefill"):
            meas[phase].append(step[name][phase].median_s)
            op_sums[phase].append(prof.op_sum(phase))
            pred["plain"][phase].append(getattr(plain, f"{phase}_s"))
            pred["fitted"][phase].append(getattr(fit, f"{phase}_s"))
        results[name] = {
            "plan": scored[name].describe(),
            "bpw": plain.bpw,
            "size_mb": plain.size_bytes / 1e6,
            "measured": prof.summary(),
            "predicted_plain": {"decode_s": plain.decode_s, "prefill_s": plain.prefill_s},
            "predicted_fitted": {"decode_s": fit.decode_s, "prefill_s": fit.prefill_s},
            "ops": {r.name: {"decode_s": prof.decode[r.name].median_s, "prefill_s": prof.prefill[r.name].median_s} for r in rows[name]},
        }
    scores = {m: {ph: asdict(errors(pred[m][ph], meas[ph])) for ph in ("decode", "prefill")} for m in ("plain", "fitted")}
    scores["op_sum"] = {ph: asdict(errors(op_sums[ph], meas[ph])) for ph in ("decode", "prefill")}

    points = {}
    for name, plan in {auto_name: chosen, **refs}.items():
        e = estimate(ops_table(cfg, plan, context=L, prefill=N), fitted, context=L, prefill=N)
        points[name] = {
            "measured_decode_s": step[name]["decode"].median_s,
            "measured_decode_iqr_s": step[name]["decode"].iqr_s,
            "repeats": step[name]["decode"].repeats,
            "predicted_decode_s": e.decode_s,
            "predicted_kl": sens.predict(plan),
            "bpw": e.bpw,
            "plan": plan.describe(),
            "compress_plan": plan.compress_plan() if name == auto_name else None,
        }
    a = points[auto_name]
    dominated_by = [
        n
        for n, q in points.items()
        if n != auto_name
        and q["measured_decode_s"] <= a["measured_decode_s"]
        and q["predicted_kl"] <= a["predicted_kl"]
        and (q["measured_decode_s"], q["predicted_kl"]) != (a["measured_decode_s"], a["predicted_kl"])
    ]
    elapsed = time.perf_counter() - t_start
    foreign = max(0.0, ((busy_jiffies() - b0) - (own_jiffies() - o0)) / os.sysconf("SC_CLK_TCK") / elapsed)
    out = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "kernel_variant": variant(),
        "threads": args.threads,
        "torch": torch.__version__,
        "command": "python benchmarks/talaria_latency.py " + " ".join(sys.argv[1:]),
        "model": src.name,
        "context": L,
        "prefill_tokens": N,
        "other_processes_cores": foreign,
        "other_processes_cores_by_round": foreign_rounds,
        "device_profile": device.to_dict(),
        "fitted_profile": fitted.calibration,
        "fitted_profile_file": str(FITTED_PROFILE),
        "auto_plan_file": args.plan_out,
        "fit_plans": {n: {"plan": fit_plans[n].describe(), "measured": _with_steps(profs[n], step[n]).summary()} for n in fit_plans},
        "plans": results,
        "errors": scores,
        "auto": {
            "target_decode_ms": target_ms,
            "meets_target": a["measured_decode_s"] * 1e3 <= target_ms,
            "dominated_by": dominated_by,
            "quality": "predicted ΔKL: Talaria's prior (fitted on 5 measured SmolLM2-135M plans), not a measurement",
            "points": points,
        },
        "seconds": elapsed,
    }
    write_json_atomic(args.out, out)
    _report(out)
    return 0


def _with_steps(prof: Profile, step: dict[str, Timing] | None) -> Profile:
    """The profile with the engine's step times of the interleaved rounds in place of its own single run."""
    if step is None:
        return prof
    return dataclasses.replace(prof, decode_step=step["decode"], prefill_step=step["prefill"])


def _report(out: dict) -> None:
    print(f"{out['cpu']}, {out['threads']} threads, context {out['context']}, prefill {out['prefill_tokens']}; {out['date']}")
    print(f"{'plan':<46} {'bpw':>5} {'decode ms: meas':>15} {'plain':>7} {'fitted':>7} {'prefill ms: meas':>16} {'plain':>7} {'fitted':>7}")
    for name, r in out["plans"].items():
        m, a, b = r["measured"], r["predicted_plain"], r["predicted_fitted"]
        print(
            f"{name:<46} {r['bpw']:>5.2f} {m['decode_step_s'] * 1e3:>15.3f} {a['decode_s'] * 1e3:>7.3f} {b['decode_s'] * 1e3:>7.3f} "
            f"{m['prefill_step_s'] * 1e3:>16.1f} {a['prefill_s'] * 1e3:>7.1f} {b['prefill_s'] * 1e3:>7.1f}"
        )
    for model, e in out["errors"].items():
        print(
            f"MAE {model:<7} decode {e['decode']['mae']:.1%} (max {e['decode']['max_abs']:.1%}), "
            f"prefill {e['prefill']['mae']:.1%} (max {e['prefill']['max_abs']:.1%})"
        )
    a = out["auto"]
    print(f"auto for decode ≤ {a['target_decode_ms']} ms: meets it {a['meets_target']}, dominated by {a['dominated_by'] or 'none'}")
    for name, q in a["points"].items():
        print(
            f"  {name:<40} measured {q['measured_decode_s'] * 1e3:.3f} ms, predicted {q['predicted_decode_s'] * 1e3:.3f} ms, "
            f"ΔKL {q['predicted_kl']:.3f}, {q['bpw']:.2f} bpw"
        )
    print(f"other processes kept {out['other_processes_cores']:.2f} cores busy on average; {out['seconds']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
