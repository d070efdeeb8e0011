"""Deterministic stand-ins for the eval tests: a scripted System, a byte-level tokenizer for tiny models, and a
local OpenAI-compatible HTTP server. The scoring logic under test is real; only the model is faked."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pippin.errors import PippinError
from pippin.eval.systems import EndpointError


class StubSystem:
    """Replies with `reply(messages, params)`; records every batch it is asked for.

    fail: rows for which it raises a row-level PippinError; unreachable: every call raises EndpointError.
    """

    def __init__(
        self,
        reply: Callable[[list[dict], object], str] | str = "ok",
        *,
        spec: str = "stub:a",
        fail: Callable[[list[dict]], bool] | None = None,
        unreachable: bool = False,
    ) -> None:
        self.reply = reply if callable(reply) else (lambda m, p, r=reply: r)
        self.spec = spec
        self.identity = spec
        self.fail = fail
        self.unreachable = unreachable
        self.calls: list[list[list[dict]]] = []
        self.params: list[object] = []

    @property
    def n_rows(self) -> int:
        return sum(len(c) for c in self.calls)

    def generate(self, conversations, params):  # noqa: ANN001, ANN201
        self.calls.append([list(c) for c in conversations])
        self.params.append(params)
        if self.unreachable:
            raise EndpointError(f"{self.spec} is unreachable")
        if self.fail and any(self.fail(list(c)) for c in conversations):
            raise PippinError("this prompt is too long")
        return [self.reply(list(c), params) for c in conversations]


def last_user(messages: list[dict]) -> str:
    return [m for m in messages if m["role"] == "user"][-1]["content"]


class ByteTokenizer:
    """Bytes as token ids (fits a tiny model's 256-token vocabulary); a plain-text chat template."""

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return list("".join(f"{m['role']}: {m['content']}\n" for m in messages).encode()) + list(b"assistant: ")

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("latin-1")


class ChatServer:
    """A chat-completions endpoint on 127.0.0.1 in a thread; `answer(body) -> (status, json or text)`."""

    def __init__(self, answer: Callable[[dict, dict], tuple[int, object]]) -> None:
        self.requests: list[tuple[dict, dict]] = []  # (body, headers)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = dict(self.headers)
                outer.requests.append((body, headers))
                status, payload = answer(body, headers) if self.path == "/v1/chat/completions" else (404, "not found")
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def completion(text: str) -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }
