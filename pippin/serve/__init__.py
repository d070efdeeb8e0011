"""Serving: an OpenAI-compatible HTTP server over continuous batching, with per-request LoRA adapters.

`protocol` (request/response shapes), `service` (models, limits, prompts), `scheduler` (the worker thread
and its bridge to asyncio), `text` (streamed detokenization, stop strings), `metrics` (Prometheus, with prometheus_client),
`app` (the FastAPI routes) and `static/` (the web playground). `pippin serve` starts it; in Python:

    from pippin.serve.app import create_app
    from pippin.serve.config import ServeConfig
    from pippin.serve.service import Service

    app = create_app(Service.from_config(ServeConfig(models=["default"])))   # any ASGI server runs it
"""
