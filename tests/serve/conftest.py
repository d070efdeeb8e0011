"""A live server on 127.0.0.1 (a random free port, uvicorn in a thread) over a tiny model folder.

The tiny model (vocab 256) comes with a 256-token ASCII tokenizer and a small chat template, so every test
runs real HTTP, real tokenization and real generation in milliseconds. Two adapters ("summarize",
"polite") sit in its adapters/ folder. `paused(service)` holds the worker thread between steps, so tests
of limits and disconnects do not race the (fast) model.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from pippin.adapters.lora import LoraConfig, apply_lora
from pippin.adapters.peft_format import save_adapter
from pippin.model.checkpoint import LoadedModel, save_pippin
from pippin.model.tokenizer import Tokenizer
from pippin.serve.config import ServeConfig
from tests.adapters.test_lora import random_adapter
from tests.conftest import tiny_model

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def ascii_tokenizer() -> Tokenizer:
    """256 tokens that all decode to readable ASCII: 96 characters plus 160 two-letter merges, and a small chat template."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    merges = [(a, b) for a in "etaoinsh" for b in "etaoinshrdlucmfwypgb"]
    vocab = {t: i for i, t in enumerate(chars + [a + b for a, b in merges])}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, chat_template=TEMPLATE, special={})


def make_tiny_folder(path: Path) -> Path:
    """A pippin checkpoint of tiny_model() with the byte tokenizer, and two adapters next to it."""
    model = tiny_model(0)
    model.config.eos_token_ids = []  # random weights: end by length or stop strings only, never by chance
    with torch.no_grad():  # a flatter distribution than tiny_model's (which mostly repeats the last token)
        model.embed_tokens.weight.mul_(0.3)
    save_pippin(LoadedModel(model=model, tokenizer=ascii_tokenizer(), path=path, meta={"name": "tiny"}), path)
    shaped = tiny_model(0)
    apply_lora(shaped, LoraConfig(rank=4), n_slots=2)
    for i, name in enumerate(["summarize", "polite"]):
        save_adapter(random_adapter(shaped, name, seed=i + 1, scale=1.0), path / "adapters" / name, base_model="tiny")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("models") / "tiny")


@dataclass
class LiveServer:
    url: str
    service: object
    """The pippin.serve.service.Service behind it."""
    server: object
    thread: threading.Thread

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def start_server(config: ServeConfig, models: list[str]) -> LiveServer:
    """Serve `models` on 127.0.0.1 at a free port, in a thread; skips the test where the web stack is not installed."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from pippin.serve.app import create_app
    from pippin.serve.service import Service, load_base

    bases = [load_base(m, config, adapters_dir=config.adapters_dir if i == 0 else None) for i, m in enumerate(models)]
    service = Service(config, bases)
    url, server, thread = start_uvicorn(create_app(service))
    return LiveServer(url=url, service=service, server=server, thread=thread)


def start_uvicorn(app) -> tuple[str, object, threading.Thread]:  # noqa: ANN001 - an ASGI app
    """Run `app` under uvicorn on 127.0.0.1 at a free port, in a thread; (URL, server, thread) once it listens."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def tiny_config(**overrides) -> ServeConfig:
    """One chunk per token (stream_interval_ms=0): the tiny model is fast enough to finish inside the default interval."""
    kw = dict(max_batch=4, max_queue=4, max_len=256, max_new_tokens=200, default_max_tokens=16, runtime_adapters=True, stream_interval_ms=0)
    kw.update(overrides)
    return ServeConfig(**kw)


@pytest.fixture(scope="session")
def live(tiny_dir) -> Iterator[LiveServer]:
    srv = start_server(tiny_config(), [str(tiny_dir)])
    yield srv
    srv.stop()


@contextlib.contextmanager
def paused(service) -> Iterator[None]:  # noqa: ANN001 - a Service
    """Hold the worker thread between two steps for the duration of the block."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(30)

    fut = service.worker.call(hold)
    assert entered.wait(10), "the worker did not pause"
    try:
        yield
    finally:
        release.set()
        fut.result(10)
