"""Serving benchmark: `pippin serve` under concurrent streaming clients with mixed adapters, loopback only.

Starts the server as a subprocess (the 3.5 bpw model and its adapters), then for each client count runs that
many OpenAI-style streaming chat clients at once, each sending requests back to back for `--seconds`, each
request naming an adapter in turn (or none). Reports total generated tok/s, p50/p99 time to first token, and
the server's resident memory sampled every second (flat memory = no leak). Speculative decoding is
benchmarks/speculative.py. `--single N` first times N rounds of one streamed request
through the official openai client against `pippin generate` on the same model and prompt (tok/s after the first
token, TTFT, and whether the texts are identical: always with --no-prefix-cache; with the cache, whose reused keys
round differently, they can part at a near-tie), interleaved.
  python benchmarks/serving.py --model PATH --clients 1,16 --seconds 60 --out docs/benchmarks/serving.json
  python benchmarks/serving.py --model PATH --clients '' --single 5 --max-tokens 128 --out docs/benchmarks/stream.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from pippin.serve.config import ServeConfig

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how rainbows form.",
    "Give three tips for a job interview.",
    "Summarize the plot of a heist movie you invent.",
    "Describe a healthy breakfast and why it helps.",
    "Write a haiku about autumn, then explain it.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(flags: list[str], tree: str | None = None) -> tuple[subprocess.Popen, str]:
    """`pippin serve FLAGS` on a free loopback port (queue 64), once /health answers: the process and its URL. tree: run
    the pippin of that source tree (e.g. a `git worktree` of an older commit) instead of this one."""
    port = free_port()
    cmd = [sys.executable, "-m", "pippin", "serve", "--port", str(port), "--max-queue", "64", *flags]
    env, cwd = dict(os.environ), None
    if tree is not None:
        cwd = str(Path(tree).resolve())
        env["PYTHONPATH"] = cwd
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"`pippin serve {' '.join(flags)}` did not answer /health within about 5 minutes")


def run_header(threads: int) -> dict:
    """What every benchmark report starts with: when, the command, the CPU, the kernel variant and the threads."""
    from pippin.kernels import cpu_name

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "cpu": cpu_name(),
        "kernels": kernel_variant(),
        "threads": threads,
    }


def kernel_variant() -> str:
    from pippin.kernels import variant

    return variant()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def client(url: str, models: list[str], until: float, max_tokens: int, k: int, out: list, stop: asyncio.Event) -> None:
    i = k
    async with httpx.AsyncClient(timeout=600) as http:
        while time.perf_counter() < until and not stop.is_set():
            body = {
                "model": models[i % len(models)],
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            t0 = time.perf_counter()
            ttft, n = None, 0
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    out.append({"error": r.status_code})
                    await asyncio.sleep(0.2)
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if ev.get("choices") and ev["choices"][0].get("delta", {}).get("content") and ttft is None:
                        ttft = time.perf_counter() - t0
                    if ev.get("usage"):
                        n = ev["usage"]["completion_tokens"]
            out.append({"ttft": ttft, "tokens": n, "seconds": time.perf_counter() - t0, "end": time.perf_counter()})
            i += 1


async def load(url: str, models: list[str], n_clients: int, seconds: float, max_tokens: int, pid: int) -> dict:
    results: list[dict] = []
    mem: list[float] = []
    stop = asyncio.Event()
    t0 = time.perf_counter()
    until = t0 + seconds

    async def sample_memory() -> None:
        while not stop.is_set():
            mem.append(rss_mb(pid))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample_memory())
    await asyncio.gather(*(client(url, models, until, max_tokens, k, results, stop) for k in range(n_clients)))
    stop.set()
    await sampler
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r and r["ttft"] is not None]
    ttfts = sorted(r["ttft"] for r in ok)
    pct = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else None  # noqa: E731
    return {
        "clients": n_clients,
        "requests": len(ok),
        "errors": len(results) - len(ok),
        "tokens": sum(r["tokens"] for r in ok),
        "tok_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50_s": pct(0.5),
        "ttft_p99_s": pct(0.99),
        "rss_mb_first": mem[0] if mem else None,
        "rss_mb_max": max(mem) if mem else None,
        "rss_mb_last": mem[-1] if mem else None,
        "rss_mb_samples": mem[:: max(1, len(mem) // 60)],
        "wall_s": wall,
    }


def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def served_once(url: str, prompt: str | list[dict], max_tokens: int) -> dict:
    """One streamed chat completion (a user message, or a whole conversation) through the official openai client, timed
    as its user sees it."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    t0 = time.perf_counter()
    first = last = None
    text, n, n_prompt = [], 0, 0
    stream = client.chat.completions.create(
        model="bench",
        messages=[{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            n, n_prompt = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
    return {
        "ttft_s": first - t0 if first else None,
        "tok_s": (n - 1) / (last - first) if n > 1 and last > first else None,
        "tokens": n,
        "prompt_tokens": n_prompt,
        "text": "".join(text),
    }


def engine_once(model: str, prompt: str, max_tokens: int, threads: int) -> dict:
    """The same request through `pippin generate --json` (its own process): the engine's figure."""
    cmd = [sys.executable, "-m", "pippin", "generate", "--model", model, "--threads", str(threads), "--json", "--temperature", "0"]
    out = subprocess.run([*cmd, "--max-new-tokens", str(max_tokens), prompt], capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    st = d["stats"]
    return {"ttft_s": st["ttft_s"], "tok_s": st["decode_tok_s"], "tokens": st["generated_tokens"], "text": d["text"]}


def single_stream(url: str, args) -> dict:
    """One client at a time, interleaved with `pippin generate` on the same model and prompt, in rounds."""
    rows = []
    for r in range(args.single):
        for prompt in PROMPTS[:3]:
            eng = engine_once(args.model, prompt, args.max_tokens, args.threads)
            srv = served_once(url, prompt, args.max_tokens)
            rows.append({"round": r, "prompt": prompt, "engine": eng, "served": srv, "same_text": eng["text"] == srv["text"]})
            brief = {k: {a: b for a, b in v.items() if a != "text"} if isinstance(v, dict) else v for k, v in rows[-1].items()}
            print(json.dumps(brief), file=sys.stderr)
    eng_tok, srv_tok = _median([x["engine"]["tok_s"] for x in rows]), _median([x["served"]["tok_s"] for x in rows])
    eng_ttft, srv_ttft = _median([x["engine"]["ttft_s"] for x in rows]), _median([x["served"]["ttft_s"] for x in rows])
    return {
        "rows": rows,
        "engine_tok_s": eng_tok,
        "served_tok_s": srv_tok,
        "served_vs_engine": srv_tok / eng_tok,
        "engine_ttft_s": eng_ttft,
        "served_ttft_s": srv_ttft,
        "same_text": all(x["same_text"] for x in rows),
    }


def engine_warm_ttft(args) -> float:
    """The engine's time to first token for the same chat prompts once warm (in this process, after the server
    stopped): prefill plus the first sample, the floor a served TTFT is held against."""
    import torch

    from pippin.api import load_any
    from pippin.engine.engine import Engine
    from pippin.engine.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    lm = load_any(args.model)
    engine = Engine(lm.model, max_len=2048)
    params = SamplingParams(max_new_tokens=1)
    out = []
    for r in range(args.single + 1):
        for prompt in PROMPTS[:3]:
            engine.generate_ids([lm.tokenizer.encode_chat([{"role": "user", "content": prompt}])], params)
            if r:  # round 0 warms up
                out.append(engine.last_stats.ttft_s)
    return _median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder to serve (its adapters/ are used)")
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--seconds", default="60", help="seconds per run: one value, or one per --clients entry")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--stream-interval-ms", type=float, default=None, help="the server's --stream-interval-ms (default: its own)")
    ap.add_argument("--no-prefix-cache", action="store_true", help="the server's --no-prefix-cache (served text then equals the engine's)")
    ap.add_argument("--single", type=int, default=0, help="rounds of one streamed request against `pippin generate` (0: none)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    flags = ["--model", f"bench={args.model}", "--threads", str(args.threads), "--max-batch", str(args.max_batch)]
    if args.stream_interval_ms is not None:
        flags += ["--stream-interval-ms", str(args.stream_interval_ms)]
    if args.no_prefix_cache:
        flags.append("--no-prefix-cache")
    proc, url = start_server(flags)
    try:
        models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"] if m["id"].startswith("bench")]
        print(f"models: {models}", file=sys.stderr)
        single = single_stream(url, args) if args.single else None
        runs = []
        counts = [int(c) for c in args.clients.split(",") if c]
        secs = [float(x) for x in args.seconds.split(",")]
        secs = secs * len(counts) if len(secs) == 1 else secs
        for n, sec in zip(counts, secs):
            r = asyncio.run(load(url, models, n, sec, args.max_tokens, proc.pid))
            print(json.dumps({k: v for k, v in r.items() if k != "rss_mb_samples"}), file=sys.stderr)
            runs.append(r)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report = {
        **run_header(args.threads),
        "stream_interval_ms": args.stream_interval_ms if args.stream_interval_ms is not None else ServeConfig().stream_interval_ms,
        "prefix_cache": not args.no_prefix_cache,
        "models": models,
        "single_stream": single,
        "runs": runs,
        "scaling_vs_first": {r["clients"]: r["tok_s"] / runs[0]["tok_s"] for r in runs},
    }
    if single is not None:
        single["engine_warm_ttft_s"] = engine_warm_ttft(args)
    print(json.dumps(report, indent=2, default=str))
    if args.out:
        from pippin.io import write_json_atomic

        write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
