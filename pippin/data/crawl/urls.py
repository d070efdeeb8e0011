"""URL normalization (the key the crawler deduplicates on), origins and the crawl's scope.

Normalization is w3lib's `canonicalize_url` (Scrapy's dupe filter key: query sorted, fragment dropped, percent
encoding and dot segments normalized, host lowercased) plus dropping a default port and credentials. It does not
drop tracking parameters or guess that two paths serve the same page; a redirect to a seen URL is caught when it
happens. Robots rules and politeness are per origin (scheme, host, port), as RFC 9309 says.
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit, urlunsplit

from w3lib.url import canonicalize_url

DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_url(url: str, base: str | None = None) -> str | None:
    """The canonical form of `url` (resolved against `base` if given), or None if it is not a crawlable http(s) URL."""
    try:
        if base is not None:
            url = urljoin(base, url.strip())
        parts = urlsplit(url.strip())
        if parts.scheme.lower() not in DEFAULT_PORTS or not parts.hostname:
            return None
        parts = urlsplit(canonicalize_url(url))
        port = parts.port  # raises ValueError on a port that is not a number in 0..65535
    except ValueError:
        return None
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port in (None, DEFAULT_PORTS[parts.scheme]) else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


def origin(url: str) -> str:
    """scheme://host[:port] of a normalized URL: the unit of robots.txt and of politeness."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def in_scope(url: str, domains: tuple[str, ...] | list[str] | set[str]) -> bool:
    """Whether the URL's host is one of `domains` or a subdomain of one."""
    host = (urlsplit(url).hostname or "").lower()
    return any(host == d or host.endswith("." + d) for d in domains)


def host_name(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()
