"""`pippin serve` as a user starts it: flags map onto ServeConfig, and the process prints a URL that serves."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pippin.commands import serve
from pippin.errors import PippinError

httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return p.parse_args(list(argv))


def test_flags_become_the_config():
    cfg = serve.config_from_args(parse("--model", "a=/x", "--model", "/y", "--max-batch", "3", "--max-queue", "0", "--port", "9"))
    assert cfg.models == ["a=/x", "/y"] and (cfg.max_batch, cfg.max_queue, cfg.port) == (3, 0, 9)
    assert cfg.runtime_adapters  # loopback: on by default
    assert not serve.config_from_args(parse("--host", "0.0.0.0")).runtime_adapters
    assert serve.config_from_args(parse("--host", "0.0.0.0", "--runtime-adapters")).runtime_adapters
    assert serve.config_from_args(parse()).models == ["default"]
    with pytest.raises(PippinError, match="max_batch"):
        serve.config_from_args(parse("--max-batch", "0"))
    assert serve.config_from_args(parse("--stream-interval-ms", "15")).stream_interval_ms == 15
    assert serve.config_from_args(parse()).prefix_cache and not serve.config_from_args(parse("--no-prefix-cache")).prefix_cache
    with pytest.raises(PippinError, match="stream_interval_ms"):
        serve.config_from_args(parse("--stream-interval-ms", "-1"))


def test_the_models_load_and_warm_up_on_the_worker_thread(tiny_dir, monkeypatch):
    """Service.from_config loads on the thread that runs the models (one OpenMP team), and a model that fails to load
    leaves no worker thread behind."""
    import threading

    from pippin.serve import service as service_mod
    from tests.serve.conftest import tiny_config

    seen = []
    real = service_mod.load_base

    def recording(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        seen.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(service_mod, "load_base", recording)
    workers = lambda: {t for t in threading.enumerate() if t.name == "pippin-worker"}  # noqa: E731 - other servers' too
    before = workers()
    with pytest.raises(PippinError):
        service_mod.Service.from_config(tiny_config(models=[str(tiny_dir / "missing")]))
    assert seen == ["pippin-worker"]
    assert workers() == before
    svc = service_mod.Service.from_config(tiny_config(models=[f"tiny={tiny_dir}"]))
    try:
        assert seen == ["pippin-worker"] * 2 and svc.worker.alive and list(svc.bases) == ["tiny"]
        sched = svc.default.scheduler
        warm = sched.warm_up
        monkeypatch.setattr(sched, "warm_up", lambda *a, **kw: (seen.append(threading.current_thread().name), warm(*a, **kw)))
        svc.warm_up()
        assert seen == ["pippin-worker"] * 3
    finally:
        svc.close()


def test_serve_prints_its_url_and_answers(tiny_dir):
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    code = (
        "import argparse, sys; from pippin.commands import serve; p = argparse.ArgumentParser(); serve.add_arguments(p); "
        "sys.exit(serve.run(p.parse_args(sys.argv[1:])))"
    )
    cmd = [sys.executable, "-c", code, "--model", str(tiny_dir), "--port", "0", "--max-len", "256", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = m.group(1)
        for _ in range(100):
            try:
                r = httpx.get(url + "health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert r.json()["models"] == ["tiny"]
        chat = httpx.post(
            url + "v1/chat/completions",
            json={"model": "tiny:summarize", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
            timeout=30,
        )
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 5
        assert httpx.get(url + "talaria/api/model", timeout=10).json()["model"] == str(tiny_dir)  # Talaria's view, mounted
    finally:
        proc.terminate()
        proc.wait(15)


def test_a_busy_port_is_reported_clearly(tiny_dir):
    pytest.importorskip("uvicorn")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PippinError, match="Cannot listen"):
            serve.run(parse("--model", str(tiny_dir), "--port", str(port)))
