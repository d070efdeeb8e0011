"""What the routes call: the served base models, model-name resolution, request limits, prompts and adapters.

A `Service` holds one or more base models (the first is the default), each with its tokenizer, LoRA slots,
an AdapterStore and a BatchScheduler, all driven by one Worker thread (pippin.serve.scheduler). A request's
`model` is `base`, `base:adapter`, or a bare adapter name of the default base (as vLLM names adapters).
Every limit is checked here, before anything is queued: unknown model or adapter (404), prompt over the
context, max_tokens over the server's cap, n over the batch (400), server full (429, from the scheduler).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import jinja2

from pippin.adapters.peft_format import check_compatible, load_adapter
from pippin.adapters.store import AdapterStore, check_name
from pippin.api import attach_adapters, load_any, uses_kv8
from pippin.engine.sampling import SamplingParams
from pippin.engine.scheduler import BatchScheduler
from pippin.errors import PippinError
from pippin.model.checkpoint import LoadedModel
from pippin.model.tokenizer import Tokenizer
from pippin.serve.config import ServeConfig
from pippin.serve.metrics import Metrics, Sample
from pippin.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, ModelCard, SamplingRequest, now
from pippin.serve.scheduler import Generation, Worker


def model_not_found(message: str) -> ApiError:
    return ApiError(message, status=404, code="model_not_found", param="model")


def _text(s: str, param: str) -> str:
    """Refuse text that is not valid Unicode (JSON allows lone surrogates such as "\\ud800"; tokenizers do not)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(f"The {param} text is not valid Unicode ({e.reason} at position {e.start}).", param=param) from None
    return s


@dataclass(kw_only=True)
class Base:
    """One served base model and everything that runs it."""

    name: str
    loaded: LoadedModel
    tokenizer: Tokenizer
    store: AdapterStore
    scheduler: BatchScheduler
    created: int

    def adapter_names(self) -> list[str]:
        return sorted(set(self.store.names()) | set(self.store.loaded()))  # both take the store's lock


@dataclass(kw_only=True)
class Job:
    """A validated request, ready to queue."""

    base: Base
    adapter: str | None
    prompts: list[list[int]]
    params: SamplingParams
    n: int


def _split_spec(spec: str) -> tuple[str | None, str]:
    name, sep, path = spec.partition("=")
    return (name, path) if sep and name and "/" not in name else (None, spec)


def load_base(spec: str, config: ServeConfig, *, adapters_dir: str | os.PathLike | None = None) -> Base:
    """Load one base model ('default', a path, or NAME=PATH) with adapter slots, kernels and a scheduler."""
    name, path = _split_spec(spec)
    loaded = load_any(None if path == "default" else path, progress=True)
    if loaded.tokenizer is None:
        raise PippinError(f"{loaded.path} has no tokenizer; convert it with `pippin convert` from a source that has one.")
    store = attach_adapters(loaded, adapters_dir, n_slots=config.adapter_slots)
    store.budget_bytes = config.adapter_cache_mb << 20
    name = name or loaded.meta.get("name") or loaded.path.stem
    if ":" in name:
        raise PippinError(f"Model name {name!r} must not contain ':' (it separates base and adapter); give NAME=PATH.")
    eos = set(loaded.model.config.eos_token_ids) | set(loaded.tokenizer.eos_ids)
    sched = BatchScheduler(
        loaded.model,
        max_batch=config.max_batch,
        max_len=config.max_len,
        max_queue=config.max_queue,
        adapters=store,
        eos_ids=sorted(eos),
        kv8=uses_kv8(loaded),
        kernels=config.kernels,
        reuse_prefix=config.prefix_cache,
    )
    return Base(name=name, loaded=loaded, tokenizer=loaded.tokenizer, store=store, scheduler=sched, created=now())


class Service:
    def __init__(self, config: ServeConfig, bases: list[Base], *, worker: Worker | None = None) -> None:
        if not bases:
            raise PippinError("The server needs at least one model.")
        names = [b.name for b in bases]
        if len(set(names)) != len(names):
            raise PippinError(f"Two models share a name ({names}); name them with NAME=PATH.")
        self.config = config
        self.bases = {b.name: b for b in bases}
        self.default = bases[0]
        self.metrics = Metrics(self.gauges)
        self.worker = worker or Worker([], request_timeout_s=config.request_timeout_s)
        self.worker.serve([b.scheduler for b in bases])

    @classmethod
    def from_config(cls, config: ServeConfig) -> Service:
        """Load every model on the worker thread, which then runs them. All of the models' OpenMP work then comes from
        one thread, so libgomp keeps one team of threads, as many as the cores, and its barriers spin. Loading on the
        main thread made a second team: libgomp then manages more threads than cores, sleeps at every barrier of the
        ops outside the fused step, and served decode lost about a tenth (docs/benchmarks.md)."""

        def load() -> list[Base]:
            return [load_base(m, config, adapters_dir=config.adapters_dir if i == 0 else None) for i, m in enumerate(config.models)]

        worker = Worker([], request_timeout_s=config.request_timeout_s)
        worker.start()
        try:
            bases = worker.call(load).result()
            return cls(config, bases, worker=worker)
        except BaseException:
            worker.stop()
            raise

    def warm_up(self) -> None:
        """One short chat request per base model, on the worker before the port opens: the first client gets the served
        speed, not the kernels' first-call costs."""

        def run() -> None:
            for b in self.bases.values():
                b.scheduler.warm_up(b.tokenizer.encode_chat([{"role": "user", "content": "Say hello in one short sentence."}]))

        self.worker.call(run).result()

    def start(self) -> None:
        self.worker.start()

    def close(self) -> None:
        self.worker.stop()

    # --- models -------------------------------------------------------------------------------------

    def resolve(self, model: str) -> tuple[Base, str | None]:
        """`base`, `base:adapter` or a bare adapter of the default base -> (base, adapter or None)."""
        if model in self.bases:
            return self.bases[model], None
        if model == "default":
            return self.default, None
        base_name, sep, adapter = model.partition(":")
        if sep:
            base = self.bases.get(base_name)
            if base is None:
                raise model_not_found(f"Unknown base model {base_name!r} in {model!r}; available: {', '.join(self.bases)}.")
        else:
            base, adapter = self.default, model
        if adapter in base.adapter_names():
            return base, adapter
        known = ", ".join(base.adapter_names()[:20]) or "none"
        raise model_not_found(
            f"The model {model!r} does not exist: no base of that name and no adapter {adapter!r} for {base.name} "
            f"(adapters: {known}). GET /v1/models lists what is served."
        )

    def models(self) -> list[ModelCard]:
        cards = []
        for b in self.bases.values():
            cards.append(ModelCard(id=b.name, created=b.created, root=b.name, max_model_len=b.scheduler.max_len))
            for a in b.adapter_names():
                cards.append(
                    ModelCard(id=f"{b.name}:{a}", created=b.created, root=b.name, parent=b.name, max_model_len=b.scheduler.max_len)
                )
        return cards

    # --- requests -------------------------------------------------------------------------------------

    def _params(self, req: SamplingRequest, max_tokens: int | None, n_prompt: int, max_len: int) -> SamplingParams:
        if max_tokens is not None and max_tokens > self.config.max_new_tokens:
            raise ApiError(
                f"max_tokens is {max_tokens}, over this server's limit of {self.config.max_new_tokens}; ask for fewer.", param="max_tokens"
            )
        if max_tokens is None:
            max_tokens = min(self.config.default_max_tokens, self.config.max_new_tokens, max_len - n_prompt)
        if n_prompt + max_tokens > max_len:
            raise ApiError(
                f"This model's context is {max_len} tokens, but the prompt has {n_prompt} tokens and max_tokens is {max_tokens}; "
                "shorten the prompt or lower max_tokens.",
                code="context_length_exceeded",
                param="max_tokens",
            )
        temperature = 1.0 if req.temperature is None else req.temperature
        return SamplingParams(
            max_new_tokens=max_tokens,
            # As vLLM: a temperature this close to 0 is greedy (dividing by it would overflow). Any top_p keeps at
            # least the most likely token (pippin.engine.sampling).
            temperature=0.0 if temperature < 1e-5 else temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            seed=req.seed,
            stop=req.stops,
            ignore_eos=req.ignore_eos,
        )

    def _check_prompts(self, base: Base, prompts: list[list[int]], n: int) -> None:
        limit = min(self.config.prompt_limit, base.scheduler.max_len - 1)
        for p in prompts:
            if not p:
                raise ApiError("The prompt is empty; give at least one token of text.", param="prompt")
            if len(p) > limit:
                raise ApiError(
                    f"The prompt has {len(p)} tokens, over this server's limit of {limit}; shorten it.",
                    code="context_length_exceeded",
                    param="messages",
                )
        self._check_rows(base, len(prompts), n)

    def _check_rows(self, base: Base, n_prompts: int, n: int) -> None:
        if n * n_prompts > base.scheduler.max_batch:
            raise ApiError(
                f"This request needs {n * n_prompts} rows (n x prompts) but the server generates at most {base.scheduler.max_batch} "
                "at once; lower n or send fewer prompts.",
                param="n",
            )

    def prepare_chat(self, req: ChatCompletionRequest) -> Job:
        base, adapter = self.resolve(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.text, "messages")} for m in req.messages]
        _text("".join(req.stops), "stop")
        self._check_rows(base, 1, req.n)
        try:
            ids = base.tokenizer.encode_chat(messages, raw=self.config.raw_special_tokens)
        except jinja2.TemplateError as e:  # a template may refuse e.g. roles out of order
            raise ApiError(f"The model's chat template refused these messages: {e}", param="messages") from None
        self._check_prompts(base, [ids], req.n)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = self._params(req, max_tokens, len(ids), base.scheduler.max_len)
        return Job(base=base, adapter=adapter, prompts=[ids], params=params, n=req.n)

    def prepare_completion(self, req: CompletionRequest) -> Job:
        base, adapter = self.resolve(req.model)
        vocab = base.loaded.model.config.vocab_size
        prompts = []
        _text("".join(req.stops), "stop")
        self._check_rows(base, len(req.prompts), req.n)  # before tokenizing: 100k prompts must not occupy a worker
        for p in req.prompts:
            if isinstance(p, str):
                prompts.append(base.tokenizer.encode(_text(p, "prompt")))
            else:
                if any(not 0 <= t < vocab for t in p):
                    raise ApiError(f"Token ids in the prompt must be in [0, {vocab}).", param="prompt")
                prompts.append(list(p))
        self._check_prompts(base, prompts, req.n)
        params = self._params(req, req.max_tokens, max(map(len, prompts)), base.scheduler.max_len)
        return Job(base=base, adapter=adapter, prompts=prompts, params=params, n=req.n)

    async def generate(self, job: Job) -> Generation:
        """Queue a prepared job; raises SchedulerFull (429) or ApiError."""
        if job.adapter is not None:  # load and validate now (400 before any streaming), cached for the worker
            await asyncio.to_thread(job.base.store.get, job.adapter)
        gen = Generation(
            loop=asyncio.get_running_loop(),
            tokenizer=job.base.tokenizer,
            stop=job.params.stop,
            n=job.n,
            prompt_tokens=[len(p) for p in job.prompts],
            metrics=self.metrics,
            interval_s=self.config.stream_interval_ms / 1000,
        )
        self.worker.submit(job.base.scheduler, job.prompts, job.params, adapter=job.adapter, n=job.n, gen=gen)
        return gen

    # --- runtime adapters (vLLM's endpoints) ----------------------------------------------------------

    def _base_for_adapter(self, name: str) -> tuple[Base, str]:
        base_name, sep, adapter = name.partition(":")
        if not sep:
            return self.default, name
        if base_name not in self.bases:
            raise model_not_found(f"Unknown base model {base_name!r}; available: {', '.join(self.bases)}.")
        return self.bases[base_name], adapter

    async def load_adapter(self, name: str, path: str) -> str:
        if not self.config.runtime_adapters:
            raise ApiError(
                "Loading adapters at runtime is turned off on this server (on by default only for a loopback host; "
                "start it with --runtime-adapters).",
                status=403,
            )
        base, adapter = self._base_for_adapter(name)
        check_name(adapter)
        if adapter in base.adapter_names():
            raise ApiError(f"An adapter named {adapter!r} already exists on {base.name}; unload it first or pick another name.")
        folder = Path(path).expanduser().resolve()
        roots = [Path(r).expanduser().resolve() for r in ([base.store.root] if base.store.root else []) + self.config.adapter_roots]
        if not any(folder.is_relative_to(r) for r in roots):  # checked before existence: no probing of the server's disk
            raise ApiError(
                f"lora_path must lie inside an adapter root of this server ({', '.join(map(str, roots)) or 'none'}); "
                "start it with --adapter-root DIR to allow another.",
                status=403,
                param="lora_path",
            )
        if not folder.is_dir():
            raise ApiError(f"No adapter folder at {path} on the server.", param="lora_path")

        def load() -> None:  # on the worker thread: registering may touch model slots
            if adapter in base.adapter_names():  # a concurrent load of the same name won the race
                raise ApiError(f"An adapter named {adapter!r} already exists on {base.name}; unload it first or pick another name.")
            loaded = load_adapter(folder, name=adapter)
            check_compatible(loaded, base.loaded.model, fingerprint=base.store.fingerprint)
            base.store.add(adapter, folder)
            base.store.put(loaded)

        await asyncio.wrap_future(self.worker.call(load))
        return f"{base.name}:{adapter}"

    async def unload_adapter(self, name: str) -> str:
        if not self.config.runtime_adapters:
            raise ApiError(
                "Unloading adapters at runtime is turned off on this server (on by default only for a loopback host; "
                "start it with --runtime-adapters).",
                status=403,
            )
        base, adapter = self._base_for_adapter(name)
        if adapter not in base.adapter_names():
            raise model_not_found(f"No adapter {adapter!r} on {base.name}.")

        def unload() -> None:
            busy = base.scheduler.uses_adapter(adapter)
            if busy:
                raise ApiError(f"Adapter {adapter!r} is in use by {busy} request(s); retry when they finish.", status=409)
            base.store.remove(adapter)  # a runtime-loaded name is unregistered; root folders stay servable
            base.scheduler.forget_prefixes(adapter)  # the name may come back with other weights

        await asyncio.wrap_future(self.worker.call(unload))
        return f"{base.name}:{adapter}"

    # --- health and metrics ---------------------------------------------------------------------------

    def health(self) -> dict:
        return {
            "status": "ok" if self.worker.alive else "down",
            "models": list(self.bases),
            "running": sum(b.scheduler.n_running for b in self.bases.values()),
            "waiting": sum(b.scheduler.n_waiting for b in self.bases.values()),
        }

    def gauges(self) -> list[Sample]:
        out: list[Sample] = []
        for b in self.bases.values():
            s, st, lab = b.scheduler, b.store.stats, {"model": b.name}
            kv = s.cache.nbytes
            adapter_bytes, n_loaded = b.store.memory_bytes, len(b.store.loaded())
            out += [
                ("pippin_queue_depth", lab, s.n_waiting),
                ("pippin_running", lab, s.n_running),
                ("pippin_batch_size", lab, s.stats.last_batch),
                ("pippin_max_batch", lab, s.max_batch),
                ("pippin_kv_cache_bytes", lab, kv),
                ("pippin_decode_steps_total", lab, s.stats.steps),
                ("pippin_busy_seconds_total", lab, round(s.stats.busy_s, 3)),
                ("pippin_prefix_reused_tokens_total", lab, s.stats.reused_tokens),
                ("pippin_adapter_cache_hits_total", lab, st.hits),
                ("pippin_adapter_cache_misses_total", lab, st.misses),
                ("pippin_adapter_swaps_total", lab, st.swaps),
                ("pippin_adapter_evictions_total", lab, st.evictions),
                ("pippin_adapter_memory_bytes", lab, adapter_bytes),
                ("pippin_adapters_loaded", lab, n_loaded),
            ]
        return out
