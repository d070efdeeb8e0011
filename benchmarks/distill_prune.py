"""Distillation and Soft-Top-K FFN pruning on a tiny model and a toy language, against training from scratch.

The language is a random second-order Markov chain (V = 16 tokens by default; each pair of previous tokens has a sparse Dirichlet
distribution over the next), so labels are noisy samples and the FFN must store a V^2 x V table. A teacher with FFN
width F is trained first (label-only, adastar). Students have width F/2 and the same step budget:
  (a) from scratch, label-only cross-entropy;
  (b) from scratch, AFM's distillation target 0.9 onehot(teacher top-1) + 0.1 onehot(label) (afm.md 2.4);
  (c) the teacher pruned to F/2 by learned Soft-Top-K masks (pippin.train.prune) then distilled: mask steps plus
      dense steps after export equal (b)'s steps;
  (e) ablation: the teacher cut to F/2 by a fixed magnitude score (|gate row| |up row| |down column|), no mask
      learning, then distilled for all of (b)'s steps.
Held-out cross-entropy against sampled labels and top-1 accuracy, mean and spread over seeds, with the chain's own
floor. Follows AFM's recipe at toy scale; no claim about real data. Writes JSON; docs/distill-prune.md has the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from pippin.io import write_json_atomic
from pippin.kernels import cpu_name
from pippin.model.config import ModelConfig
from pippin.model.transformer import Transformer
from pippin.train.losses import distill_loss
from pippin.train.optim import OptimConfig, build_optimizer, clip_grads_, lr_at, set_lr
from pippin.train.prune import PruneConfig, apply_ffn_masks, export_pruned, mask_schedule, set_masks_


def make_chain(vocab: int, alpha: float, seed: int) -> torch.Tensor:
    """(V, V, V) next-token probabilities given the two previous tokens."""
    torch.manual_seed(seed)
    p = torch.distributions.Dirichlet(torch.full((vocab,), alpha)).sample((vocab, vocab)).clamp_min(1e-9)
    return p / p.sum(-1, keepdim=True)


def sample(chain: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    vocab = chain.shape[0]
    x = torch.empty(n, length, dtype=torch.long)
    x[:, :2] = torch.randint(0, vocab, (n, 2), generator=gen)
    for t in range(2, length):
        x[:, t] = torch.multinomial(chain[x[:, t - 2], x[:, t - 1]], 1, generator=gen).squeeze(1)
    return x


def model_config(vocab: int, ffn_dim: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=ffn_dim, max_seq_len=64, bos_token_id=None, eos_token_ids=[]
    )


def logits_and_labels(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions of tokens 2.. (the first two are uniform noise): logits (B, T-2, V), labels (B, T-2)."""
    return model(x[:, :-1])[:, 1:], x[:, 2:]


def train(model, *, steps: int, lr: float, data_seed: int, chain, args, teacher=None, masks: PruneConfig | None = None):  # noqa: ANN001, ANN201
    """Label-only (teacher None) or distillation; with `masks`, also learns the FFN masks (scores on their own Adam)."""
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if not n.endswith(".scores")]
    ocfg = OptimConfig(name="adastar", lr=lr, warmup_steps=max(steps // 10, 1), total_steps=steps, drop_grad_norm=100.0)
    opt = build_optimizer(named, ocfg)
    scores = [p for n, p in model.named_parameters() if n.endswith(".scores")]
    score_opt = torch.optim.Adam(scores, lr=args.score_lr) if scores else None
    gen = torch.Generator().manual_seed(data_seed)
    for step in range(steps):
        if masks is not None:
            keep, temperature = mask_schedule(step, steps, model.config.ffn_dim, masks)
            set_masks_(model, keep=keep, temperature=temperature)
        set_lr(opt, lr_at(step, ocfg))
        x = sample(chain, args.batch, args.seq_len, gen)
        logits, labels = logits_and_labels(model, x)
        if teacher is None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        else:
            with torch.no_grad():
                t_logits, _ = logits_and_labels(teacher, x)
            loss = distill_loss(logits, t_logits.argmax(-1), labels)
        loss.backward()
        if not clip_grads_([p for _, p in named], ocfg).skip:
            opt.step()
            if score_opt is not None:
                score_opt.step()
        opt.zero_grad(set_to_none=True)
        if score_opt is not None:
            score_opt.zero_grad(set_to_none=True)
    return model.eval()


@torch.no_grad()
def magnitude_pruned(teacher: Transformer, keep: int) -> Transformer:
    """The ablation: keep each layer's channels with the largest |gate row| |up row| |down column| (no learning)."""
    model = copy.deepcopy(teacher)
    for name, m in apply_ffn_masks(model).items():
        mlp = model.get_submodule(name.removesuffix(".down_proj"))
        w = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * m.base.weight.norm(dim=0)
        m.scores.copy_(w)
    return export_pruned(model, keep).requires_grad_(True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, held: torch.Tensor) -> dict[str, float]:
    logits, labels = logits_and_labels(model, held)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()
    return {"loss": ce, "acc": (logits.argmax(-1) == labels).float().mean().item()}


def floor(chain: torch.Tensor, held: torch.Tensor) -> dict[str, float]:
    """The chain's own held-out loss and accuracy (the best any model can do)."""
    p = chain[held[:, :-2], held[:, 1:-1]]  # (B, T-2, V)
    labels = held[:, 2:]
    return {"loss": -p.gather(-1, labels[..., None]).log().mean().item(), "acc": (p.argmax(-1) == labels).float().mean().item()}


def summary(runs: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for key in runs[0]:
        vals = [r[key] for r in runs]
        out[key] = statistics.mean(vals)
        out[key + "_spread"] = (max(vals) - min(vals)) / 2  # half the range over seeds
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration of the chain (smaller: sparser)")
    ap.add_argument("--teacher-ffn", type=int, default=512)
    ap.add_argument("--teacher-steps", type=int, default=800)
    ap.add_argument("--steps", type=int, default=200, help="student steps (all variants)")
    ap.add_argument("--mask-fraction", type=float, default=0.3, help="share of (c)'s steps spent learning masks")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--score-lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=34)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models on a shared CPU)")
    ap.add_argument("--json", default="docs/benchmarks/distill_prune.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0, cpu0 = time.perf_counter(), time.process_time()
    chain = make_chain(args.vocab, args.alpha, seed=1234)
    held = sample(chain, 256, args.seq_len, torch.Generator().manual_seed(999))
    torch.manual_seed(0)
    teacher = train(
        Transformer(model_config(args.vocab, args.teacher_ffn)), steps=args.teacher_steps, lr=args.lr, data_seed=1, chain=chain, args=args
    )
    teacher.requires_grad_(False)
    small = args.teacher_ffn // 2
    mask_steps = round(args.mask_fraction * args.steps)
    runs: dict[str, list[dict[str, float]]] = {
        "a_scratch_label": [],
        "b_scratch_distill": [],
        "c_pruned_distill": [],
        "e_magnitude_distill": [],
    }
    for seed in range(args.seeds):
        torch.manual_seed(100 + seed)
        m = Transformer(model_config(args.vocab, small))
        m_copy = copy.deepcopy(m)  # (a) and (b) start from the same weights
        runs["a_scratch_label"].append(evaluate(train(m, steps=args.steps, lr=args.lr, data_seed=10 + seed, chain=chain, args=args), held))
        b = train(m_copy, steps=args.steps, lr=args.lr, data_seed=10 + seed, chain=chain, args=args, teacher=teacher)
        runs["b_scratch_distill"].append(evaluate(b, held))
        student = copy.deepcopy(teacher).requires_grad_(True)
        apply_ffn_masks(student)
        pcfg = PruneConfig(keep_ratio=0.5)
        train(student, steps=mask_steps, lr=args.lr, data_seed=10 + seed, chain=chain, args=args, teacher=teacher, masks=pcfg)
        pruned = export_pruned(student, small)
        at_export = evaluate(pruned, held)
        c = train(pruned, steps=args.steps - mask_steps, lr=args.lr, data_seed=20 + seed, chain=chain, args=args, teacher=teacher)
        runs["c_pruned_distill"].append({**evaluate(c, held), "loss_at_export": at_export["loss"], "acc_at_export": at_export["acc"]})
        e = magnitude_pruned(teacher, small)
        e = train(e, steps=args.steps, lr=args.lr, data_seed=20 + seed, chain=chain, args=args, teacher=teacher)
        runs["e_magnitude_distill"].append(evaluate(e, held))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]['loss']:.4f}/{v[-1]['acc']:.4f}" for k, v in runs.items()), flush=True)
    result = {
        "machine": cpu_name(),
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args),
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
        "floor": floor(chain, held),
        "teacher": evaluate(teacher, held),
        "students": {k: summary(v) for k, v in runs.items()},
        "per_seed": runs,
    }
    write_json_atomic(args.json, result)
    print(json.dumps({k: result[k] for k in ("seconds", "cpu_seconds", "floor", "teacher", "students")}, indent=1))


if __name__ == "__main__":
    main()
