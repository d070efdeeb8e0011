"""A small web site served on 127.0.0.1 for the crawler's tests, with an access log of every request.

`Site` runs the standard library's threading HTTP server on a free loopback port in a background thread and logs each
request (arrival time on this process's monotonic clock, path, User-Agent, body bytes sent). `polite_site` builds
the trap-laden site: robots.txt groups for the crawler and for others, a sitemap index, disallowed links, redirects
(one good, one loop, one too long), a slow page, broken HTML, a 429 with Retry-After, a 503 then 200, a huge streamed
file, a non-HTML type, a 404 and an outside link. Nothing here contacts anything outside loopback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Response = tuple[int, dict[str, str], bytes]


@dataclass
class Hit:
    t: float
    path: str
    user_agent: str
    sent: int = 0


class Site:
    """Routes map a path to a response or to a function of the hit count of that path; unknown paths are 404."""

    def __init__(self, routes: dict[str, Response | Callable[[int], Response]], *, streams: dict[str, tuple[str, int]] | None = None):
        self.routes, self.streams = routes, streams or {}
        self.log: list[Hit] = []
        self.lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: the server closes it after the response

            def do_GET(self):
                hit = Hit(time.monotonic(), self.path, self.headers.get("User-Agent", ""))
                with site.lock:
                    n = sum(h.path == self.path for h in site.log)
                    site.log.append(hit)
                try:
                    if self.path in site.streams:
                        self._stream(hit, *site.streams[self.path])
                        return
                    route = site.routes.get(self.path, (404, {"Content-Type": "text/plain"}, b"not found"))
                    status, headers, body = route(n) if callable(route) else route
                    if status == -1:  # a slow page: answer after the client has given up
                        time.sleep(3.0)
                        status = 200
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    hit.sent = len(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _stream(self, hit: Hit, content_type: str, total: int):
                """`total` bytes in 64 KiB chunks, no Content-Length: only counting tells the client it is too big."""
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.end_headers()
                chunk = b"all work and no play makes a big file\n" * 1724
                while hit.sent < total:
                    self.wfile.write(chunk)
                    hit.sent += len(chunk)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Site:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str) -> str:
        return self.origin + path

    def paths(self) -> list[str]:
        with self.lock:
            return [h.path for h in self.log]


def html(title: str, *links: str, extra: str = "") -> Response:
    """A page with a few sentences of text (enough for trafilatura to keep) that name it, and links."""
    anchors = "".join(f'<li><a href="{u}">{u}</a></li>' for u in links)
    body = (
        f"<html><head><title>{title}</title></head><body><nav><ul>{anchors}</ul></nav><article><h1>{title}</h1>"
        f"<p>This is the page called {title}. It holds the marker word text-{title} so a test can find its text. "
        f"Crawlers that are polite read robots.txt first and then wait between their requests to this host.</p>"
        f"{extra}</article><footer>footer text</footer></body></html>"
    )
    return 200, {"Content-Type": "text/html; charset=utf-8"}, body.encode()


def once(first: Response, then: Response) -> Callable[[int], Response]:
    return lambda n: first if n == 0 else then


def redirect(to: str) -> Response:
    return 302, {"Location": to, "Content-Type": "text/html"}, b""


def polite_site(*, crawl_delay: float, huge_bytes: int) -> Site:
    robots = (
        "User-agent: *\nDisallow: /\n\n"
        "User-agent: pippin-crawler\nDisallow: /private/\nAllow: /private/open.html\nDisallow: /*.pdf$\n"
        f"Crawl-delay: {crawl_delay}\n\nSitemap: {{origin}}/sitemap_index.xml\n"
    )
    routes: dict[str, Response | Callable[[int], Response]] = {
        "/": html(
            "home",
            "/a.html",
            "/a.html#part",
            "/b.html?y=2&x=1",
            "/b.html?x=1&y=2",
            "/private/secret.html",
            "/private/open.html",
            "/report.pdf",
            "/old",
            "/loop/a",
            "/chain/0",
            "/slow.html",
            "/broken.html",
            "/limited.html",
            "/flaky.html",
            "/huge.txt",
            "/image.png",
            "/missing.html",
            "http://example.com/outside.html",
            "mailto:someone@example.com",
        ),
        "/a.html": html("a", "/", "/private/secret2.html", "/b.html?x=1&y=2"),
        "/b.html?x=1&y=2": html("b", "/a.html"),
        "/private/open.html": html("open"),
        "/new.html": html("new"),
        "/old": redirect("/new.html"),
        "/loop/a": redirect("/loop/b"),
        "/loop/b": redirect("/loop/a"),
        "/slow.html": (-1, {"Content-Type": "text/html"}, b"<p>too late</p>"),
        "/broken.html": (
            200,
            {"Content-Type": "text/html"},
            b"<html><body><div><p>Broken markup still has text-broken inside it, and a sentence or two more to keep "
            b"<b>unclosed bold <i>and italic <a href='/from-broken.html'>a link<table><tr><td>cell",
        ),
        "/from-broken.html": html("from-broken"),
        "/limited.html": once((429, {"Retry-After": "1", "Content-Type": "text/plain"}, b"slow down"), html("limited")),
        "/flaky.html": once((503, {"Content-Type": "text/plain"}, b"try later"), html("flaky")),
        "/image.png": (200, {"Content-Type": "image/png"}, b"\x89PNG\r\n\x1a\n" + b"\0" * 100),
        "/orphan.html": html("orphan"),
        "/sitemap_index.xml": (
            200,
            {"Content-Type": "application/xml"},
            b'<?xml version="1.0"?><sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
            b"<sitemap><loc>{origin}/sitemap-pages.xml</loc></sitemap></sitemapindex>",
        ),
        "/sitemap-pages.xml": (
            200,
            {"Content-Type": "application/xml"},
            b'<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
            b"<url><loc>{origin}/orphan.html</loc></url><url><loc>{origin}/</loc></url>"
            b"<url><loc>{origin}/private/hidden.html</loc></url></urlset>",
        ),
    }
    for i in range(10):
        routes[f"/chain/{i}"] = redirect(f"/chain/{i + 1}")
    site = Site(routes, streams={"/huge.txt": ("text/plain", huge_bytes)})
    # robots.txt and sitemaps name absolute URLs, which need the port the server got
    routes["/robots.txt"] = (200, {"Content-Type": "text/plain"}, robots.format(origin=site.origin).encode())
    for path in ("/sitemap_index.xml", "/sitemap-pages.xml"):
        status, headers, body = routes[path]
        routes[path] = (status, headers, body.replace(b"{origin}", site.origin.encode()))
    return site


def chain_site(n_pages: int, *, crawl_delay: float) -> Site:
    """Pages p0..p{n-1}, each linking to the next three: a crawl that takes about n_pages * crawl_delay seconds."""
    routes: dict[str, Response | Callable[[int], Response]] = {
        "/robots.txt": (200, {"Content-Type": "text/plain"}, f"User-agent: *\nCrawl-delay: {crawl_delay}\n".encode())
    }
    for i in range(n_pages):
        routes[f"/p{i}.html"] = html(f"p{i}", *[f"/p{j}.html" for j in (i + 1, i + 2, i + 3) if j < n_pages])
    routes["/sitemap.xml"] = (404, {"Content-Type": "text/plain"}, b"no sitemap")
    return Site(routes)
