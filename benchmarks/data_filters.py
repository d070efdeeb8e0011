"""Measure the pretraining pipeline's filters on labelled samples: PII precision/recall on planted items, MinHash
removal rate by Jaccard level on planted near-duplicates, decontamination catch rate on planted IFEval / MT-Bench /
XSum passages, and documents per second per step of a full pipeline run (2 tasks, 2 workers).

    nice python benchmarks/data_filters.py [--out benchmarks/results/data_filters.json] [--base 600] [--pairs 40]

Goals (issue 20): PII recall >= 0.98 for emails, cards and IPs with precision >= 0.95; dedup recall >= 0.95 at
Jaccard >= 0.8 with < 1 % false removal; every planted evaluation passage caught. Jaccard is exact on MinHash's own
5-gram shingles. Uses the default model's tokenizer (run `make model` once).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from pippin.data.decontamination_steps import Decontaminate, DecontaminationScan
from pippin.data.packing import load_tokenizer
from pippin.data.pipeline import config_from_dict, default_eval_data
from pippin.data.planted import english_doc, eval_passages, near_duplicate, pii_scores, plant_pii
from pippin.data.shards import read_shards
from pippin.data.stages import run_pipeline
from pippin.io import write_json_atomic

LEVELS = (0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.3)


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown")


def norm(t: str) -> str:
    return " ".join(t.split())


def shard_texts(folder: Path) -> set[str]:
    tok = load_tokenizer("default")
    tokens = np.concatenate([np.asarray(a) for a in read_shards(folder).arrays])
    eos = read_shards(folder).eos_id
    ends = np.flatnonzero(tokens == eos)
    starts = np.r_[0, ends[:-1] + 1]
    return {norm(tok.decode(tokens[s:e].tolist())) for s, e in zip(starts, ends)}


def bench_pii(rng: random.Random, n_docs: int) -> dict:
    docs = plant_pii(rng, n_docs)
    t0 = time.perf_counter()
    scores = pii_scores(docs)
    return {"docs": n_docs, "docs_per_s": round(n_docs / (time.perf_counter() - t0), 1), "by_kind": scores}


def bench_dedup(rng: random.Random, work: Path, n_base: int, pairs: int) -> dict:
    base = [english_doc(rng, 16) for _ in range(n_base)]
    copies = []  # (level, base index, copy text, exact Jaccard)
    for k, level in enumerate(LEVELS):
        for i in range(k * pairs, (k + 1) * pairs):
            text, j = near_duplicate(rng, base[i], level)
            copies.append((level, i, text, j))
    (work / "dedup_in").mkdir(parents=True)
    rows = base + [c[2] for c in copies]
    (work / "dedup_in" / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    off = {"language": None, "pii": None, "safety": None, "decontamination": None}
    off["quality"] = {"gopher_repetition": None, "gopher_quality": None, "c4": None, "fineweb": None}
    config = config_from_dict({"inputs": [str(work / "dedup_in")], "output": str(work / "dedup_out"), **off})
    run_pipeline(config)
    kept = shard_texts(work / "dedup_out")
    by_level = {}
    for level in LEVELS:
        cs = [c for c in copies if c[0] == level]
        caught = sum((norm(base[i]) not in kept) or (norm(t) not in kept) for _, i, t, _ in cs)
        js = [j for *_, j in cs]
        by_level[str(level)] = {
            "pairs": len(cs),
            "jaccard_min": round(min(js), 3),
            "jaccard_max": round(max(js), 3),
            "removal_rate": caught / len(cs),
        }
    unique = [norm(b) for b in base[len(LEVELS) * pairs :]] + [norm(base[i]) for lv, i, *_ in copies if lv <= 0.3]
    unique += [norm(t) for lv, _, t, _ in copies if lv <= 0.3]
    false_removal = sum(u not in kept for u in unique) / len(unique)
    high = [c for c in copies if c[3] >= 0.8]
    recall_08 = sum((norm(base[i]) not in kept) or (norm(t) not in kept) for _, i, t, _ in high) / len(high)
    return {
        "base_docs": n_base,
        "by_level": by_level,
        "recall_at_jaccard_ge_0.8": recall_08,
        "false_removal": false_removal,
        "unique_docs": len(unique),
    }


def bench_decont(rng: random.Random, per_set: int) -> dict:
    eval_data = str(default_eval_data())
    planted = eval_passages(eval_data, per_set, rng)
    clean = [english_doc(rng, 12) for _ in range(200)]
    from datatrove.data import Document

    with tempfile.TemporaryDirectory() as tmp:
        docs = [Document(text=english_doc(rng, 8) + "\n\n" + p, id=f"p{i}", metadata={"set": s}) for i, (s, p) in enumerate(planted)]
        docs += [Document(text=t, id=f"c{i}", metadata={}) for i, t in enumerate(clean)]
        t0 = time.perf_counter()
        scanned = list(DecontaminationScan(eval_data, tmp)(docs))
        scan_s = time.perf_counter() - t0
        kept = list(Decontaminate(tmp, common_threshold=1000)(scanned))
    kept_ids = {d.id for d in kept}
    by_set = {}
    for s in ("ifeval", "mt_bench", "xsum"):
        ids = [d.id for d in docs if d.metadata.get("set") == s]
        by_set[s] = {"planted": len(ids), "caught": sum(i not in kept_ids for i in ids)}
    clean_dropped = sum(f"c{i}" not in kept_ids for i in range(len(clean)))
    return {
        "by_set": by_set,
        "clean_docs": len(clean),
        "clean_dropped": clean_dropped,
        "scan_docs_per_s_with_index_build": round(len(docs) / scan_s, 1),
    }


def bench_steps(rng: random.Random, n_docs: int, rounds: int = 3) -> dict:
    """Each step's own work, one process, warmed up (models and word lists loaded), on the same documents: the median
    of `rounds` passes, per wall second and per CPU second.
    The pipeline report's per-step rates include loading, and MinHash stage 1 there also times the steps upstream."""
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

    from pippin.data.decontamination_steps import load_eval_index
    from pippin.data.filters import LanguageFilter, SafetyFilter
    from pippin.data.pii import find_pii

    texts = [english_doc(rng, 16) for _ in range(n_docs)] + [t for t, _ in plant_pii(rng, n_docs // 10)]
    index = load_eval_index(str(default_eval_data()))[0]
    sig = MinhashDedupSignature("/nonexistent", config=MinhashConfig(num_buckets=20, hashes_per_bucket=8))
    tok = load_tokenizer("default")
    work = {
        "language (langdetect)": LanguageFilter().filter,
        "gopher repetition": GopherRepetitionFilter().filter,
        "gopher quality": GopherQualityFilter().filter,
        "c4 quality": C4QualityFilter(filter_no_terminal_punct=False).filter,
        "fineweb quality": FineWebQualityFilter().filter,
        "pii": lambda d: find_pii(d.text),
        "profanity / unsafe": SafetyFilter().filter,
        "eval n-gram scan": lambda d: index.all_shared(d.text),
        "minhash signature": lambda d: sig.get_signature(sig.get_shingles(d.text)),
        "tokenize": lambda d: tok.encode(d.text),
    }
    rates, cpu_rates = {}, {}
    for name, fn in work.items():
        for t in texts[:5]:
            fn(Document(text=t, id="warm"))
        walls, cpus = [], []
        for _ in range(rounds):
            docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
            t0, c0 = time.perf_counter(), time.process_time()
            for d in docs:
                fn(d)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        rates[name] = round(len(texts) / statistics.median(walls), 1)
        cpu_rates[name] = round(len(texts) / statistics.median(cpus), 1)
    mean_chars = sum(map(len, texts)) / len(texts)
    # docs per CPU-second of this process is what a neighbour's load does not change (the steps are single-threaded)
    return {"docs": len(texts), "mean_chars": round(mean_chars), "rounds": rounds, "docs_per_s": rates, "docs_per_cpu_s": cpu_rates}


def bench_pipeline(rng: random.Random, work: Path, n_docs: int) -> dict:
    """A full run (every step on) over a mixed corpus, for documents per second per step."""
    docs = [english_doc(rng, 16) for _ in range(n_docs)]
    docs += [t for t, _ in plant_pii(rng, n_docs // 10)]
    (work / "full_in").mkdir(parents=True)
    (work / "full_in" / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    t0 = time.perf_counter()
    report = run_pipeline(config_from_dict({"inputs": [str(work / "full_in")], "output": str(work / "full_out")}))
    wall = time.perf_counter() - t0
    steps = [{k: r[k] for k in ("stage", "step", "docs_in", "docs_out", "seconds", "docs_per_s")} for r in report["steps"]]
    return {"docs": len(docs), "wall_s": round(wall, 1), "n_tokens": report["n_tokens"], "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/data_filters.json")
    ap.add_argument("--base", type=int, default=600, help="base documents of the dedup set")
    ap.add_argument("--pairs", type=int, default=40, help="near-duplicate pairs per Jaccard level")
    ap.add_argument("--pii-docs", type=int, default=1000)
    ap.add_argument("--eval-per-set", type=int, default=80)
    ap.add_argument("--full-docs", type=int, default=2000)
    ap.add_argument("--step-docs", type=int, default=500, help="documents for the one-process per-step rates")
    ap.add_argument("--only-steps", action="store_true", help="measure only the per-step rates")
    args = ap.parse_args()
    rng = random.Random(0)
    result = {"machine": cpu_name(), "date": time.strftime("%Y-%m-%d"), "command": "nice python benchmarks/data_filters.py"}
    if args.only_steps:
        result["steps"] = bench_steps(rng, args.step_docs)
        write_json_atomic(args.out, result)
        print(json.dumps(result["steps"], indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        result["pii"] = bench_pii(rng, args.pii_docs)
        result["dedup"] = bench_dedup(rng, Path(tmp), args.base, args.pairs)
        result["decontamination"] = bench_decont(rng, args.eval_per_set)
        result["steps"] = bench_steps(rng, args.step_docs)
        result["pipeline"] = bench_pipeline(rng, Path(tmp), args.full_docs)
    write_json_atomic(args.out, result)
    for kind, s in result["pii"]["by_kind"].items():
        print(f"PII {kind:<12} planted {s['planted']:>5}  recall {s['recall']:.3f}  precision {s['precision']:.3f}")
    for level, s in result["dedup"]["by_level"].items():
        print(f"dedup J~{level:<5} ({s['jaccard_min']}-{s['jaccard_max']}) pairs {s['pairs']:>3}  removed {s['removal_rate']:.3f}")
    d = result["dedup"]
    recall, false = d["recall_at_jaccard_ge_0.8"], d["false_removal"]
    print(f"dedup recall at J>=0.8 {recall:.3f}; false removal {false:.4f} of {d['unique_docs']} unique docs")
    for s, c in result["decontamination"]["by_set"].items():
        print(f"decontamination {s:<10} caught {c['caught']}/{c['planted']}")
    print(f"decontamination clean docs dropped: {result['decontamination']['clean_dropped']}/{result['decontamination']['clean_docs']}")
    print(f"per step, one process, {result['steps']['docs']} docs of {result['steps']['mean_chars']} chars:")
    for name, rate in result["steps"]["docs_per_s"].items():
        print(f"  {name:<24}{rate:>10} docs/s  {result['steps']['docs_per_cpu_s'][name]:>10} docs/CPU-s")
    for r in result["pipeline"]["steps"]:
        print(f"{r['stage']:<16}{r['step']:<26}{r['docs_in']:>7}{r['docs_out']:>7}  {r['docs_per_s'] or '-':>10} docs/s")
    print(f"full run: {result['pipeline']['docs']} docs, {result['pipeline']['n_tokens']} tokens, {result['pipeline']['wall_s']} s wall")


if __name__ == "__main__":
    main()
