"""Server metrics in the Prometheus text format (no client library): counters, gauges and histograms.

`Metrics` is written from the event loop and the worker thread (under a lock) and rendered by
GET /metrics. Gauges that describe the engine (queue depth, running rows, adapter cache, memory) are
read at scrape time from a callback, so they are never stale. Names follow Prometheus conventions
(`_total` counters, `_seconds` histograms, base units).
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOK_S_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 400, 800)

Sample = tuple[str, dict[str, str], float]
"""(metric name, labels, value): one line of a gauge read at scrape time."""


class Histogram:
    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for bound, c in zip(self.bounds, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{bound}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]
        return out


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels.items())
    return "{" + body + "}"


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.6g}"


def resident_memory_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Metrics:
    """Everything GET /metrics shows. `gauges` returns engine-side samples at scrape time."""

    def __init__(self, gauges: Callable[[], list[Sample]] | None = None, *, window_s: float = 10.0) -> None:
        self.gauges = gauges
        self.window_s = window_s
        self.started = time.time()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.request_tok_s = Histogram(TOK_S_BUCKETS)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens so far) snapshots for the tok/s gauge
        self._lock = threading.Lock()

    def request_done(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def tokens(self, n: int = 1) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._recent or now - self._recent[-1][0] > 0.1:  # a snapshot per 100 ms for the tok/s gauge
                self._recent.append((now, self.generation_tokens))
                while now - self._recent[0][0] > self.window_s:  # bounded whether or not /metrics is scraped
                    self._recent.popleft()
            self.generation_tokens += n

    def generation_done(self, *, prompt_tokens: int, ttft_s: float | None, total_s: float, completion_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
                decode_s = total_s - ttft_s
                if completion_tokens > 1 and decode_s > 0:
                    self.request_tok_s.observe((completion_tokens - 1) / decode_s)
            self.latency.observe(total_s)

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last `window_s`, all requests together."""
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0][0] > self.window_s:
                self._recent.popleft()
            if not self._recent:
                return 0.0
            t0, n0 = self._recent[0]
            return (self.generation_tokens - n0) / max(now - t0, 1e-3)

    def render(self) -> str:
        tok_s = self.tokens_per_second()
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])

        with self._lock:
            head("pippin_requests_total", "counter", "HTTP requests to the API by endpoint and status code.")
            for (ep, status), n in sorted(self.requests.items()):
                out.append(f"pippin_requests_total{_labels({'endpoint': ep, 'status': str(status)})} {n}")
            head("pippin_prompt_tokens_total", "counter", "Prompt tokens of finished requests.")
            out.append(f"pippin_prompt_tokens_total {self.prompt_tokens}")
            head("pippin_generation_tokens_total", "counter", "Tokens generated and sent.")
            out.append(f"pippin_generation_tokens_total {self.generation_tokens}")
            for name, hist, text in (
                ("pippin_time_to_first_token_seconds", self.ttft, "Time from request to its first token (queue + prefill)."),
                ("pippin_request_latency_seconds", self.latency, "Time from request to its last token."),
                ("pippin_request_decode_tokens_per_second", self.request_tok_s, "Per-request decode speed after the first token."),
            ):
                head(name, "histogram", text)
                out += hist.lines(name)
        head("pippin_generation_tokens_per_second", "gauge", f"Generated tokens per second over the last {self.window_s:.0f} s.")
        out.append(f"pippin_generation_tokens_per_second {tok_s:.3f}")
        head("pippin_process_resident_memory_bytes", "gauge", "Resident memory of the server process.")
        out.append(f"pippin_process_resident_memory_bytes {resident_memory_bytes()}")
        head("pippin_uptime_seconds", "gauge", "Seconds since the server started.")
        out.append(f"pippin_uptime_seconds {time.time() - self.started:.1f}")
        seen: set[str] = set()
        for name, labels, value in self.gauges() if self.gauges else []:
            if name not in seen:
                seen.add(name)
                kind = "counter" if name.endswith("_total") else "gauge"
                head(name, kind, GAUGE_HELP.get(name, name))
            out.append(f"{name}{_labels(labels)} {_number(value)}")
        return "\n".join(out) + "\n"


GAUGE_HELP = {
    "pippin_queue_depth": "Samples waiting for a free row.",
    "pippin_running": "Rows generating now.",
    "pippin_batch_size": "Rows in the last decode step.",
    "pippin_max_batch": "Rows generated at once at most.",
    "pippin_kv_cache_bytes": "Memory of the preallocated KV cache.",
    "pippin_decode_steps_total": "Decode steps run.",
    "pippin_busy_seconds_total": "Time the model spent in prefill and decode (its rate is the utilisation).",
    "pippin_adapter_cache_hits_total": "Adapter lookups answered from memory.",
    "pippin_adapter_cache_misses_total": "Adapter lookups that read the adapter from disk.",
    "pippin_adapter_swaps_total": "Adapters copied into a model slot.",
    "pippin_adapter_evictions_total": "Adapters dropped from memory past the cache budget.",
    "pippin_adapter_memory_bytes": "Memory of the adapters loaded.",
    "pippin_adapters_loaded": "Adapters held in memory.",
}
