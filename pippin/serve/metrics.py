"""Server metrics for GET /metrics, kept and rendered by `prometheus_client`: counters, histograms and gauges.

Each `Metrics` has its own `CollectorRegistry`, not the process-wide default one, so that several servers in one
process (the tests start many) each report only their own numbers. Requests and tokens are recorded from the event
loop and the worker thread (prometheus_client's metrics are thread-safe). Gauges that describe the engine (queue
depth, running rows, adapter cache, memory) are read at scrape time from a callback, so they are never stale;
process memory and CPU come from prometheus_client's `ProcessCollector` (Linux). Names follow Prometheus
conventions (`_total` counters, `_seconds` histograms, base units); counters and histograms also carry the
library's `_created` timestamps.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOK_S_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 400, 800)
SNAPSHOT_S = 0.1  # one (time, tokens) snapshot per 100 ms at most for the tok/s gauge

Sample = tuple[str, dict[str, str], float]
"""(metric name, labels, value): one sample read at scrape time; a name ending in `_total` is a counter."""


class _ScrapeTime(Collector):
    """The engine's samples, grouped into one metric family per name, each time the registry is collected."""

    def __init__(self, samples: Callable[[], list[Sample]]) -> None:
        self.samples = samples

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for name, labels, value in self.samples():
            if name not in families:
                kind = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
                families[name] = kind(name, GAUGE_HELP.get(name, name), labels=list(labels))
            families[name].add_metric(list(labels.values()), value)
        yield from families.values()


class Metrics:
    """Everything GET /metrics shows. `gauges` returns engine-side samples at scrape time."""

    def __init__(self, gauges: Callable[[], list[Sample]] | None = None, *, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "pippin_requests_total", "HTTP requests to the API by endpoint and status code.", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("pippin_prompt_tokens_total", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("pippin_generation_tokens_total", "Tokens generated and sent.", registry=r)
        self.ttft = Histogram(
            "pippin_time_to_first_token_seconds",
            "Time from request to its first token (queue + prefill).",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "pippin_request_latency_seconds", "Time from request to its last token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.request_tok_s = Histogram(
            "pippin_request_decode_tokens_per_second", "Per-request decode speed after the first token.", buckets=TOK_S_BUCKETS, registry=r
        )
        tok_s = Gauge("pippin_generation_tokens_per_second", f"Generated tokens per second over the last {window_s:.0f} s.", registry=r)
        tok_s.set_function(self.tokens_per_second)
        started = time.time()
        Gauge("pippin_uptime_seconds", "Seconds since the server started.", registry=r).set_function(lambda: time.time() - started)
        ProcessCollector(namespace="pippin", registry=r)  # pippin_process_resident_memory_bytes, ..._cpu_seconds_total, ...
        if gauges is not None:
            r.register(_ScrapeTime(gauges))
        # (time, tokens so far) snapshots at least SNAPSHOT_S apart: maxlen of them span the window, and bound the
        # memory however long the server runs without a scrape.
        self._recent: deque[tuple[float, int]] = deque(maxlen=int(window_s / SNAPSHOT_S) + 2)
        self._n_generated = 0
        self._lock = threading.Lock()

    def request_done(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def tokens(self, n: int = 1) -> None:
        self.generation_tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            if not self._recent or now - self._recent[-1][0] > SNAPSHOT_S:
                self._recent.append((now, self._n_generated))
            self._n_generated += n

    def generation_done(self, *, prompt_tokens: int, ttft_s: float | None, total_s: float, completion_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
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
            return (self._n_generated - n0) / max(now - t0, 1e-3)

    def render(self) -> bytes:
        """The Prometheus text exposition of this server's registry (serve it as `CONTENT_TYPE`)."""
        return generate_latest(self.registry)


GAUGE_HELP = {
    "pippin_queue_depth": "Samples waiting for a free row.",
    "pippin_running": "Rows generating now.",
    "pippin_batch_size": "Rows in the last decode step.",
    "pippin_max_batch": "Rows generated at once at most.",
    "pippin_kv_cache_bytes": "Memory of the preallocated KV cache.",
    "pippin_decode_steps_total": "Decode steps run.",
    "pippin_busy_seconds_total": "Time the model spent in prefill and decode (its rate is the utilisation).",
    "pippin_prefix_reused_tokens_total": "Prompt tokens taken from a prefix already in the cache instead of prefilled.",
    "pippin_adapter_cache_hits_total": "Adapter lookups answered from memory.",
    "pippin_adapter_cache_misses_total": "Adapter lookups that read the adapter from disk.",
    "pippin_adapter_swaps_total": "Adapters copied into a model slot.",
    "pippin_adapter_evictions_total": "Adapters dropped from memory past the cache budget.",
    "pippin_adapter_memory_bytes": "Memory of the adapters loaded.",
    "pippin_adapters_loaded": "Adapters held in memory.",
}
