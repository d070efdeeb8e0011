"""The HTTP routes: OpenAI-compatible API, vLLM's runtime adapter endpoints, health, metrics and the web page.

Routes only: validation lives in pippin.serve.protocol, limits and models in pippin.serve.service, and
generation in pippin.serve.scheduler. Every error, including malformed JSON, a wrong type, an unknown
route and an unexpected exception, is answered in OpenAI's error shape (`{"error": {message, type, param,
code}}`), and nothing a request does stops the server. Streaming is Server-Sent Events ending with
`data: [DONE]`. A client that disconnects, mid-stream or while waiting for a whole reply, frees its rows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pippin.engine.scheduler import DeadlineExceeded, SchedulerFull
from pippin.errors import PippinError
from pippin.serve.config import LOOPBACK_HOSTS
from pippin.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pippin.serve.protocol import (
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ErrorBody,
    ErrorResponse,
    LoadAdapterRequest,
    ModelCard,
    ModelList,
    StreamOptions,
    UnloadAdapterRequest,
    Usage,
    new_id,
    now,
)
from pippin.serve.scheduler import ChoiceDone, Failed, Generation, TextDelta
from pippin.serve.service import Service

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
API_PATHS = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
ERRORS = {r: {"model": ErrorResponse} for r in (400, 401, 404, 413, 429, 500, 503)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None) -> JSONResponse:
    kind = {429: "rate_limit_error", 500: "server_error", 503: "server_error"}.get(status, "invalid_request_error")
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    headers = {"Retry-After": "1"} if status in (429, 503) else {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _exception_response(e: Exception) -> JSONResponse:
    if isinstance(e, ApiError):
        return error_response(e.status, str(e), code=e.code, param=e.param)
    if isinstance(e, SchedulerFull):
        return error_response(429, str(e), code="rate_limit_exceeded")
    if isinstance(e, DeadlineExceeded):
        return error_response(503, str(e), code="deadline_exceeded")
    if isinstance(e, PippinError):
        return error_response(400, str(e))
    log.error("Unexpected error in a request", exc_info=e)
    return error_response(500, f"Internal error ({type(e).__name__}); the server keeps running. Please report it.")


class Guard:
    """ASGI middleware: refuse requests to a loopback server addressed to another host (403), /v1 requests without the
    API key when one is set (401), bodies over the limit (413); answer unexpected errors with a 500 in OpenAI's shape,
    and count requests per endpoint and status."""

    def __init__(self, app: ASGIApp, *, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.service.config.max_body_bytes
        path = scope["path"]
        endpoint = path if path in API_PATHS else "other"
        status: dict = {"code": 500}
        headers = dict(scope.get("headers") or [])
        if self.service.config.loopback and not _loopback_host(headers.get(b"host", b"localhost").decode("latin-1")):
            # A page on another site whose name resolves to 127.0.0.1 (DNS rebinding) must not reach a loopback server.
            resp = error_response(403, "This server listens on loopback and answers only requests addressed to localhost.")
            await resp(scope, receive, send)
            self.service.metrics.request_done(endpoint, 403)
            return
        key = self.service.config.api_key
        if key is not None and (path == "/v1" or path.startswith("/v1/")) and not _has_key(headers.get(b"authorization", b""), key):
            resp = error_response(401, "This server needs an API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
            await resp(scope, receive, send)
            self.service.metrics.request_done(endpoint, 401)
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            resp = error_response(413, f"The request body is over {limit} bytes; send less.")
            await resp(scope, receive, send)
            self.service.metrics.request_done(endpoint, 413)
            return
        seen = 0

        async def capped_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"The request body is over {limit} bytes; send less.")
            return msg

        async def counting_send(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
                status["started"] = True
            await send(msg)

        try:
            await self.app(scope, capped_receive, counting_send)
        except Exception as e:  # a bug: answer 500 here, so the connection stays usable and the server serves on
            if "started" in status:
                raise  # mid-stream: nothing left to send but closing the connection
            status["code"] = 500
            await _exception_response(e)(scope, receive, send)
        finally:
            self.service.metrics.request_done(endpoint, status["code"])


def _has_key(authorization: bytes, key: str) -> bool:
    """Whether an Authorization header carries the key as a bearer token (compared in constant time)."""
    scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


def _loopback_host(host: str) -> bool:
    """Whether a Host header ('localhost:8000', '[::1]:8000', '127.0.0.1') names this machine."""
    name = host[1 : host.find("]")] if host.startswith("[") else host.rpartition(":")[0] if host.count(":") == 1 else host
    return name.lower() in LOOPBACK_HOSTS


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _sse(obj) -> str:  # noqa: ANN001 - a pydantic model or a dict
    data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


async def _collect(gen: Generation, request: Request) -> tuple[list[str], list[str]]:
    """All text of every choice; cancels the generation if the client goes away meanwhile."""
    texts = [""] * gen.n_choices
    reasons = ["stop"] * gen.n_choices

    async def run() -> None:
        async for ev in gen.events():
            if isinstance(ev, TextDelta):
                texts[ev.index] += ev.text
            elif isinstance(ev, ChoiceDone):
                reasons[ev.index] = _finish(ev.finish_reason)
            elif isinstance(ev, Failed):
                raise ev.error

    task = asyncio.create_task(run())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                task.result()
                return texts, reasons
            if await request.is_disconnected():
                task.cancel()
                raise ApiError("The client disconnected.", status=499)
    finally:
        if not task.done():
            task.cancel()
        gen.close()


def create_app(service: Service) -> FastAPI:
    """The ASGI app over a Service; its lifespan starts and stops the worker thread."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 - FastAPI's lifespan protocol
        service.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="pippin",
        summary="OpenAI-compatible server for pippin models with per-request LoRA adapters.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(Guard, service=service)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return error_response(400, f"The request body is not valid JSON ({errs[0].get('ctx', {}).get('error', 'parse error')}).")
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
        if where == "body":
            return error_response(400, f"The request body must be a JSON object sent as application/json ({first.get('msg', 'invalid')}).")
        return error_response(400, f"Invalid request: {where}: {first.get('msg', 'invalid value')}{more}.", param=where)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404:
            detail = f"No route {request.method} {request.url.path}; the API is under /v1 (see /docs)."
        return error_response(exc.status_code, detail)

    @app.exception_handler(PippinError)
    async def on_refused(request: Request, exc: PippinError) -> JSONResponse:
        return _exception_response(exc)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> JSONResponse:
        h = service.health()
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=service.models())

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        base, adapter = service.resolve(model_id)
        wanted = base.name if adapter is None else f"{base.name}:{adapter}"
        return next(c for c in service.models() if c.id == wanted)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
    async def chat(req: ChatCompletionRequest, request: Request):  # noqa: ANN201 - JSON or a stream
        job = await asyncio.to_thread(service.prepare_chat, req)
        gen = await service.generate(job)
        rid, created = new_id("chatcmpl"), now()
        if req.stream:
            stream = _chat_stream(gen, req.model, rid, created, req.stream_options)
            return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
        texts, reasons = await _collect(gen, request)
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=r) for i, (t, r) in enumerate(zip(texts, reasons))
        ]
        return ChatCompletion(id=rid, created=created, model=req.model, choices=choices, usage=Usage(**gen.usage))

    @app.post("/v1/completions", response_model=Completion, responses=ERRORS)
    async def completions(req: CompletionRequest, request: Request):  # noqa: ANN201 - JSON or a stream
        job = await asyncio.to_thread(service.prepare_completion, req)
        gen = await service.generate(job)
        rid, created = new_id("cmpl"), now()
        if req.stream:
            return StreamingResponse(
                _completion_stream(gen, req.model, rid, created, req.stream_options), media_type="text/event-stream", headers=SSE_HEADERS
            )
        texts, reasons = await _collect(gen, request)
        choices = [CompletionChoice(index=i, text=t, finish_reason=r) for i, (t, r) in enumerate(zip(texts, reasons))]
        return Completion(id=rid, created=created, model=req.model, choices=choices, usage=Usage(**gen.usage))

    @app.post("/v1/load_lora_adapter", responses=ERRORS)
    async def load_lora(req: LoadAdapterRequest) -> dict:
        model = await service.load_adapter(req.lora_name, req.lora_path)
        return {"status": "ok", "model": model, "message": f"Adapter loaded; use model={model!r}."}

    @app.post("/v1/unload_lora_adapter", responses=ERRORS)
    async def unload_lora(req: UnloadAdapterRequest) -> dict:
        model = await service.unload_adapter(req.lora_name)
        return {"status": "ok", "model": model, "message": "Adapter unloaded; its files stay on disk."}

    return app


async def _event_stream(gen: Generation, *, chunk, text, done, options: StreamOptions | None, opening: list[str] = ()):  # noqa: ANN001, ANN202
    """SSE lines for one streamed generation: `text(index, str)` and `done(index, reason)` make a chunk's choice."""
    include_usage = bool(options and options.include_usage)
    continuous = bool(options and options.continuous_usage_stats)
    counts = [0] * gen.n_choices

    def usage() -> Usage:
        c = sum(counts)
        return Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=c, total_tokens=gen.prompt_tokens + c)

    try:
        for line in opening:
            yield line
        async for ev in gen.events():
            if isinstance(ev, TextDelta):
                counts[ev.index] = ev.tokens
                yield chunk([text(ev.index, ev.text)], usage() if continuous else None)
            elif isinstance(ev, ChoiceDone):
                counts[ev.index] = gen.completion_tokens[ev.index]
                yield chunk([done(ev.index, _finish(ev.finish_reason))], usage() if continuous else None)
            elif isinstance(ev, Failed):
                yield _sse(json.loads(_exception_response(ev.error).body))
                break
        else:
            if include_usage:
                yield chunk([], Usage(**gen.usage))
        yield "data: [DONE]\n\n"
    finally:
        gen.close()


def _chat_stream(gen: Generation, model: str, rid: str, created: int, options: StreamOptions | None):  # noqa: ANN202 - SSE lines
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        return _sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage))

    return _event_stream(
        gen,
        chunk=chunk,
        text=lambda i, t: ChunkChoice(index=i, delta=Delta(content=t)),
        done=lambda i, r: ChunkChoice(index=i, delta=Delta(), finish_reason=r),
        options=options,
        opening=[chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(gen.n_choices)])],
    )


def _completion_stream(gen: Generation, model: str, rid: str, created: int, options: StreamOptions | None):  # noqa: ANN202 - SSE lines
    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return _sse(Completion(id=rid, created=created, model=model, choices=choices, usage=usage))

    return _event_stream(
        gen,
        chunk=chunk,
        text=lambda i, t: CompletionChoice(index=i, text=t, finish_reason=None),
        done=lambda i, r: CompletionChoice(index=i, text="", finish_reason=r),
        options=options,
    )
