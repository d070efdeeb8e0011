"""`pippin info`: what a model is. Architecture, parameter counts, and bytes by tensor group.

Works on a checkpoint (loaded) or on a preset name (built on the meta device, so even the 3B AFM shape
costs no memory).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", nargs="?", default=None, help="checkpoint path, 'default', or a preset name (tiny, smollm2-135m, afm-on-device)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")


def _group(name: str) -> str:
    """Tensor group by module path (works for dense and compressed tensors: weight, packed, lut, scale)."""
    if name.startswith("embed_tokens"):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in name and "_proj." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "norms"


def describe(model: torch.nn.Module) -> dict:
    cfg = model.config
    groups: dict[str, dict[str, int]] = defaultdict(lambda: {"params": 0, "bytes": 0})
    for name, t in model.state_dict().items():
        g = groups[_group(name)]
        g["params"] += t.numel()
        g["bytes"] += t.numel() * t.element_size()
    counts = cfg.param_counts()
    return {"config": cfg.to_dict(), "params": counts, "total_params": sum(counts.values()), "groups": dict(groups)}


def run(args: argparse.Namespace) -> int:
    from pippin.model.config import PRESETS, get_preset
    from pippin.model.transformer import Transformer

    if args.model in PRESETS:
        with torch.device("meta"):
            model = Transformer(get_preset(args.model))
        source = f"preset {args.model}"
    else:
        from pippin.api import load_any

        loaded = load_any(args.model, progress=True)
        model, source = loaded.model, str(loaded.path)
    info = describe(model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["config"]
    print(f"{source}")
    print(
        f"  {c['n_layers']} layers, dim {c['dim']}, heads {c['n_heads']}/{c['n_kv_heads']} (head dim {c['head_dim']}), "
        f"FFN {c['ffn_dim']}, vocab {c['vocab_size']}, RoPE θ {c['rope_theta']:g}, "
        f"{'tied' if c['tie_embeddings'] else 'untied'} embeddings{', QK-norm' if c['qk_norm'] else ''}, context {c['max_seq_len']}"
    )
    p = info["params"]
    print(
        f"  parameters: {p['non_embedding'] / 1e9:.3f}B non-embedding + {p['embedding'] / 1e9:.3f}B embedding"
        f" = {info['total_params'] / 1e6:.1f}M"
    )
    print(f"  {'group':<10} {'params':>14} {'MB':>10}")
    for g, v in sorted(info["groups"].items(), key=lambda kv: -kv[1]["bytes"]):
        print(f"  {g:<10} {v['params']:>14,} {v['bytes'] / 1e6:>10.1f}")
    return 0
