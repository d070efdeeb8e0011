"""Pretraining throughput (tokens/s) and MFU per mesh, through the real trainer (`pippin.train.pretrain`).

  python benchmarks/pretrain_throughput.py                     # this CPU: 1 process, FSDP x2, TP x2, CP x2, DP x2 x TP x2
  python benchmarks/pretrain_throughput.py --device cuda --bf16 --compile     # one GPU: AFM on-device shape, 8 layers
  torchrun --nproc-per-node 8 benchmarks/pretrain_throughput.py --device cuda --bf16 --compile --mesh fsdp=8

Every mesh runs the same model and global batch on random token shards; tokens/s is the median over the steps after
--warmup, MFU = (6 N + 12 L H D T) x tokens/s / ranks / per-rank peak (PaLM's rule; N counts the head). The CPU peak is
measured here (a one-thread fp32 matmul per rank); on a GPU it is the datasheet bf16 dense peak (H100: 989 TFLOP/s)
or --peak-tflops. The GPU goal (issue 19): >= 40 % MFU at the AFM on-device shape (d 3072, 24/8 heads, FFN 8064, vocab
49152, QK-norm, seq 4096) at reduced depth in bf16. Checkpoints are written once, at the end, outside the timed steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CPU_MESHES = {1: ["{}"], 2: ['{"fsdp": 2}', '{"tensor": 2}', '{"context": 2}'], 4: ['{"data": 2, "tensor": 2}']}


def write_random_shards(folder: Path, vocab: int, n_tokens: int) -> None:
    from pippin.data.shards import ShardWriter

    w = ShardWriter(folder, vocab_size=vocab, eos_id=0, shard_tokens=1 << 22)
    rng = np.random.default_rng(0)
    for _ in range(max(1, n_tokens // 4096)):
        w.add(rng.integers(1, vocab, size=4095))
    w.close()


def cpu_peak_flops(seconds: float = 1.0) -> float:
    """fp32 FLOP/s of one thread on a 512x512 matmul: the roof a rank with one thread can reach."""
    torch.set_num_threads(1)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - t0)


def model_config(args: argparse.Namespace):  # noqa: ANN201 - a ModelConfig
    from pippin.model.config import get_preset

    return dataclasses.replace(get_preset(args.preset), **({"head_dim": None} | args.model_overrides))


def bench(args: argparse.Namespace, mesh: dict, out: Path, data: Path, peak_tflops: float | None) -> dict:
    from pippin.train.parallelize import training_flops_per_token
    from pippin.train.pretrain import PretrainConfig, run_pretrain

    overrides = args.model_overrides
    cfg = PretrainConfig.from_dict({
        "out": str(out), "data": str(data), "model": args.preset, "model_overrides": overrides, "seq_len": args.seq_len,
        "global_batch": args.batch, "steps": args.warmup + args.steps, "mesh": mesh, "device": args.device,
        "bf16": args.bf16, "compile": args.compile, "activation_checkpointing": args.ac, "peak_tflops": peak_tflops,
        "checkpoint_every": 10**9, "async_checkpoint": False, "progress": False,
        "optim": {"name": "adamw", "lr": 1e-4, "total_steps": 1000, "warmup_steps": 10},
    })  # fmt: skip
    res = run_pretrain(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
    timed = rows[args.warmup :]
    tok_s = statistics.median(r["tokens_per_s"] for r in timed) if timed else 0.0
    world = dist.get_world_size() if dist.is_initialized() else 1
    mfu = training_flops_per_token(model_config(args), args.seq_len) * tok_s / world / (peak_tflops * 1e12) if peak_tflops else None
    if peak_tflops is None and timed and "mfu" in timed[0]:
        mfu = statistics.median(r["mfu"] for r in timed)
    return {"mesh": cfg.mesh.describe(), "ranks": world, "tokens_per_s": tok_s, "tokens_per_s_per_rank": tok_s / world,
            "mfu": mfu, "loss_first": res.losses[0], "loss_last": res.losses[-1],
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None}  # fmt: skip


def _worker(rank: int, world: int, args: argparse.Namespace, tmp: str, peak: float | None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    peak_file = Path(tmp, "peak.json")
    if peak is None:  # measured once, by the 1-process launch (forked before any compute in the parent)
        if not peak_file.exists():
            peak_file.write_text(json.dumps(cpu_peak_flops() / 1e12))
        peak = json.loads(peak_file.read_text())
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store-{world}", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    results = [
        bench(args, json.loads(m), Path(tmp, f"run-{world}-{i}"), Path(tmp, "shards"), peak) for i, m in enumerate(CPU_MESHES[world])
    ]
    if rank == 0:
        Path(tmp, f"results-{world}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def fmt(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-"
    loss = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"
    return f"| {r['mesh']} | {r['ranks']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_rank']:.0f} | {mfu} | {loss} |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16 compute (fp32 weights and optimizer state)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--ac", action="store_true", help="activation checkpointing")
    p.add_argument("--preset", default=None, help="model preset (default: tiny widened to d 256, vocab 4096 on CPU; afm-on-device on CUDA)")
    p.add_argument("--layers", type=int, default=None, help="depth (default 4 on CPU, 8 on CUDA)")
    p.add_argument("--overrides", default="{}", help="more ModelConfig fields as JSON, e.g. '{\"dim\": 256}'")
    p.add_argument("--seq-len", type=int, default=None, help="default 128 on CPU, 4096 on CUDA")
    p.add_argument("--batch", type=int, default=None, help="global batch in sequences (default 8 on CPU, 4 per GPU on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2 on CPU, 5 on CUDA)")
    p.add_argument("--mesh", default=None, help="under torchrun: the mesh, e.g. fsdp=8 or data=2,tensor=4")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-rank peak for MFU (default: measured CPU / GPU datasheet)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.preset = args.preset or ("afm-on-device" if gpu else "tiny")
    args.layers = args.layers or (8 if gpu else 4)
    args.seq_len, args.steps = args.seq_len or (4096 if gpu else 128), args.steps or (20 if gpu else 8)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args.batch = args.batch or (4 * world if gpu else 8)
    cpu_model = {"dim": 256, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 768, "vocab_size": 4096, "max_seq_len": max(args.seq_len, 256)}
    args.model_overrides = (cpu_model if args.preset == "tiny" else {}) | {"n_layers": args.layers} | json.loads(args.overrides)
    vocab = model_config(args).vocab_size
    if int(os.environ.get("RANK", "0")) == 0:
        print("| mesh | ranks | tokens/s | tokens/s per rank | MFU per rank | loss |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        if world == 1 and gpu:
            write_random_shards(Path(tmp, "shards"), vocab, args.batch * (args.seq_len + 1) * (args.warmup + args.steps + 1))
        if gpu or world > 1:  # one launch: this process (under torchrun, every rank)
            if world > 1:
                shared = Path(tempfile.gettempdir(), "pippin-pretrain-bench")
                if int(os.environ["RANK"]) == 0:
                    shutil.rmtree(shared / "run", ignore_errors=True)  # else the trainer resumes an earlier benchmark
                    write_random_shards(shared / "shards", vocab, args.batch * (args.seq_len + 1) * (args.warmup + args.steps + 1))
                if gpu:
                    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
                dist.init_process_group("nccl" if gpu else "gloo")
                dist.barrier()
                tmp = str(shared)
            mesh = dict(kv.split("=") for kv in args.mesh.split(",")) if args.mesh else {}
            r = bench(args, {k: int(v) for k, v in mesh.items()}, Path(tmp, "run"), Path(tmp, "shards"), args.peak_tflops)
            results = [r]
        else:  # this CPU: every mesh of CPU_MESHES, each world size in one forked gloo group
            write_random_shards(Path(tmp, "shards"), vocab, args.batch * (args.seq_len + 1) * (args.warmup + args.steps + 1))
            results = []
            for n in CPU_MESHES:
                mp.start_processes(_worker, args=(n, args, tmp, args.peak_tflops), nprocs=n, start_method="fork", join=True)
                results += json.loads(Path(tmp, f"results-{n}.json").read_text())
            peak = args.peak_tflops or json.loads(Path(tmp, "peak.json").read_text())
            print(f"CPU peak per rank (one thread, fp32 matmul): {peak * 1e3:.1f} GFLOP/s", file=sys.stderr)
        if int(os.environ.get("RANK", "0")) == 0:
            for r in results:
                print(fmt(r), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
