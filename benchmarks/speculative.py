"""Speculative decoding against plain decoding of the same target, greedy, identical text required, interleaved rounds.

Issue #15's row: target = the served default, draft = the smallest compressed model, goal >= 1.5x. Besides the
end-to-end tok/s it times the three costs that bound the speedup, on the same kernels: one target decode step, one
target verification of k + 1 tokens, one draft step. With acceptance rate a per proposed token, a round of k drafts
yields E = (1 - a^(k+1)) / (1 - a) tokens (Leviathan et al.) for k draft steps plus one verification, so

    speedup <= E * t_target / (k * t_draft + t_verify)

which says what a draft would have to cost, or how often it would have to agree, to reach a goal.
  python benchmarks/speculative.py --target ~/.cache/pippin/models/smollm2-135m-instruct-6bit \
      --draft ~/.cache/pippin/models/smollm2-135m-instruct-3.5bpw-rot --k 2,3,4 --rounds 3 --out docs/benchmarks/speculative.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serving import PROMPTS, run_header  # noqa: E402

from pippin.api import load_any  # noqa: E402
from pippin.engine.engine import Engine  # noqa: E402
from pippin.engine.generate import prefill  # noqa: E402
from pippin.engine.kv_cache import KVCache  # noqa: E402
from pippin.engine.sampling import SamplingParams  # noqa: E402
from pippin.engine.speculative import SpeculativeDecoder, forward_at  # noqa: E402
from pippin.kernels.decoder import FusedDecoder  # noqa: E402


def step_ms(model, ids: list[int], tokens: int, repeats: int = 30) -> float:  # noqa: ANN001 - Transformer
    """Median ms of one forward of `tokens` new tokens after `ids` on the fused decoder (a one-row cache)."""
    fwd = FusedDecoder.from_model(model)
    cache = KVCache(model.config, batch_size=1, max_len=1024)
    times = []
    with torch.inference_mode():
        prefill(fwd, torch.tensor([ids]), torch.tensor([len(ids)]), cache)
        for _ in range(repeats):
            t = time.perf_counter()
            forward_at(fwd, [ids[-1]] * tokens, cache, len(ids))
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def bound(a: float, k: int, t_target: float, t_draft: float, t_verify: float) -> float:
    expected = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return expected * t_target / (k * t_draft + t_verify)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", action="append", required=True, help="draft model (repeatable)")
    ap.add_argument("--k", default="2,3,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.k.split(",")]
    target = load_any(args.target)
    drafts = {d: load_any(d) for d in args.draft}
    tok = target.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS[: args.prompts]]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    engine = Engine(target.model, max_len=1024)
    plain_text = {i: engine.generate_ids([p], params)[0] for i, p in enumerate(prompts)}  # also warms up
    jobs = [("plain", None, 0)] + [("spec", d, k) for d in drafts for k in ks]
    samples: dict[tuple, dict] = {(kind, d, k): {"tok_s": [], "accept": [], "identical": []} for kind, d, k in jobs}
    rng = random.Random(0)
    for r in range(args.rounds):
        order = jobs[:]
        rng.shuffle(order)
        for kind, d, k in order:
            for i, p in enumerate(prompts):
                dec = None if kind == "plain" else SpeculativeDecoder(target.model, drafts[d].model, k=k, max_len=1024)
                t = time.perf_counter()  # the decoder's construction is not timed, as the engine's is not
                if dec is None:
                    out, accept = engine.generate_ids([p], params)[0], None
                else:
                    out = list(dec.generate(p, params))
                    accept = dec.stats.acceptance_rate
                dt = time.perf_counter() - t
                s = samples[(kind, d, k)]
                s["tok_s"].append(len(out) / dt)
                s["identical"].append(out == plain_text[i])
                if accept is not None:
                    s["accept"].append(accept)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    ctx = prompts[0]
    costs = {"target_step_ms": step_ms(target.model, ctx, 1)}
    costs.update({f"target_verify_{k + 1}_ms": step_ms(target.model, ctx, k + 1) for k in ks})
    costs.update({f"draft_step_ms[{d}]": step_ms(m.model, ctx, 1) for d, m in drafts.items()})
    plain = statistics.median(samples[("plain", None, 0)]["tok_s"])
    rows = []
    for (kind, d, k), s in samples.items():
        if kind == "plain":
            continue
        a = statistics.mean(s["accept"])
        tok_s = statistics.median(s["tok_s"])
        rows.append(
            {
                "draft": d,
                "k": k,
                "tok_s": tok_s,
                "speedup": tok_s / plain,
                "acceptance": a,
                "identical": all(s["identical"]),
                "bound": bound(a, k, costs["target_step_ms"], costs[f"draft_step_ms[{d}]"], costs[f"target_verify_{k + 1}_ms"]),
            }
        )
    report = {**run_header(args.threads), "target": args.target, "plain_tok_s": plain, "costs_ms": costs, "rows": rows}
    report["samples"] = {f"{kind}:{d}:{k}": s for (kind, d, k), s in samples.items()}
    print(f"plain: {plain:.1f} tok/s; costs (ms): " + ", ".join(f"{n} {v:.2f}" for n, v in costs.items()))
    print("| draft | k | tok/s | speedup | acceptance | bound from the costs | identical |")
    for row in rows:
        print(
            f"| {row['draft'].rsplit('/', 1)[-1]} | {row['k']} | {row['tok_s']:.1f} | {row['speedup']:.2f}x | {row['acceptance']:.2f} | "
            f"{row['bound']:.2f}x | {row['identical']} |"
        )
    if args.out:
        from pippin.io import write_json_atomic

        write_json_atomic(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1, default=str)[:2000])


if __name__ == "__main__":
    main()
