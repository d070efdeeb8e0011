"""The crawler against a local site (tests/data/crawl_site.py) on 127.0.0.1: robots.txt, politeness, retries,
redirects, limits, extraction, output, and a kill -9 mid-crawl that resumes without refetching. The server's access
log is the witness for what was fetched and when. Nothing outside loopback is contacted."""

from __future__ import annotations

import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from warcio.archiveiterator import ArchiveIterator

from pippin.data.crawl import CrawlConfig, crawl, read_records
from pippin.data.crawl.config import check_resume
from pippin.data.crawl.extract import page_links, parse_sitemap
from pippin.data.crawl.fetch import parse_retry_after
from pippin.data.crawl.frontier import Frontier, Kind, NewUrl, State
from pippin.data.crawl.output import JSONL_FILE, PageRecord, RecordWriter
from pippin.data.crawl.robots import Access, RobotsAnswer, RobotsPolicy
from pippin.data.crawl.urls import normalize_url
from pippin.errors import PippinError
from tests.data.crawl_site import Site, chain_site, html, polite_site

ROOT = Path(__file__).resolve().parents[2]
CONTACT = "http://127.0.0.1/crawler-contact"
CRAWL_DELAY = 0.25
HUGE = 64 * 1024 * 1024


def config(**kw) -> CrawlConfig:
    base = dict(contact_url=CONTACT, delay_s=0.05, timeout_s=0.6, max_retries=1, backoff_base_s=0.1, max_pages=None)
    return CrawlConfig(**(base | kw))


@pytest.mark.parametrize(
    "url, expected",
    [
        ("HTTP://Example.COM:80/a/../b/./c?b=2&a=1#frag", "http://example.com/b/c?a=1&b=2"),
        ("https://example.com", "https://example.com/"),
        ("https://example.com:443/x", "https://example.com/x"),
        ("http://example.com:8080/%7Efoo", "http://example.com:8080/~foo"),
        ("http://user:pw@example.com/", "http://example.com/"),
        ("mailto:a@example.com", None),
        ("ftp://example.com/f", None),
        ("http://example.com:99999/", None),
    ],
)
def test_normalize_url(url, expected):
    assert normalize_url(url) == expected


def test_robots_longest_match_and_groups():
    body = (
        "User-agent: *\nDisallow: /\n\n"
        "User-agent: pippin-crawler\nDisallow: /private/\nAllow: /private/open\nDisallow: /*.pdf$\nCrawl-delay: 2\n"
        "Request-rate: 1/5\nSitemap: https://x.org/s.xml\n"
    )
    ours = RobotsPolicy(RobotsAnswer(status=200, body=body), token="pippin-crawler")
    theirs = RobotsPolicy(RobotsAnswer(status=200, body=body), token="otherbot")
    # The longer Allow beats the shorter Disallow (urllib.robotparser would take the first rule that matches).
    assert ours.allowed("https://x.org/private/open.html") and not ours.allowed("https://x.org/private/x.html")
    assert not ours.allowed("https://x.org/a.pdf") and ours.allowed("https://x.org/a.pdf?x=1") and ours.allowed("https://x.org/")
    assert not theirs.allowed("https://x.org/")
    assert ours.delay() == 5.0  # Request-rate 1/5 is stricter than Crawl-delay 2
    assert ours.sitemaps() == ["https://x.org/s.xml"]


@pytest.mark.parametrize(
    "status, access",
    [
        (200, Access.RULES),
        (404, Access.ALLOW_ALL),
        (403, Access.ALLOW_ALL),
        (429, Access.UNREACHABLE),
        (503, Access.UNREACHABLE),
        (None, Access.UNREACHABLE),
    ],
)
def test_robots_status_rules(status, access):
    """RFC 9309 2.3.1: 4xx means no rules; 5xx, 429 and no answer mean nothing may be fetched for now."""
    answer = RobotsAnswer(status=status, body="User-agent: *\nDisallow: /x\n" if status == 200 else None)
    assert answer.access is access
    assert RobotsPolicy(answer, token="pippin-crawler").allowed("http://h/y") == (access is not Access.UNREACHABLE)


def test_retry_after_and_links_and_sitemaps():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 59 < parse_retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))) <= 60
    page = b"<html><head><base href='/dir/'></head><body><a href='a'>a</a><a href='/b#x' rel='nofollow'>b</a><a href='c?z=1&y=2'>"
    assert page_links(page, "http://h/") == ["http://h/dir/a", "http://h/dir/c?y=2&z=1"]
    urlset = b'<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"><url><loc>http://h/p</loc></url></urlset>'
    assert parse_sitemap(gzip.compress(urlset), "http://h/s.xml.gz").pages == ["http://h/p"]
    index = (
        b'<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"><sitemap><loc>http://h/s2.xml</loc></sitemap></sitemapindex>'
    )
    assert parse_sitemap(index, "http://h/").sitemaps == ["http://h/s2.xml"]
    assert parse_sitemap(b"<not xml", "http://h/").pages == []


def test_crawl_local_site(tmp_path):
    with polite_site(crawl_delay=CRAWL_DELAY, huge_bytes=HUGE) as site:
        cfg = config(max_bytes=256 * 1024, max_redirects=3, max_connections_per_host=2, warc=True)
        result = crawl([site.url("/")], out=tmp_path, config=cfg, progress=False)
        log, paths = list(site.log), site.paths()
    u = site.url

    # robots.txt first, and no disallowed URL is ever requested, though linked (and listed in the sitemap).
    assert paths[0] == "/robots.txt"
    assert not [p for p in paths if p.startswith("/private/") and p != "/private/open.html"]
    assert "/report.pdf" not in paths and "/private/open.html" in paths  # Disallow /*.pdf$; Allow beats Disallow
    assert result.counts["page blocked"] == 4  # secret, secret2 (linked), hidden (sitemap), report.pdf
    assert all(h.user_agent == f"pippin-crawler/0.1 (+{CONTACT})" for h in log)

    # Crawl-delay: every request to the host starts at least the delay after the one before (server clock).
    gaps = [b.t - a.t for a, b in zip(log, log[1:])]
    assert min(gaps) >= CRAWL_DELAY - 0.03, gaps  # 0.03: the server's own thread start-up jitter
    # 429 with Retry-After: 1 holds the whole host for a second, then the page is fetched.
    i = paths.index("/limited.html")
    assert log[i + 1].t - log[i].t >= 1.0 - 0.03
    # Each URL once (after normalization: '#part' and reordered queries are the same URL), except the retried ones.
    counts = {p: paths.count(p) for p in paths}
    assert {p: n for p, n in counts.items() if n > 1} == {"/limited.html": 2, "/flaky.html": 2, "/slow.html": 2}
    assert counts["/b.html?x=1&y=2"] == 1 and counts["/a.html"] == 1
    # Redirects: a loop stops when it comes back, a long chain at max_redirects (3 hops).
    assert counts["/loop/a"] == counts["/loop/b"] == 1
    assert [p for p in paths if p.startswith("/chain/")] == ["/chain/0", "/chain/1", "/chain/2", "/chain/3"]
    # The huge file stops being read: the server managed to push only what fits in socket buffers.
    huge = log[paths.index("/huge.txt")]
    assert huge.sent < HUGE // 4, huge.sent

    records = {r["url"]: r for r in read_records(tmp_path)}
    assert len(records) == result.n_records == len(read_records(tmp_path))  # each page once
    expected = {"/", "/a.html", "/b.html?x=1&y=2", "/private/open.html", "/orphan.html", "/old", "/loop/a", "/chain/0"}
    expected |= {
        "/slow.html",
        "/broken.html",
        "/from-broken.html",
        "/limited.html",
        "/flaky.html",
        "/huge.txt",
        "/image.png",
        "/missing.html",
    }
    assert set(records) == {u(p) for p in expected}
    assert all(r["url"].startswith(site.origin) for r in records.values())  # example.com was never queued
    good = {p: records[u(p)] for p in ("/", "/a.html", "/orphan.html", "/limited.html", "/flaky.html", "/old")}
    for r in good.values():
        assert r["status"] == 200 and r["error"] is None and r["fetched_at"].endswith("+00:00")
    assert "text-home" in good["/"]["text"] and "footer text" not in good["/"]["text"]  # main text, no boilerplate
    assert "text-broken" in records[u("/broken.html")]["text"]
    assert good["/old"]["final_url"] == u("/new.html") and "text-new" in good["/old"]["text"]
    assert records[u("/loop/a")]["error"].startswith("redirect loop")
    assert records[u("/chain/0")]["error"].startswith("more than 3 redirects")
    assert records[u("/slow.html")]["status"] is None and "timed out" in records[u("/slow.html")]["error"]
    assert "over the 262144-byte limit" in records[u("/huge.txt")]["error"]
    assert "image/png" in records[u("/image.png")]["error"] and records[u("/image.png")]["n_bytes"] == 0
    assert records[u("/missing.html")]["status"] == 404

    # WARC: a response record per fetched page with its body, and a conversion record with the same text.
    with open(tmp_path / "pages.warc.gz", "rb") as f:
        warc = [(r.rec_type, r.rec_headers.get_header("WARC-Target-URI"), r.content_stream().read()) for r in ArchiveIterator(f)]
    responses = {uri: body for kind, uri, body in warc if kind == "response"}
    conversions = {uri: body.decode() for kind, uri, body in warc if kind == "conversion"}
    fetched = {r["final_url"] for r in records.values() if r["status"] == 200 and r["error"] is None}
    assert set(responses) == set(conversions) == fetched
    assert b"text-orphan" in responses[u("/orphan.html")] and conversions[u("/a.html")] == records[u("/a.html")]["text"]


def test_robots_unreachable_disallows_and_missing_allows(tmp_path):
    down = Site({"/robots.txt": (503, {"Content-Type": "text/plain"}, b"down"), "/": html("down")})
    missing = Site({"/": html("free", "/next.html"), "/next.html": html("next")})
    with down, missing:
        result = crawl([down.url("/"), missing.url("/")], out=tmp_path, config=config(), progress=False)
    assert down.paths() == ["/robots.txt", "/robots.txt"]  # one retry (max_retries=1), then the host is given up
    assert missing.paths() == ["/robots.txt", "/", "/sitemap.xml", "/next.html"]  # 404: no rules at all
    records = {r["url"]: r for r in read_records(tmp_path)}
    assert "robots.txt unreachable" in records[down.url("/")]["error"] and records[down.url("/")]["status"] is None
    assert "text-next" in records[missing.url("/next.html")]["text"]
    assert result.counts["page failed"] == 1


def test_resume_with_a_changed_config(tmp_path):
    """max_pages (and pace, retries) may change on resume; max_depth (what gets crawled) may not."""
    old = config()
    assert check_resume(old, config(max_pages=10, delay_s=2.0), tmp_path) == ["delay_s", "max_pages"]
    with pytest.raises(PippinError, match="max_bytes"):
        check_resume(old, config(max_bytes=10), tmp_path)
    routes = {"/robots.txt": (404, {}, b""), "/": html("one", "/two.html"), "/two.html": html("two", "/three.html")}
    with Site(routes | {"/three.html": html("three")}) as site:
        first = crawl([site.url("/")], out=tmp_path, config=config(read_sitemaps=False, max_pages=1), progress=False)
        with pytest.raises(PippinError, match="max_depth"):
            crawl([], out=tmp_path, config=config(read_sitemaps=False, max_depth=1), progress=False)
        again = crawl([], out=tmp_path, config=config(read_sitemaps=False, max_pages=5), progress=False)
    assert first.n_records == 1 and again.resumed and again.changed == ["max_pages"] and again.n_new_records == 2
    assert site.paths() == ["/robots.txt", "/", "/two.html", "/three.html"]
    assert [r["url"] for r in read_records(tmp_path)] == [site.url(p) for p in ("/", "/two.html", "/three.html")]


def test_cli_needs_a_contact_and_refuses_bad_seeds(tmp_path, capsys):
    from pippin.cli import main

    assert main(["crawl", "http://127.0.0.1:9/", "--out", str(tmp_path)]) == 2
    assert "--contact-url" in capsys.readouterr().err
    assert main(["crawl", "ftp://127.0.0.1/x", "--out", str(tmp_path), "--contact-url", CONTACT]) == 2
    assert "not an http(s) URL" in capsys.readouterr().err
    assert main(["crawl", "--out", str(tmp_path / "empty"), "--contact-url", CONTACT]) == 2
    assert "no crawl to resume" in capsys.readouterr().err
    with pytest.raises(PippinError, match="outside allowed_domains"):  # refused before any request
        crawl(["http://example.org/"], out=tmp_path / "scoped", config=config(allowed_domains=("127.0.0.1",)), progress=False)


def test_uncommitted_record_is_dropped(tmp_path):
    """A record appended by a run killed before its commit is cut off when the folder is opened again."""
    frontier = Frontier(tmp_path)
    frontier.add_seeds(["http://h/a", "http://h/b"])
    a, b = frontier.next_for("http://h", now=time.time(), exclude=set()), None
    rec = dict(fetched_at="t", status=200, content_type="text/html", depth=0, n_bytes=1, error=None, text="x")
    writer = RecordWriter(tmp_path, committed={}, warc=False)
    lengths = writer.append(PageRecord(url=a.url, final_url=a.url, **rec))
    frontier.finish(a, State.DONE, status=200, found=[NewUrl(url="http://h/c", kind=Kind.PAGE, depth=1)], output=lengths)
    b = frontier.next_for("http://h", now=time.time(), exclude=set())
    writer.append(PageRecord(url=b.url, final_url=b.url, **rec))  # ... and killed here, before the commit
    writer.close()
    assert len(read_records(tmp_path)) == 2
    RecordWriter(tmp_path, committed={JSONL_FILE: frontier.committed(JSONL_FILE)}, warc=False).close()
    assert [r["url"] for r in read_records(tmp_path)] == ["http://h/a"]
    assert [e.url for e in frontier.queued("http://h")] == ["http://h/b", "http://h/c"]
    frontier.close()


def _done_pages(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT COUNT(*) FROM urls WHERE kind='page' AND state='done'").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0


def test_kill_and_resume_fetches_nothing_twice(tmp_path):
    n_pages, kill_after = 12, 4
    out = tmp_path / "crawl"
    with chain_site(n_pages, crawl_delay=0.3) as site:
        cmd = [
            sys.executable,
            "-m",
            "pippin",
            "crawl",
            site.url("/p0.html"),
            "--out",
            str(out),
            "--contact-url",
            CONTACT,
            "--no-progress",
            "--warc",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        # Kill right after a page is committed: the next request waits out the 0.3 s crawl delay, so nothing is in flight.
        while _done_pages(out / "state.sqlite") < kill_after:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        first = read_records(out)
        assert kill_after <= len(first) < n_pages
        # Resume with the stored settings (the CLI does the same when run again; its start-up is slow to test twice).
        stored = CrawlConfig.from_json(json.loads((out / "config.json").read_text()))
        result = crawl([], out=out, config=stored, progress=False)
        paths = site.paths()
    assert result.resumed and result.n_records == n_pages and result.n_new_records == n_pages - len(first)
    assert sorted(paths) == sorted(set(paths)), paths  # no URL (robots.txt and sitemap included) fetched twice
    records = read_records(out)
    assert sorted(r["url"] for r in records) == sorted(site.url(f"/p{i}.html") for i in range(n_pages))
    with open(out / "pages.warc.gz", "rb") as f:
        warc = [r.rec_headers.get_header("WARC-Target-URI") for r in ArchiveIterator(f) if r.rec_type == "response"]
    assert warc == [r["url"] for r in records]
    assert records[: len(first)] == first  # the killed run's records are kept as they were
    for r in records:
        assert f"text-{r['url'].rsplit('/', 1)[1].removesuffix('.html')}" in r["text"]
