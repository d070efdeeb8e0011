"""`pippin talaria --model M`: each op's cost (size, FLOPs, bytes, estimated latency and energy on a device, predicted
ΔKL) and the totals; what-if rules, an auto plan for a latency, size or energy target, and the plan written for
`pippin compress --plan`. `--serve` serves the same model and plan as an interactive web view instead (sortable table,
block graph, Pareto plot of the plans tried; pippin.talaria.web).

Estimates come from a roofline model of a device profile (pippin/talaria/devices/*.json; `this-machine` is measured
once and cached) and a quality predictor (stored allocator estimates, else a prior; `--calibrate` fits it to models
whose KL `pippin eval fidelity` measured). Nothing loads weights; `--profile` times every op on this machine's kernels
and the engine's decode step and prefill, on a model of the plan's shapes with random values (pippin.talaria.profile).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter

SORTS = {
    "order": None,
    "params": lambda r: r["params"],
    "bits": lambda r: r["bits"] or 0,
    "stored": lambda r: r["stored_bytes"],
    "flops": lambda r: r["decode_flops"],
    "bytes": lambda r: r["decode_bytes"],
    "decode": lambda r: r["decode_s"],
    "prefill": lambda r: r["prefill_s"],
    "energy": lambda r: r["decode_j"],
    "kl": lambda r: r["kl"],
}
GROUPS = ("op", "type", "kind", "layer")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pippin.talaria.devices import THIS_MACHINE, list_profiles

    p.add_argument("--model", default=None, help="preset (tiny, smollm2-135m, afm-on-device) or model folder (default: the default model)")
    p.add_argument(
        "--plan", default=None, help="compress plan JSON {layer: bits} for the linears (the embedding, act8 and KV stay as the model's)"
    )
    p.add_argument(
        "--device-profile",
        default=THIS_MACHINE,
        help=f"device profile: {', '.join(list_profiles())} (this-machine is measured once, a few seconds), or a JSON file",
    )
    p.add_argument("--measure", action="store_true", help="measure this machine again (refresh the cached this-machine profile)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads this machine is measured (and cached) with")
    p.add_argument("--context", type=int, default=512, help="tokens attended to by a decode step")
    p.add_argument("--prefill", type=int, default=512, help="tokens of a prefill chunk")
    p.add_argument("--kv-bits", type=int, choices=[8, 16, 32], default=None, help="KV-cache width (default: as the model runs, 32 or 8)")
    p.add_argument("--act8", action=argparse.BooleanOptionalAction, default=None, help="8-bit activations (default: as the model)")
    p.add_argument("--rule", action="append", default=[], metavar="PATTERN=BITS", help="store matching ops at BITS, e.g. '*.down_proj=3'")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-decode-ms", type=float, default=None, help="auto: decode latency per token at most this")
    target.add_argument("--target-size-mb", type=float, default=None, help="auto: stored size at most this (MB)")
    target.add_argument("--target-energy-mj", type=float, default=None, help="auto: energy per decoded token at most this")
    p.add_argument("--bits", default="2,3,4", help="auto: widths a linear may take")
    p.add_argument(
        "--calibrate",
        nargs="+",
        default=None,
        metavar="DIR",
        help="compressed model folders with a fidelity report: fit the quality predictor",
    )
    p.add_argument("--write-plan", default=None, metavar="OUT", help="write the plan (with its predictions) for `pippin compress --plan`")
    p.add_argument("--sort", choices=list(SORTS), default="order", help="sort the table by this column (largest first)")
    p.add_argument("--group", choices=GROUPS, default="op", help="one row per op, per op type (q_proj, attention...), kind or layer")
    p.add_argument("--limit", type=int, default=None, help="show at most this many rows")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--profile",
        action="store_true",
        help="measure every op on this machine's kernels (decode and prefill, median and IQR) and the engine's steps",
    )
    p.add_argument("--repeats", type=int, default=20, help="--profile: decode repeats (prefill takes a quarter, at least 2)")
    web = p.add_argument_group("web view")
    web.add_argument("--serve", action="store_true", help="serve the interactive view (table, block graph, Pareto plot, what-if)")
    web.add_argument("--host", default="127.0.0.1", help="address the view listens on (default: this machine only)")
    web.add_argument("--port", type=int, default=8765, help="port of the view (0: any free port)")
    web.add_argument("--plans-dir", default=None, help="folder the view writes plans into (default: $PIPPIN_HOME/talaria/plans)")


def _measured_kl(folder) -> float:  # noqa: ANN001 - a Path
    """The KL to full precision that `pippin eval fidelity` (or `pippin compress`) stored in FOLDER/fidelity/."""
    from pippin.errors import PippinError
    from pippin.eval.report import load_result

    path = folder / "fidelity" / "results.json"
    if not path.is_file():
        raise PippinError(f"{folder} has no fidelity report ({path}); run `pippin eval fidelity` on it first.")
    systems = list(load_result(path).metrics.values())
    if len(systems) < 2 or "KL" not in systems[1]:
        raise PippinError(f"{path} has no KL for the compressed model.")
    return float(systems[1]["KL"])


def run(args: argparse.Namespace) -> int:
    from pippin.errors import PippinError
    from pippin.quant.compress import load_plan
    from pippin.talaria.devices import load_profile, this_machine_profile
    from pippin.talaria.quality import sensitivity_for
    from pippin.talaria.source import open_model
    from pippin.talaria.whatif import Rule, Target, TargetKind, apply_rules, auto, simulate, write_plan

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    src = open_model(args.model)
    cfg, plan = src.config, src.plan
    tied = cfg.tie_embeddings
    if args.plan:
        plan = plan.with_bits(load_plan(args.plan), tied=tied)
    overrides = {"act8": args.act8, "kv_bits": args.kv_bits}
    plan = dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    plan = apply_rules(plan, [Rule.parse(r) for r in args.rule], tied=tied)
    sens = sensitivity_for(cfg, plan, folder=src.folder)
    if args.calibrate:
        points = []
        for d in args.calibrate:
            other = open_model(d)
            if other.config.param_counts() != cfg.param_counts() or other.folder is None:
                raise PippinError(f"{d} is not a compressed model of {src.name}'s architecture; calibrate on models of the same shape.")
            points.append((other.plan, _measured_kl(other.folder)))
        sens = sens.calibrated(points)

    targets = {TargetKind.DECODE_MS: args.target_decode_ms, TargetKind.SIZE_MB: args.target_size_mb}
    targets[TargetKind.ENERGY_MJ] = args.target_energy_mj
    target = next((Target(kind=k, value=v) for k, v in targets.items() if v is not None), None)
    try:
        bits = tuple(int(b) for b in args.bits.split(","))
    except ValueError:
        raise PippinError(f"--bits takes widths separated by commas (e.g. 2,3,4), not {args.bits!r}.") from None
    if args.measure:
        this_machine_profile(refresh=True)
    profile = load_profile(args.device_profile)
    if args.serve:
        if target is not None or args.write_plan:
            raise PippinError("--serve starts the web view: run auto and write plans from the page (drop --target-* and --write-plan).")
        return _serve(args, src, plan, sens)
    kw = {"sensitivity": sens, "context": args.context, "prefill": args.prefill}
    if target is not None:
        result = auto(cfg, plan, profile, target, bits=bits, **kw)
    else:
        result = simulate(cfg, plan, profile, **kw)
    if args.write_plan:
        write_plan(args.write_plan, result, profile=profile, model=src.name, target=target)
    measured = None
    if args.profile:
        measured = _profile(result.plan, result.rows, cfg, args)
        result.rows = measured.rows

    rows = _table(result, group=args.group)
    if args.sort != "order":
        rows.sort(key=SORTS[args.sort], reverse=True)
    rows = rows[: args.limit] if args.limit else rows
    out = {
        "model": src.name,
        "plan": {"describe": result.plan.describe(), **dataclasses.asdict(result.plan)},
        "device": profile.to_dict(),
        "target": None if target is None else {"kind": target.kind.value, "value": target.value},
        "totals": result.summary(),
        "calibration": None if sens.calibration is None else dataclasses.asdict(sens.calibration),
        "measured": None if measured is None else measured.summary,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print(out, result, profile, target, args)
    return 0


def engine_steps():  # noqa: ANN201 - a pippin.talaria.profile.EngineSteps
    """The engine's prefill, decode step and KV cache, handed to pippin.talaria.profile (which does not import them)."""
    from pippin.engine.generate import decode_step, prefill
    from pippin.engine.kv_cache import KVCache
    from pippin.talaria.profile import EngineSteps

    return EngineSteps(
        new_cache=lambda cfg, n, kv8: KVCache(cfg, batch_size=1, max_len=n, kv8=kv8), prefill=prefill, decode_step=decode_step
    )


@dataclasses.dataclass(kw_only=True)
class _Measured:
    rows: list
    summary: dict


def _profile(plan, rows, cfg, args: argparse.Namespace) -> _Measured:  # noqa: ANN001 - a Plan, OpRows, ModelConfig
    """The rows with their measured columns, and the engine's step times, on a random-valued model of the plan."""
    from pippin.errors import PippinError
    from pippin.talaria.profile import build_model, profile_ops, with_measured

    if args.repeats < 1:
        raise PippinError(f"--repeats must be at least 1, got {args.repeats}.")
    model = build_model(cfg, plan)
    kw = {"context": args.context, "prefill": args.prefill, "kv8": plan.kv_bits == 8}
    prof = profile_ops(
        model, rows, steps=engine_steps(), decode_repeats=args.repeats, prefill_repeats=max(2, args.repeats // 4), progress=True, **kw
    )
    return _Measured(rows=with_measured(rows, prof), summary=prof.summary())


def _serve(args: argparse.Namespace, src, plan, sens) -> int:  # noqa: ANN001 - a ModelSource, Plan, Sensitivity
    """Serve the web view of this model and plan until Ctrl-C."""
    import socket

    import uvicorn
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from pippin.errors import PippinError
    from pippin.model.checkpoint import pippin_home
    from pippin.talaria.web import TalariaView, create_app

    plans_dir = args.plans_dir or pippin_home() / "talaria" / "plans"
    kw = {"context": args.context, "prefill": args.prefill, "plans_dir": plans_dir}
    if args.profile:
        from pippin.talaria.ops import ops_table

        kw["measured"] = _profile(plan, ops_table(src.config, plan, context=args.context, prefill=args.prefill), src.config, args).rows
    view = TalariaView(src, plan=plan, sensitivity=sens, device=args.device_profile, **kw)
    app = create_app(view)
    if args.host in ("127.0.0.1", "localhost", "::1"):  # a page on another site resolving to 127.0.0.1 (DNS rebinding) gets 400
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]", "::1"])
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise PippinError(f"Cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port.") from None
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"pippin talaria: http://{host}:{sock.getsockname()[1]}/  ({src.name}; plans go to {plans_dir})", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


def _table(result, *, group: str) -> list[dict]:  # noqa: ANN001 - a WhatIf
    """Rows as dicts (the op's counts, its estimate and its predicted ΔKL), summed per group unless group == 'op'."""
    rows = result.table()
    if group == "op":
        return rows
    key = {
        "type": lambda d: d["name"].rsplit(".", 1)[-1] if d["layer"] is not None else d["name"],
        "kind": lambda d: d["kind"],
        "layer": lambda d: f"layers.{d['layer']}" if d["layer"] is not None else d["name"],
    }[group]
    merged: dict[str, dict] = {}
    numeric = ("params", "stored_bytes", "decode_flops", "decode_bytes", "prefill_flops", "prefill_bytes", "decode_s", "decode_j")
    numeric += ("prefill_s", "prefill_j", "kl")
    if rows and rows[0].get("measured_decode_s") is not None:  # medians add up; spreads do not
        numeric += ("measured_decode_s", "measured_prefill_s")
    for d in rows:
        k = key(d)
        first = {"name": k, "kind": d["kind"], "layer": d["layer"], "bits": Counter(), "n": 0, "bounds": Counter()}
        m = merged.setdefault(k, first | dict.fromkeys(numeric, 0))
        m["n"] += 1
        m["kind"] = m["kind"] if m["kind"] == d["kind"] else "mixed"
        for f in numeric:
            m[f] += d[f]
        if d["bits"] is not None:
            m["bits"][d["bits"]] += 1
        m["bounds"][d["decode_bound"]] += 1
    for m in merged.values():  # the most common width and bound of the group
        m["bits"] = m["bits"].most_common(1)[0][0] if m["bits"] else None
        m["decode_bound"] = m.pop("bounds").most_common(1)[0][0]
    return list(merged.values())


def _measured_cells(r: dict) -> str:
    iqr = r.get("measured_decode_iqr_s")
    return f" {r['measured_decode_s'] * 1e6:>9.2f} {'' if iqr is None else f'{iqr * 1e6:.2f}':>7} {r['measured_prefill_s'] * 1e3:>10.3f}"


def _print(out: dict, result, profile, target, args: argparse.Namespace) -> None:  # noqa: ANN001
    t = out["totals"]
    measured = out["measured"]
    print(f"talaria: {out['model']} | {result.plan.describe()}")
    print(f"device: {profile.name} ({profile.description})")
    print(f"decode at context {args.context}, prefill of {args.prefill} tokens" + (f" | auto: {target.describe()}" if target else ""))
    print(
        f"{'op':<36} {'kind':<10} {'params':>10} {'bits':>4} {'stored KB':>10} {'MFLOP':>8} {'KB moved':>9} "
        f"{'decode µs':>9} {'bound':<8} {'µJ':>8} {'ΔKL':>8}" + (f" {'meas. µs':>9} {'IQR':>7} {'prefill ms':>10}" if measured else "")
    )
    for r in out["rows"]:
        bits = "-" if r["bits"] is None else str(r["bits"])
        print(
            f"{r['name'][:36]:<36} {r['kind']:<10} {r['params']:>10,} {bits:>4} {r['stored_bytes'] / 1e3:>10.1f} "
            f"{r['decode_flops'] / 1e6:>8.2f} {r['decode_bytes'] / 1e3:>9.1f} {r['decode_s'] * 1e6:>9.2f} {r['decode_bound']:<8} "
            f"{r['decode_j'] * 1e6:>8.2f} {r['kl']:>8.4f}" + (_measured_cells(r) if measured else "")
        )
    shares = ", ".join(f"{k} {v:.0%}" for k, v in t["decode_time_by_bound"].items() if v >= 0.005)
    print(f"size: {t['size_bytes'] / 1e6:.2f} MB, {t['n_params'] / 1e6:.1f}M parameters, {t['bpw']:.3f} bits per weight")
    print(f"decode: {t['decode_s'] * 1e3:.3f} ms/token = {t['decode_tok_s']:.1f} tok/s ({shares}); {t['decode_j'] * 1e3:.3f} mJ/token")
    prefill = f"{t['prefill_s'] * 1e3:.1f} ms for {args.prefill} tokens = {t['prefill_tok_s']:.0f} tok/s"
    print(f"prefill: {prefill}; {t['prefill_j_per_token'] * 1e3:.3f} mJ/token")
    cal = out["calibration"]
    fit = ""
    if cal:
        loo = "" if cal["loo_mean_rel_error"] is None else f", leave-one-out {cal['loo_mean_rel_error']:.0%}"
        fit = f"; calibrated on {cal['n_plans']} measured plans: mean error {cal['mean_rel_error']:.0%}{loo}"
    print(f"predicted ΔKL: {t['predicted_kl']:.4f} nats/token ({t['quality_source']}{fit})")
    print("estimates: a roofline model of the device profile, not measurements")
    if measured:
        m = measured
        print(
            f"measured on this machine ({m['threads']} threads, a model of this plan's shapes with random values; "
            f"medians of {m['repeats']['decode']} decode and {m['repeats']['prefill']} prefill repeats):"
        )
        print(
            f"  engine decode step {m['decode_step_s'] * 1e3:.3f} ms (IQR {m['decode_step_iqr_s'] * 1e3:.3f}), per-op sum "
            f"{m['decode_op_sum_s'] * 1e3:.3f} ms ({'fused kernels: each op timed alone pays' if m['fused'] else 'modules, each paying'} "
            f"{m['dispatch_s'] * 1e6:.1f} µs of dispatch)"
        )
        print(
            f"  engine prefill {m['prefill_step_s'] * 1e3:.1f} ms (IQR {m['prefill_step_iqr_s'] * 1e3:.1f}), per-op sum "
            f"{m['prefill_op_sum_s'] * 1e3:.1f} ms"
        )
    if args.write_plan:
        print(f"wrote {args.write_plan}")
