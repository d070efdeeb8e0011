"""ServeConfig: every knob of `pippin serve` in one dataclass, limits included.

The limits are explicit so that a request past one gets a clear 400 or 429 at once instead of a hang:
rows generated at once, samples waiting for a row, prompt and output lengths, and the request body size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pippin.errors import PippinError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(kw_only=True)
class ServeConfig:
    models: list[str] = field(default_factory=lambda: ["default"])
    """Base models to serve: a path, 'default', or NAME=PATH to choose the name clients use; the first is the default."""
    adapters_dir: str | None = None
    """Where named adapters live (default: <model folder>/adapters); applies to the first model."""
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    """Rows generated at once per base model (the concurrency limit; n > 1 takes n rows)."""
    max_queue: int = 32
    """Samples that may wait for a free row; past max_batch + max_queue a request gets 429."""
    max_len: int = 2048
    """Context per row in tokens (prompt plus output): the KV cache holds max_batch * max_len tokens."""
    max_prompt_tokens: int | None = None
    """Longest prompt accepted; None: max_len - 1."""
    max_new_tokens: int = 1024
    """Largest max_tokens a request may ask for."""
    default_max_tokens: int = 256
    """max_tokens when a request does not say (capped by what is left of the context)."""
    request_timeout_s: float | None = 600.0
    """Each request's deadline from its arrival: one still waiting for a row then gets 503, a running one ends with the
    text it has (finish_reason 'length'). None: no deadline."""
    max_body_bytes: int = 4 << 20
    """Largest request body; larger ones get 413."""
    adapter_slots: int = 9
    """LoRA slots in the model: adapters in one batch is adapter_slots - 1."""
    adapter_cache_mb: int = 256
    """Memory for loaded adapters (least recently used are dropped past it)."""
    adapter_roots: list[str] = field(default_factory=list)
    """Folders (besides each model's own adapters folder) that runtime-loaded adapters may come from."""
    runtime_adapters: bool = False
    """Allow POST /v1/load_lora_adapter with a server-side path (vLLM's runtime LoRA updating)."""
    raw_special_tokens: bool = False
    """Let special-token strings in chat messages through as control tokens (off: they are plain text, so a user cannot
    open or close turns)."""
    api_key: str | None = field(default=None, repr=False)
    """When set, every /v1 request must send `Authorization: Bearer <api_key>` (401 otherwise), as vLLM's and llama.cpp's
    servers do; the page, /health and /metrics stay open. None: no key (fine on loopback, not on a shared network)."""
    stream_interval_ms: float = 20.0
    """A streamed choice sends its text at most this often (the first text and the end go at once): fewer, larger
    chunks cost the server and the client less per token, which on a shared CPU the model's threads get back (vLLM's
    stream_interval, in time). 0: one chunk per token."""
    prefix_cache: bool = True
    """Start each prompt from the longest prefix of it that a cache row already holds (a chat's earlier turns, the
    system prompt): only the rest is prefilled (BatchScheduler.reuse_prefix)."""
    kernels: bool = True
    """Use pippin's CPU kernels."""
    threads: int | None = None
    """Torch threads for the model (None: PyTorch's choice)."""

    def __post_init__(self) -> None:
        checks = [
            (bool(self.models), "give at least one model"),
            (self.max_batch >= 1, "max_batch must be >= 1"),
            (self.max_queue >= 0, "max_queue must be >= 0"),
            (self.max_len >= 2, "max_len must be >= 2"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.default_max_tokens >= 1, "default_max_tokens must be >= 1"),
            (self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "max_prompt_tokens must be >= 1"),
            (self.adapter_slots >= 2, "adapter_slots must be >= 2 (slot 0 is the base)"),
            (0 < self.port < 65536 or self.port == 0, "port must be in 0..65535"),
            (self.api_key is None or len(self.api_key) >= 8, "an API key needs at least 8 characters"),
            (self.request_timeout_s is None or self.request_timeout_s > 0, "request_timeout_s must be > 0 (None: no deadline)"),
            (0 <= self.stream_interval_ms <= 1000, "stream_interval_ms must be in 0..1000"),
        ]
        for ok, msg in checks:
            if not ok:
                raise PippinError(f"Invalid server settings: {msg}.")

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    @property
    def prompt_limit(self) -> int:
        return min(self.max_prompt_tokens or self.max_len - 1, self.max_len - 1)
