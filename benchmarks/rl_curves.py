"""Learning curves of `pippin rl` runs: the mean sampled reward and the greedy validation reward against the number
of samples drawn, one line per run, in one PNG (docs/posttraining.md).

  python benchmarks/rl_curves.py runs/rl-mdloo-fp runs/rl-rloo-fp --out docs/posttraining/rl_curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders of `pippin rl` (each with rl_history.json, or a checkpoint's)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--smooth", type=int, default=5, help="moving-average window over iterations for the sampled reward")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_v, ax_kl) = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in map(Path, args.runs):
        hist, start_val = history(run)
        config = json.loads((run / "rl_config.json").read_text())
        label = f"{run.name} ({config['algo']}, {'LoRA' if config.get('lora') else 'full'})"
        x = [h["samples"] for h in hist]
        r = [h["mean_reward"] for h in hist]
        w = max(1, args.smooth)
        smooth = [sum(r[max(0, i - w + 1) : i + 1]) / len(r[max(0, i - w + 1) : i + 1]) for i in range(len(r))]
        (line,) = ax_r.plot(x, smooth, label=label)
        ax_r.plot(x, r, alpha=0.25, color=line.get_color())
        val = [(0, start_val)] if start_val is not None else []
        val += [(h["samples"], h["val_reward"]) for h in hist if h.get("val_reward") is not None]
        if val:
            ax_v.plot(*zip(*val), marker="o", label=label, color=line.get_color())
        ax_kl.plot(x, [h["mean_kl"] for h in hist], label=label, color=line.get_color())
    ax_r.set(title=f"sampled reward ({args.smooth}-iteration mean)", xlabel="samples", ylabel="reward")
    ax_v.set(title="greedy reward on validation prompts", xlabel="samples", ylabel="reward")
    ax_kl.set(title="KL to the start, log(pi/pi_ref) per reply", xlabel="samples", ylabel="nats")
    for ax in (ax_r, ax_v, ax_kl):
        ax.grid(alpha=0.3)
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)
    return 0


def history(run: Path) -> tuple[list[dict], float | None]:
    """The run's per-iteration stats and the starting policy's validation reward: from the final rl_history.json, or
    the last checkpoint of a run still going."""
    f = run / "rl_history.json"
    d = json.loads((f if f.exists() else run / "checkpoint" / "state.json").read_text())
    return d["history"], d.get("start_val_reward")


if __name__ == "__main__":
    raise SystemExit(main())
