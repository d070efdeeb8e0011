"""What reusing a cached prefix does to the numbers: KL and top-1 agreement against a full prefill.

The prefix cache feeds a chat's next turn keys and values that the fused decoder computed token by token while it
replied, where a fresh prefill would compute them all at once on the batched kernels. For each conversation: turn 1
is prefilled and answered greedily (decode steps write the reply into the cache), then turn 2's new tokens are
prefilled after that cache; the logits at every new position are compared with one full prefill of turn 2's whole
prompt (mean KL(full || reused), top-1 agreement, largest KL), and both with full precision on the same positions:
decode steps and a prefill round differently (act8), so the two differ a little, but neither is further from full
precision.
  python benchmarks/prefix_fidelity.py --model PATH --out docs/benchmarks/prefix-fidelity.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import run_header  # noqa: E402
from serving_turns import MESSAGES  # noqa: E402


@torch.inference_mode()
def compare(lm, fwd, fp_fwd, first: str, second: str, reply_tokens: int) -> dict:  # noqa: ANN001 - a LoadedModel, FusedDecoders
    """One two-turn chat: turn 2's new positions after the cached turn 1, against a full prefill and full precision."""
    from pippin.engine.generate import decode_step
    from pippin.engine.kv_cache import KVCache
    from pippin.serve.service import uses_kv8

    model, tok = lm.model, lm.tokenizer
    kv8 = uses_kv8(lm)

    def logits_after(cache: KVCache, ids: list[int], start: int, f=fwd) -> torch.Tensor:  # noqa: ANN001
        """All positions' logits (T, V) for ids written from slot `start`."""
        positions = torch.arange(start, start + len(ids)).view(1, -1)
        cache.begin(positions)
        out = f(torch.tensor([ids]), positions=positions, cache=cache, mask=cache.attention_mask(positions))
        cache.lengths = torch.tensor([start + len(ids)])
        return out[0]

    turn1 = [{"role": "user", "content": first}]
    p1 = tok.encode_chat(turn1)
    cache = KVCache(model.config, batch_size=1, max_len=2048, kv8=kv8)
    nxt = int(logits_after(cache, p1, 0)[-1].argmax())
    reply = [nxt]
    for _ in range(reply_tokens - 1):  # greedy, one decode step per token (the fused path, as served)
        nxt = int(decode_step(fwd, torch.tensor([nxt]), cache)[0].argmax())
        reply.append(nxt)
    turn2 = [*turn1, {"role": "assistant", "content": tok.decode(reply)}, {"role": "user", "content": second}]
    p2 = tok.encode_chat(turn2)
    held = p1 + reply[:-1]
    n = 0
    while n < min(len(held), len(p2) - 1) and held[n] == p2[n]:
        n += 1
    cache.lengths = torch.tensor([n])
    reused = logits_after(cache, p2[n:], n)
    full = logits_after(KVCache(model.config, batch_size=1, max_len=2048, kv8=kv8), p2, 0)[n:]
    ref = logits_after(KVCache(fp_fwd.model.config, batch_size=1, max_len=2048), p2, 0, fp_fwd)[n:]
    kl = _kl(full, reused)
    return {"reused": n, "new": len(p2) - n, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float((full.argmax(-1) == reused.argmax(-1)).double().mean()),
            "kl_fp_full": float(_kl(ref, full).mean()), "kl_fp_reused": float(_kl(ref, reused).mean())}  # fmt: skip


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from logits."""
    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--reply-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from pippin.api import load_any
    from pippin.kernels.decoder import FusedDecoder

    torch.set_num_threads(args.threads)
    lm = load_any(args.model)
    fwd, fp_fwd = FusedDecoder.from_model(lm.model), FusedDecoder.from_model(load_any("default").model)
    rows = []
    for a, b in zip(MESSAGES, MESSAGES[1:]):
        rows.append(compare(lm, fwd, fp_fwd, a, b, args.reply_tokens))
        print(rows[-1], file=sys.stderr, flush=True)
    positions = sum(r["new"] for r in rows)
    summary = {
        "conversations": len(rows),
        "positions": positions,
        "kl_mean": sum(r["kl_mean"] * r["new"] for r in rows) / positions,
        "kl_max": max(r["kl_max"] for r in rows),
        "top1": sum(r["top1"] * r["new"] for r in rows) / positions,
        "kl_full_precision_vs_full_prefill": sum(r["kl_fp_full"] * r["new"] for r in rows) / positions,
        "kl_full_precision_vs_reused": sum(r["kl_fp_reused"] * r["new"] for r in rows) / positions,
    }
    print(summary)
    if args.out:
        from pippin.io import write_json_atomic

        write_json_atomic(args.out, {**run_header(args.threads), "model": args.model, "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
