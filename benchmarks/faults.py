"""Load and fault benchmark: `pippin serve` holds 32 streaming clients for minutes while clients misbehave.

Loopback only. Starts the server as a subprocess, then runs `--clients` streaming chat clients back to back for
`--seconds` (sampling at temperature 0.7, so replies and their lengths vary), where:
- **disconnects:** a third of the requests hang up after a random 1-20 chunks (the server must free their rows);
- **bad input:** a twentieth are invalid (an unknown adapter, a prompt past the context) and must get a 4xx;
- the rest must complete.
Reports requests completed, disconnected, refused (4xx, the injected bad input), failed otherwise (goal 0), 5xx
responses (goal 0), the rows still running afterwards (goal 0), and the server's resident memory first -> max ->
last (sampled every second; flat = no leak). A request that raises inside a batch while the others finish is a test
(tests/engine/test_scheduler.py), as is a worker loop that dies (tests/serve/test_api.py).
  python benchmarks/faults.py --model ~/.cache/pippin/models/smollm2-135m-instruct-6bit --seconds 300 --out docs/benchmarks/faults.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serving import PROMPTS, rss_mb, run_header, start_server  # noqa: E402 - the sibling benchmark


async def client(url: str, k: int, until: float, max_tokens: int, out: list) -> None:
    rng = random.Random(k)
    async with httpx.AsyncClient(timeout=600) as http:
        i = 0
        while time.perf_counter() < until:
            i += 1
            kind = rng.choices(["plain", "disconnect", "bad"], weights=[0.65, 0.3, 0.05])[0]
            model = "bench"
            messages = [{"role": "user", "content": PROMPTS[(k + i) % len(PROMPTS)]}]
            if kind == "bad":
                if rng.random() < 0.5:
                    model = "bench:no-such-adapter"
                else:
                    messages = [{"role": "user", "content": "word " * 5000}]
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.7, "stream": True}
            rec = {"kind": kind}
            try:
                async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    rec["status"] = r.status_code
                    if r.status_code != 200:
                        await r.aread()
                        out.append(rec)
                        continue
                    chunks, cut = 0, rng.randint(1, 20) if kind == "disconnect" else None
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ev = json.loads(line[6:])
                        if "error" in ev:
                            rec["stream_error"] = ev["error"].get("message", "")[:120]
                            break
                        chunks += 1
                        if cut is not None and chunks >= cut:
                            rec["disconnected"] = True
                            break  # leaving the block closes the connection mid-stream
                    rec["chunks"] = chunks
            except httpx.HTTPError as e:
                rec["transport_error"] = type(e).__name__
            out.append(rec)


async def run(url: str, args, pid: int) -> dict:
    out: list[dict] = []
    mem: list[float] = []
    t0 = time.perf_counter()
    until = t0 + args.seconds

    async def sample_memory() -> None:
        while time.perf_counter() < until + 5:
            mem.append(rss_mb(pid))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample_memory())
    await asyncio.gather(*(client(url, k, until, args.max_tokens, out) for k in range(args.clients)))
    await sampler
    async with httpx.AsyncClient(timeout=30) as http:
        health = (await http.get(f"{url}/health")).json()
        metrics = (await http.get(f"{url}/metrics")).text
    ok = [r for r in out if r.get("status") == 200 and "stream_error" not in r and "transport_error" not in r]
    failed = [r for r in out if r not in ok]
    expected_4xx = [r for r in failed if r["kind"] == "bad" and 400 <= r.get("status", 0) < 500]
    other = [r for r in failed if r not in expected_4xx]
    return {
        "clients": args.clients,
        "seconds": args.seconds,
        "requests": len(out),
        "completed": sum(1 for r in ok if not r.get("disconnected")),
        "disconnected": sum(1 for r in ok if r.get("disconnected")),
        "refused_bad_input_4xx": len(expected_4xx),
        "bad_input_sent": sum(1 for r in out if r["kind"] == "bad"),
        "failed_other": len(other),
        "failed_other_examples": other[:5],
        "server_5xx": sum(1 for r in out if r.get("status", 0) >= 500),
        "health_after": health,
        "rss_mb_first": mem[0] if mem else None,
        "rss_mb_max": max(mem) if mem else None,
        "rss_mb_last": mem[-1] if mem else None,
        "rss_mb_samples": mem[:: max(1, len(mem) // 60)],
        "running_rows_after": [line for line in metrics.splitlines() if line.startswith("pippin_running")],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder to serve")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = f"bench={os.path.expanduser(args.model)}"
    proc, url = start_server(["--model", model, "--threads", str(args.threads), "--max-batch", "16", "--max-len", "1024"])
    try:
        result = asyncio.run(run(url, args, proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report = {**run_header(args.threads), **result}
    print(json.dumps({k: v for k, v in report.items() if k != "rss_mb_samples"}, indent=2, default=str))
    if args.out:
        from pippin.io import write_json_atomic

        write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
