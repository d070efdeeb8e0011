"""One HTTP GET with the crawler's limits, classified into what the crawler does next.

The body is streamed (httpx) and the download is abandoned, closing the connection, as soon as it passes the byte
limit, or before reading anything when Content-Length already does or the media type is not allowed. The whole request
(connect, headers, body) runs under one deadline, so a server that trickles bytes cannot hold a slot forever.
Redirects are not followed here: the crawler queues the target, so every hop passes robots.txt, politeness and the
seen set. Retry-After (seconds or an HTTP date, RFC 9110 10.2.3) is parsed for the caller's backoff.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

import httpx


class Outcome(StrEnum):
    OK = "ok"  # 2xx, body read within the limits
    REDIRECT = "redirect"  # 3xx with a Location
    RETRY = "retry"  # 429, 5xx, timeout, connection error: try again later
    ERROR = "error"  # final: 4xx, too large, type not allowed, bad redirect


RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(kw_only=True)
class Fetched:
    url: str
    outcome: Outcome
    fetched_at: str
    status: int | None = None
    reason: str = ""
    http_version: str = "HTTP/1.1"
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str | None = None
    body: bytes = b""
    error: str | None = None
    location: str | None = None
    retry_after: float | None = None


def media_type(content_type: str | None) -> str | None:
    return content_type.split(";", 1)[0].strip().lower() or None if content_type else None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def on_sent_trace(on_sent: Callable[[], None] | None) -> dict:
    """httpx request extensions that call `on_sent` when the request headers start going out (httpcore's trace)."""
    if on_sent is None:
        return {}

    async def trace(name: str, info: dict) -> None:
        if name.endswith("send_request_headers.started"):
            on_sent()

    return {"trace": trace}


async def fetch(
    client: httpx.AsyncClient,
    url: str,
    *,
    content_types: tuple[str, ...],
    max_bytes: int,
    timeout_s: float,
    on_sent: Callable[[], None] | None = None,
) -> Fetched:
    fetched_at = datetime.now(UTC).isoformat(timespec="milliseconds")
    result = Fetched(url=url, outcome=Outcome.ERROR, fetched_at=fetched_at)
    try:
        async with asyncio.timeout(timeout_s), client.stream("GET", url, extensions=on_sent_trace(on_sent)) as resp:
            result.status, result.reason, result.http_version = resp.status_code, resp.reason_phrase, resp.http_version
            result.headers = list(resp.headers.multi_items())
            result.content_type = resp.headers.get("content-type")
            if resp.is_redirect:
                result.location = resp.headers.get("location")
                result.outcome = Outcome.REDIRECT if result.location else Outcome.ERROR
                result.error = None if result.location else f"{resp.status_code} redirect without a Location header"
                return result
            if resp.status_code in RETRY_STATUSES:
                result.outcome, result.error = Outcome.RETRY, f"HTTP {resp.status_code}"
                result.retry_after = parse_retry_after(resp.headers.get("retry-after"))
                return result
            if not resp.is_success:
                result.error = f"HTTP {resp.status_code}"
                return result
            mtype = media_type(result.content_type)
            if mtype not in content_types:
                result.error = f"content type {mtype} is not one of {', '.join(content_types)}"
                return result
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                result.error = f"Content-Length {declared} is over the {max_bytes}-byte limit"
                return result
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:  # leaving the block closes the connection; the rest is never read
                    result.error = f"body is over the {max_bytes}-byte limit (stopped reading at {len(body)})"
                    return result
            result.body, result.outcome = bytes(body), Outcome.OK
            return result
    except TimeoutError:
        result.outcome, result.error = Outcome.RETRY, f"timed out after {timeout_s:g} s"
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
        result.outcome, result.error = Outcome.ERROR, f"bad URL ({e})"
    except httpx.HTTPError as e:  # connection refused or reset, protocol errors, a broken body encoding
        result.outcome, result.error = Outcome.RETRY, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return result
