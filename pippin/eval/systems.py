"""Systems under test (and judges): anything that turns chat conversations into replies.

A `System` has a `spec` (the string that named it, recorded in every result), an `identity` (what cache keys
use: the spec plus a fingerprint of the weights, so a retrained adapter never reuses stale generations) and
`generate(conversations, params) -> list[str]`, which raises on failure; a system that can also answer in a
forced form (pippin.eval.forms) has `fill(conversations, forms) -> list[Filled]`. Two kinds:
- `PippinSystem`: a pippin model (full, compressed, optionally one LoRA adapter), batched through the Engine.
- `OpenAISystem`: any OpenAI-compatible `/v1/chat/completions` endpoint (pippin's server, llama.cpp's server,
  vLLM, a remote API), over the standard library's urllib with timeouts and retries with backoff.
Specs: `pippin:default`, `pippin:default:ADAPTER`, `pippin:/path/model`, `pippin:/path/model:ADAPTER` (an adapter
name under <model>/adapters or an adapter folder), `openai:http://host:port/v1#model-name`. A model path that
itself contains ':' cannot be named this way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pippin.engine.sampling import SamplingParams
from pippin.errors import PippinError

if TYPE_CHECKING:
    from pippin.engine.engine import Engine
    from pippin.eval.forms import AnswerForm, Filled
    from pippin.model.tokenizer import Tokenizer

Message = dict[str, str]
"""One chat message: {"role": "system" | "user" | "assistant", "content": str}."""


class EndpointError(PippinError):
    """A system could not be reached (or kept failing) after every retry; the whole batch is lost, not one row."""


@runtime_checkable
class System(Protocol):
    spec: str
    identity: str

    def generate(self, conversations: Sequence[Sequence[Message]], params: SamplingParams) -> list[str]:
        """One reply per conversation, in order; raises PippinError (EndpointError when unreachable)."""
        ...


def can_fill(system: System) -> bool:
    """Whether a system answers in forced forms (`fill(conversations, forms)`); pippin models do, endpoints do not."""
    return callable(getattr(system, "fill", None))


def sampling_dict(params: SamplingParams) -> dict:
    """The sampling settings as plain JSON (recorded with every generation and in every report)."""
    return {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
        "repetition_penalty": params.repetition_penalty,
        "seed": params.seed,
        "stop": list(params.stop),
        "ignore_eos": params.ignore_eos,
    }


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first stop string (which is not returned)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return text[:cut] if cut >= 0 else text


def _fingerprint(paths: Sequence[Path]) -> str:
    """Cheap identity of a file or a folder's top-level files: path, size and mtime (no hashing of gigabytes)."""
    h = hashlib.sha256()
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.iterdir() if p.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class PippinSystem:
    """A pippin model in an Engine, optionally with one LoRA adapter applied to every row.

    Conversations go through the model's chat template and are generated `batch_size` rows at a time. Greedy
    replies do not depend on the batching; sampled ones do (the rows of a batch share one seeded generator).
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        *,
        spec: str,
        adapter: str | None = None,
        batch_size: int = 8,
        identity: str | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.spec = spec
        self.adapter = adapter
        self.batch_size = batch_size
        self.identity = identity or spec

    @classmethod
    def load(
        cls,
        model: str | None = None,
        *,
        adapter: str | None = None,
        spec: str | None = None,
        batch_size: int = 8,
        threads: int | None = None,
    ) -> PippinSystem:
        """Load a model (None = the default) with LoRA slots when an adapter is named; the adapter is validated now."""
        from pippin.api import load_engine
        from pippin.model.checkpoint import default_gguf_path

        engine, tok = load_engine(model, max_batch=batch_size, threads=threads, adapters=adapter is not None)
        name = adapter
        if adapter is not None and Path(adapter).is_dir():  # an adapter folder: register it under its folder name
            name = Path(adapter).name
            engine.adapters.add(name, adapter)
        paths = [Path(model).expanduser() if model is not None else default_gguf_path()]
        if name is not None:
            engine.adapters.get(name)
            paths.append(engine.adapters.path_of(name))
        spec = spec or f"pippin:{model or 'default'}" + (f":{adapter}" if adapter else "")
        return cls(engine, tok, spec=spec, adapter=name, batch_size=batch_size, identity=f"{spec}@{_fingerprint(paths)}")

    def generate(self, conversations: Sequence[Sequence[Message]], params: SamplingParams) -> list[str]:
        prompts = [self.tokenizer.encode_chat(list(c)) for c in conversations]
        for ids in prompts:  # refuse before any work, with the engine's own message
            self.engine.check_prompt(len(ids), params.max_new_tokens)
        out: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i : i + self.batch_size]
            ids = self.engine.generate_ids(chunk, params, adapters=[self.adapter] * len(chunk))
            out += [cut_at_stop(self.tokenizer.decode(r), params.stop) for r in ids]
        return out

    def fill(self, conversations: Sequence[Sequence[Message]], forms: Sequence[AnswerForm]) -> list[Filled]:
        """Each conversation's answer in its form, by forced choice (pippin.engine.constrained)."""
        from pippin.engine.constrained import choose
        from pippin.eval.forms import Filled

        out = []
        for conv, form in zip(conversations, forms, strict=True):
            segments = [
                self.tokenizer.encode(p, add_bos=False)
                if isinstance(p, str)
                else [self.tokenizer.encode(o, add_bos=False) for o in p.options]
                for p in form.parts
            ]
            chosen = choose(self.engine, self.tokenizer.encode_chat(list(conv)), segments, adapter=self.adapter)
            out.append(Filled(form.render([c.index for c in chosen]), [c.probs for c in chosen]))
        return out


class OpenAISystem:
    """An OpenAI-compatible chat-completions endpoint; requests run `concurrency` at a time."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        spec: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        concurrency: int = 4,
    ) -> None:
        if not re.match(r"^https?://", base_url):
            raise PippinError(f"Endpoint URL {base_url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1).")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.spec = spec or f"openai:{base_url}" + (f"#{model}" if model else "")
        self.identity = self.spec
        self.api_key = api_key if api_key is not None else os.environ.get("PIPPIN_EVAL_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.concurrency = max(1, concurrency)

    def body(self, messages: Sequence[Message], params: SamplingParams) -> dict:
        """The request JSON: the standard fields, plus llama.cpp/vLLM extras only when they differ from off."""
        body: dict = {
            "messages": list(messages),
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if self.model:
            body["model"] = self.model
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.top_k:
            body["top_k"] = params.top_k
        if params.min_p:
            body["min_p"] = params.min_p
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        return body

    def _post(self, body: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as r:
            reply = json.loads(r.read().decode("utf-8"))
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"no choices[0].message.content in the reply: {json.dumps(reply)[:200]}") from None
        if not isinstance(content, str):
            raise ValueError(f"choices[0].message.content is {type(content).__name__}, not a string")
        return content

    def chat(self, messages: Sequence[Message], params: SamplingParams) -> str:
        """One completion, retried on connection errors, timeouts, HTTP 408/429/5xx and malformed replies."""
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._post(self.body(messages, params))
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code not in (408, 429) and e.code < 500:  # the request itself is wrong: retrying cannot help
                    raise PippinError(f"{self.url} refused the request with HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, OSError, ValueError) as e:  # refused, DNS, timeout, bad JSON
                reason = getattr(e, "reason", e)  # URLError wraps the socket error
                last = f"{type(reason).__name__ if isinstance(reason, BaseException) else type(e).__name__}: {reason}"
        raise EndpointError(
            f"{self.url} failed after {self.retries + 1} attempts ({last}); check that the server is up and the URL is right."
        )

    def generate(self, conversations: Sequence[Sequence[Message]], params: SamplingParams) -> list[str]:
        if len(conversations) <= 1 or self.concurrency == 1:
            return [self.chat(c, params) for c in conversations]
        with ThreadPoolExecutor(min(self.concurrency, len(conversations))) as pool:
            return list(pool.map(lambda c: self.chat(c, params), conversations))


@dataclass(frozen=True, kw_only=True)
class SystemSpec:
    """A parsed system spec string."""

    text: str
    kind: str
    """"pippin" or "openai"."""
    model: str | None = None
    """pippin: a model folder or .gguf (None = the default model); openai: the model name sent, if any."""
    adapter: str | None = None
    url: str | None = None


SPEC_FORMS = "pippin:default, pippin:default:ADAPTER, pippin:/path/model[:ADAPTER] or openai:http://host:port/v1#model-name"


def parse_spec(text: str) -> SystemSpec:
    """Parse a spec string (see the module docstring); raises PippinError naming the accepted forms."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise PippinError(f"System spec {text!r} is not understood; use {SPEC_FORMS}.")
    if kind == "openai":
        url, _, model = rest.partition("#")
        if not re.match(r"^https?://[^/]", url):
            raise PippinError(f"System spec {text!r}: the endpoint must be an http(s) URL, e.g. openai:http://127.0.0.1:8000/v1#model.")
        return SystemSpec(text=text, kind="openai", url=url, model=model or None)
    if kind == "pippin":
        model, _, adapter = rest.partition(":")
        if not model or (_ and not adapter):
            raise PippinError(f"System spec {text!r}: name a model and optionally an adapter, e.g. pippin:default:summarize.")
        return SystemSpec(text=text, kind="pippin", model=None if model == "default" else model, adapter=adapter or None)
    raise PippinError(f"System spec {text!r}: unknown kind {kind!r}; use {SPEC_FORMS}.")


def load_system(
    text: str,
    *,
    batch_size: int = 8,
    threads: int | None = None,
    timeout_s: float = 120.0,
    retries: int = 3,
    backoff_s: float = 1.0,
) -> System:
    """The System a spec names (a pippin model is loaded now; an endpoint is not contacted until used)."""
    spec = parse_spec(text)
    if spec.kind == "openai":
        return OpenAISystem(
            spec.url, spec.model, spec=text, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, concurrency=batch_size
        )
    try:
        return PippinSystem.load(spec.model, adapter=spec.adapter, spec=text, batch_size=batch_size, threads=threads)
    except PippinError as e:
        raise PippinError(f"System {text}: {e}") from None
