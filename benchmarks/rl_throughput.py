"""Throughput of online RL (MDLOO or RLOO) iterations: seconds per iteration, samples/s and generated tokens/s, the
sampling share, on the CPU (the engine's kernels) or a GPU (`--device cuda --bf16`: the issue's prepared GPU job).

The policy is a LoRA adapter (rank 16) on a model of the preset's shape with random weights (or --model), the prompts
are random token ids of --prompt-len tokens and the reward is a toy verifier (the share of even token ids): what an
iteration costs does not depend on the weights, and random weights never stop early, so every reply runs to
--max-new-tokens (the worst case). No data or checkpoint is needed, so the script travels to a GPU machine alone:
  PYTHONPATH=. python3 benchmarks/rl_throughput.py --device cuda --bf16 --prompts 32 --out $OUT/rl_gpu.json
  python benchmarks/rl_throughput.py --bf16 --prompts 8 --iterations 2 --out docs/benchmarks/rl_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--model", default=None, help="a real model instead of the preset's shape (its weights load on --device)")
    ap.add_argument("--algo", choices=["mdloo", "rloo"], default="mdloo")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=90)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--minibatch", type=int, default=8)
    ap.add_argument("--inner-steps", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=3, help="the first is a warm-up and is left out of the medians")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from pippin.kernels import cpu_name
    from pippin.model.config import get_preset
    from pippin.model.transformer import Transformer
    from pippin.train.mdloo import RLConfig, train_rl

    if args.model:
        from pippin.api import load_any

        model = load_any(args.model).model
    else:
        torch.manual_seed(0)
        model = Transformer(get_preset(args.preset))
        with torch.no_grad():  # random weights at a trained model's scale: the next-token distribution is spread out
            for name, p in model.named_parameters():
                p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    model = model.to(args.device).eval()
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(4 * args.prompts)]
    cfg = RLConfig(
        algo=args.algo, iterations=args.iterations, prompts_per_iteration=args.prompts, samples=args.samples,
        max_new_tokens=args.max_new_tokens, minibatch=args.minibatch, inner_steps=args.inner_steps, bf16=args.bf16, lr=1e-4,
    )  # fmt: skip
    res = train_rl(model, prompts, lambda p, y: sum(t % 2 == 0 for t in y) / max(len(y), 1), cfg, progress=True)
    timed = res.history[1:] or res.history
    n = args.prompts * args.samples
    per_it = statistics.median(h.seconds for h in timed)
    sampling = statistics.median(h.sample_seconds for h in timed)
    tokens = statistics.median(h.mean_length for h in timed) * n
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": cfg.to_dict(),
        "median_seconds_per_iteration": per_it,
        "median_sampling_seconds": sampling,
        "samples_per_s": n / per_it,
        "generated_tokens_per_s_sampling": tokens / sampling,
        "history": [asdict(h) for h in res.history],
    }
    print(
        f"{device}: {args.algo} {n} samples x {args.max_new_tokens} tokens per iteration: {per_it:.1f} s/iteration "
        f"(sampling {sampling:.1f} s, {tokens / sampling:.0f} tok/s), {n / per_it:.2f} samples/s"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
