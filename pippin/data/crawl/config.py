"""The crawler's configuration, and which changes a resumed crawl may make to it.

`CrawlConfig` is written as DIR/config.json by every run. A resumed crawl compares its config with the stored one: a
change that only affects pace, limits of this run or retries is allowed (HARMLESS); one that changes what gets
crawled or recorded (scope, depth, size and type limits, redirects, the robots.txt identity, WARC output) would make
the folder a mix of two crawls and is refused. Field names follow Scrapy's settings where they overlap.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pippin.errors import PippinError

CONFIG_FILE = "config.json"

# Changing these on resume cannot put a page into the output that a fresh crawl with the new value would not
# have (or leave one out): they set the pace, this run's page budget, and how hard to retry.
HARMLESS = frozenset(
    {
        "contact_url",
        "max_pages",
        "delay_s",
        "max_connections_per_host",
        "max_connections",
        "timeout_s",
        "max_retries",
        "backoff_base_s",
        "backoff_cap_s",
        "max_retry_after_s",
        "robots_ttl_s",
    }
)


@dataclass(kw_only=True)
class CrawlConfig:
    contact_url: str
    """Where a site owner reads who runs this crawl and how to reach them (https:// or mailto:); sent in User-Agent."""
    user_agent: str = "pippin-crawler/0.1"
    """Product token and version; the token (before '/') picks the robots.txt user-agent group."""
    delay_s: float = 1.0
    """Seconds between request starts to one host when its robots.txt sets no Crawl-delay or Request-rate."""
    max_connections_per_host: int = 2
    """Requests in flight to one host at a time."""
    max_connections: int = 16
    """Requests in flight over all hosts."""
    max_pages: int | None = 1000
    """Stop once this many page records are in the output (None: crawl until the frontier is empty)."""
    max_depth: int = 5
    """Links followed from a seed (or a sitemap entry); deeper links are not queued."""
    max_bytes: int = 5 * 1024 * 1024
    """A page whose (decoded) body is larger is abandoned mid-download and recorded as an error."""
    content_types: tuple[str, ...] = ("text/html", "application/xhtml+xml", "text/plain")
    """Media types a page may have; others are recorded as an error without reading the body."""
    max_redirects: int = 5
    """Redirect hops from a queued URL; a longer chain or a loop is recorded as an error."""
    timeout_s: float = 30.0
    """Whole-request limit (connect, headers and body) in seconds; a timeout is retried."""
    max_retries: int = 3
    """Further tries after a 429, a 5xx, a timeout or a connection error; then the page is recorded as an error."""
    backoff_base_s: float = 1.0
    """First retry wait; it doubles per try (with jitter) unless the server sent Retry-After."""
    backoff_cap_s: float = 60.0
    """Longest computed backoff wait."""
    max_retry_after_s: float = 600.0
    """A Retry-After longer than this gives the page up instead of waiting."""
    robots_ttl_s: float = 86400.0
    """How long a fetched robots.txt is used before it is fetched again (RFC 9309 asks for at most 24 h)."""
    allowed_domains: tuple[str, ...] | None = None
    """Hosts (and their subdomains) to crawl; None: the seeds' hosts."""
    read_sitemaps: bool = True
    """Queue the sitemaps named in robots.txt (or /sitemap.xml when none is named), following sitemap indexes."""
    warc: bool = False
    """Also write DIR/pages.warc.gz: a response record and a text conversion record per page."""

    def __post_init__(self) -> None:
        self.content_types = tuple(t.lower() for t in self.content_types)
        if self.allowed_domains is not None:
            self.allowed_domains = tuple(d.lower().strip(".") for d in self.allowed_domains)
        if not self.contact_url.startswith(("http://", "https://", "mailto:")):
            raise PippinError(
                f"contact URL {self.contact_url!r} is not a http(s):// or mailto: URL; "
                "give a page or address where site owners can reach you."
            )
        if "/" not in self.user_agent or " " in self.user_agent:
            raise PippinError(f"user agent {self.user_agent!r} should be a product token and version, like 'pippin-crawler/0.1'.")
        for name in ("max_connections_per_host", "max_connections", "max_bytes"):
            if getattr(self, name) < 1:
                raise PippinError(f"{name} must be at least 1 (got {getattr(self, name)}).")
        for name in ("delay_s", "max_depth", "max_redirects", "max_retries", "backoff_base_s", "backoff_cap_s"):
            if getattr(self, name) < 0:
                raise PippinError(f"{name} must not be negative (got {getattr(self, name)}).")
        if self.timeout_s <= 0:
            raise PippinError(f"timeout_s must be positive (got {self.timeout_s}).")

    @property
    def robots_token(self) -> str:
        """The product token matched against robots.txt groups (never the contact URL, which could match others)."""
        return self.user_agent.split("/", 1)[0]

    @property
    def user_agent_header(self) -> str:
        return f"{self.user_agent} (+{self.contact_url})"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["content_types"] = list(self.content_types)
        d["allowed_domains"] = None if self.allowed_domains is None else list(self.allowed_domains)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CrawlConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PippinError(f"crawl config has unknown fields {unknown}; known fields are {sorted(known)}.")
        d = dict(d)
        for key in ("content_types", "allowed_domains"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def check_resume(stored: CrawlConfig, new: CrawlConfig, folder: Path) -> list[str]:
    """The harmless fields that changed (to report); a PippinError naming the others if any changed."""
    old_d, new_d = stored.to_json(), new.to_json()
    changed = sorted(k for k in new_d if old_d[k] != new_d[k])
    refused = [k for k in changed if k not in HARMLESS]
    if refused:
        detail = ", ".join(f"{k}: {old_d[k]!r} -> {new_d[k]!r}" for k in refused)
        raise PippinError(
            f"{folder} holds a crawl made with another config ({detail}); these change what is crawled or recorded, so "
            f"resuming would mix two crawls. Use the old values or a new --out folder (harmless to change: {', '.join(sorted(HARMLESS))})."
        )
    return changed


def load_config(folder: Path) -> CrawlConfig | None:
    path = folder / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return CrawlConfig.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise PippinError(f"{path} is not a crawl config ({e}); remove the folder or pick another --out.") from None
