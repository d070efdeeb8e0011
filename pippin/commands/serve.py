"""`pippin serve`: an OpenAI-compatible server with per-request LoRA adapters, a web playground at / and Talaria at /talaria/.

Loads the models, prints the URL, and runs uvicorn until Ctrl-C. Flags map one to one onto
pippin.serve.config.ServeConfig, so `run(args)` and `serve(config)` are the same thing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pippin.serve.config import LOOPBACK_HOSTS, ServeConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ServeConfig()
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="base model: 'default', a folder or .gguf, or NAME=PATH; repeat to serve several (the first is the default)",
    )
    p.add_argument("--adapters", default=None, help="folder of named adapters for the first model (default: <model folder>/adapters)")
    p.add_argument("--host", default=d.host, help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="rows generated at once (concurrent requests)")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="samples waiting for a row before 429")
    p.add_argument("--max-len", type=int, default=d.max_len, help="context per request in tokens (KV cache per row)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (default: max-len - 1)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens, help="max_tokens when a request gives none")
    p.add_argument("--adapter-slots", type=int, default=d.adapter_slots, help="LoRA slots: adapters per batch + 1")
    p.add_argument("--adapter-cache-mb", type=int, default=d.adapter_cache_mb, help="memory for loaded adapters")
    p.add_argument(
        "--runtime-adapters",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="allow /v1/load_lora_adapter with server paths (default: on for a loopback host, off otherwise)",
    )
    p.add_argument(
        "--raw-special-tokens",
        action="store_true",
        help="read special-token strings in chat messages (<|im_end|>...) as control tokens, not as text (trusted clients only)",
    )
    p.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        help="a folder runtime-loaded adapters may come from, besides each model's adapters folder (repeatable)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=d.request_timeout_s,
        help="seconds a request may take from arrival: waiting past it gets 503, running past it ends early (0: none)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("PIPPIN_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every /v1 request (default: $PIPPIN_API_KEY; none when unset)",
    )
    p.add_argument(
        "--stream-interval-ms",
        type=float,
        default=d.stream_interval_ms,
        help=f"send a stream's text at most this often; 0: one chunk per token (default {d.stream_interval_ms:g})",
    )
    p.add_argument(
        "--no-prefix-cache", action="store_true", help="prefill every prompt whole (default: reuse the prefix a cache row holds)"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model")
    p.add_argument("--no-kernels", action="store_true", help="use the plain PyTorch reference path")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    loopback = args.host in LOOPBACK_HOSTS
    return ServeConfig(
        models=args.model or ["default"],
        adapters_dir=args.adapters,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_len=args.max_len,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        default_max_tokens=args.default_max_tokens,
        adapter_slots=args.adapter_slots,
        adapter_cache_mb=args.adapter_cache_mb,
        runtime_adapters=loopback if args.runtime_adapters is None else args.runtime_adapters,
        adapter_roots=args.adapter_root,
        raw_special_tokens=args.raw_special_tokens,
        api_key=args.api_key or None,
        request_timeout_s=args.request_timeout or None,
        stream_interval_ms=args.stream_interval_ms,
        prefix_cache=not args.no_prefix_cache,
        kernels=not args.no_kernels,
        threads=args.threads,
    )


def serve(config: ServeConfig, *, log_level: str = "warning") -> int:
    import socket
    import time

    import torch
    import uvicorn

    from pippin.errors import PippinError
    from pippin.eval.fidelity import summary
    from pippin.model.checkpoint import pippin_home
    from pippin.serve.app import create_app
    from pippin.serve.service import Service

    if config.threads:
        torch.set_num_threads(config.threads)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # bind before loading the models: a busy port is reported at once
        sock.bind((config.host, config.port))
    except OSError as e:
        sock.close()
        raise PippinError(f"Cannot listen on {config.host}:{config.port} ({e.strerror}); pick another --port or --host.") from None
    service = Service.from_config(config)
    t0 = time.perf_counter()
    service.warm_up()
    print(f"  warmed up in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    app = create_app(service)
    # Plans are written server-side only for a loopback server; elsewhere the page offers them as downloads.
    plans_dir = pippin_home() / "talaria" / "plans" if config.loopback else None
    talaria = mount_talaria(app, service.default.loaded.path, plans_dir=plans_dir)
    host = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{host}:{sock.getsockname()[1]}/"
    print(f"pippin serve: {url}  (playground at /, OpenAI API at {url}v1, metrics at /metrics)", flush=True)
    print(f"  models: {', '.join(c.id for c in service.models())}", file=sys.stderr, flush=True)
    print(f"  talaria: {url}talaria/" if talaria is None else f"  talaria: not mounted ({talaria})", file=sys.stderr, flush=True)
    if config.api_key is not None:
        print("  /v1 requires the API key (Authorization: Bearer ...); the playground asks for it", file=sys.stderr, flush=True)
    elif not config.loopback:
        print(f"  warning: {config.host} is reachable from other machines and no --api-key is set", file=sys.stderr, flush=True)
    for base in service.bases.values():
        if base.loaded.path.is_dir() and (line := summary(base.loaded.path)):
            print(f"  {base.name} against full precision: {line}", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    return 0


def mount_talaria(app, model_path: Path, *, plans_dir: Path | None) -> str | None:  # noqa: ANN001 - a FastAPI app
    """Mount Talaria's view of a served model folder at /talaria (priced on this machine where it is measured, else
    on the laptop-cpu profile; plans written into plans_dir, or only offered as downloads when it is None). Returns
    why not, or None once mounted."""
    from pippin.errors import PippinError
    from pippin.talaria.devices import THIS_MACHINE, load_profile
    from pippin.talaria.web import TalariaView
    from pippin.talaria.web import create_app as talaria_app

    if not (model_path / "config.json").is_file():
        return f"{model_path} is not a model folder with a config.json"
    try:
        load_profile(THIS_MACHINE, measure=False)
        device = THIS_MACHINE
    except PippinError:
        device = "laptop-cpu"
    try:
        view = TalariaView.open(str(model_path), device=device, plans_dir=plans_dir)
    except PippinError as e:
        return str(e)
    app.mount("/talaria", talaria_app(view))
    return None


def run(args: argparse.Namespace) -> int:
    return serve(config_from_args(args), log_level=args.log_level)
