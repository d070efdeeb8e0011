"""robots.txt: fetching it by RFC 9309's rules and answering "may I fetch this URL, how fast, which sitemaps".

Parsing and matching are Protego's (Scrapy's parser: longest match wins, Allow wins a tie, `*` and `$` patterns,
Crawl-delay, Request-rate, Sitemap lines); Python's urllib.robotparser applies the first matching rule instead.
What a fetch result means follows RFC 9309 2.3.1 and Google's reading of it: 2xx is parsed (the first 500 KiB);
4xx other than 429 means no rules (allow all); 429, 5xx and no answer mean disallow all until a later try, and after
`max_retries` failed tries the host is given up. At most 5 redirects are followed. The result is cached per origin
in the frontier, with its fetch time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import httpx
from protego import Protego

from pippin.data.crawl.fetch import RETRY_STATUSES, on_sent_trace

MAX_ROBOTS_BYTES = 500 * 1024
MAX_ROBOTS_REDIRECTS = 5


class Access(StrEnum):
    RULES = "rules"  # a robots.txt was read: its rules apply
    ALLOW_ALL = "allow_all"  # 4xx: no robots.txt
    UNREACHABLE = "unreachable"  # 429, 5xx, timeout: nothing may be fetched for now


@dataclass(kw_only=True)
class RobotsAnswer:
    """A robots.txt fetch: the status (None if no response), the body when 2xx, or what went wrong."""

    status: int | None
    body: str | None = None
    error: str | None = None

    @property
    def access(self) -> Access:
        if self.status is not None and 200 <= self.status < 300:
            return Access.RULES
        if self.status is not None and 400 <= self.status < 500 and self.status not in RETRY_STATUSES:
            return Access.ALLOW_ALL
        if self.status is not None and 300 <= self.status < 400:  # more than 5 redirects: RFC 9309 says unavailable
            return Access.ALLOW_ALL
        return Access.UNREACHABLE


class RobotsPolicy:
    """The rules for one origin as seen by one user-agent token."""

    def __init__(self, answer: RobotsAnswer, *, token: str):
        self.answer, self.token = answer, token
        self.parser = Protego.parse(answer.body or "") if answer.access is Access.RULES else None

    @property
    def reachable(self) -> bool:
        return self.answer.access is not Access.UNREACHABLE

    def allowed(self, url: str) -> bool:
        if self.answer.access is Access.UNREACHABLE:
            return False
        return self.parser is None or self.parser.can_fetch(url, self.token)

    def delay(self) -> float | None:
        """Seconds between requests the site asks for: Crawl-delay, or the interval a Request-rate implies."""
        if self.parser is None:
            return None
        delays = []
        if (d := self.parser.crawl_delay(self.token)) is not None:
            delays.append(float(d))
        if (r := self.parser.request_rate(self.token)) is not None and r.requests:
            delays.append(r.seconds / r.requests)
        return max(delays) if delays else None

    def sitemaps(self) -> list[str]:
        return list(self.parser.sitemaps) if self.parser is not None else []


async def fetch_robots(
    client: httpx.AsyncClient, origin: str, *, timeout_s: float, on_sent: Callable[[], None] | None = None
) -> RobotsAnswer:
    """GET origin/robots.txt, following up to 5 redirects, reading at most 500 KiB."""
    url = f"{origin}/robots.txt"
    try:
        async with asyncio.timeout(timeout_s):
            for _ in range(MAX_ROBOTS_REDIRECTS + 1):
                async with client.stream("GET", url, extensions=on_sent_trace(on_sent)) as resp:
                    if resp.is_redirect and resp.headers.get("location"):
                        url = str(resp.url.join(resp.headers["location"]))
                        continue
                    if not resp.is_success:
                        return RobotsAnswer(status=resp.status_code, error=f"HTTP {resp.status_code}")
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) >= MAX_ROBOTS_BYTES:
                            break
                    return RobotsAnswer(status=resp.status_code, body=bytes(body[:MAX_ROBOTS_BYTES]).decode("utf-8", "replace"))
            return RobotsAnswer(status=resp.status_code, error=f"more than {MAX_ROBOTS_REDIRECTS} redirects")
    except TimeoutError:
        return RobotsAnswer(status=None, error=f"timed out after {timeout_s:g} s")
    except httpx.HTTPError as e:
        return RobotsAnswer(status=None, error=f"{type(e).__name__}: {e}")
