"""The crawl loop: pick what may be fetched now, fetch it asynchronously, record it, repeat until done or killed.

One asyncio loop and one httpx.AsyncClient. Each origin has a gate: at most `max_connections_per_host` requests in
flight, and request starts at least the robots.txt Crawl-delay (or `delay_s`) apart, redirect hops and retries
included. An origin's robots.txt is fetched before anything else there; a disallowed URL is marked blocked, never
requested. 429 and 5xx answers and timeouts are retried with exponential backoff, or after Retry-After, which also
holds the whole host. Finishing a URL is synchronous (append the record, then commit the frontier), so a kill at any
point leaves a consistent folder, and running the same command again resumes (see frontier.py, output.py).
Like Scrapy's engine and scheduler, much reduced; no JavaScript rendering, no per-page meta robots tags.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from pippin.data.crawl.config import CONFIG_FILE, CrawlConfig, check_resume, load_config
from pippin.data.crawl.extract import MAX_SITEMAP_BYTES, page_links, page_text, parse_sitemap
from pippin.data.crawl.fetch import Fetched, Outcome, fetch, media_type
from pippin.data.crawl.frontier import Entry, Frontier, Kind, NewUrl, RobotsRow, State
from pippin.data.crawl.output import JSONL_FILE, WARC_FILE, PageRecord, RawResponse, RecordWriter
from pippin.data.crawl.robots import RobotsAnswer, RobotsPolicy, fetch_robots
from pippin.data.crawl.urls import host_name, in_scope, normalize_url
from pippin.errors import PippinError
from pippin.io import write_json_atomic

SITEMAP_TYPES = ("application/xml", "text/xml", "application/gzip", "application/x-gzip", "application/octet-stream", "text/plain")


@dataclass(kw_only=True)
class CrawlResult:
    folder: Path
    n_records: int
    """Page records in DIR/pages.jsonl (this run and earlier ones)."""
    n_new_records: int
    n_requests: int
    """HTTP requests this run made (robots.txt, sitemaps, pages, retries, redirect hops)."""
    counts: dict[str, int]
    """'kind state' -> URLs, e.g. 'page done', 'page blocked', 'sitemap done'."""
    elapsed_s: float
    resumed: bool
    changed: list[str] = field(default_factory=list)
    """Harmless config fields that differ from the stored crawl."""


class HostGate:
    """Politeness for one origin: a connection limit, and the delay between requests. The delay counts from the
    moment the previous request's headers went out (not when it was scheduled: under load the two differ) and from
    the previous response's end, and no request is scheduled while another is still waiting to go out. So the
    server sees the gap even when a request is slow to leave (and Yandex's reading of Crawl-delay, end to start,
    holds too)."""

    def __init__(self, *, delay_s: float, max_connections: int, last_start: float = float("-inf")):
        self.delay_s, self.max_connections = delay_s, max_connections
        self.in_flight = self.unsent = 0
        self.last_start = self.last_done = last_start
        self.held_until = float("-inf")

    def ready_at(self) -> float | None:
        """Monotonic time the next request may start; None while every connection is busy or one is not yet sent."""
        if self.in_flight >= self.max_connections or self.unsent:
            return None
        return max(max(self.last_start, self.last_done) + self.delay_s, self.held_until)

    def start(self, now: float) -> Slot:
        self.in_flight += 1
        self.unsent += 1
        self.last_start = max(self.last_start, now)
        return Slot(self)

    def hold(self, until: float) -> None:
        """No request before `until` (a 429 or 503 asked the host to be left alone)."""
        self.held_until = max(self.held_until, until)


class Slot:
    """One request's place in its host's gate: `sent` when its headers go out (each redirect hop of robots.txt
    again), `release` when it is over."""

    def __init__(self, gate: HostGate):
        self.gate, self.was_sent = gate, False

    def sent(self) -> None:
        if not self.was_sent:
            self.gate.unsent -= 1
            self.was_sent = True
        self.gate.last_start = max(self.gate.last_start, time.monotonic())

    def release(self) -> None:
        self.sent()  # a request that failed before going out frees its place too
        self.gate.in_flight -= 1
        self.gate.last_done = time.monotonic()


class Crawler:
    def __init__(self, *, config: CrawlConfig, frontier: Frontier, writer: RecordWriter, domains: tuple[str, ...], resumed: bool):
        self.config, self.frontier, self.writer, self.domains = config, frontier, writer, domains
        self.resumed = resumed
        self.gates: dict[str, HostGate] = {}
        self.policies: dict[str, tuple[RobotsPolicy, RobotsRow]] = {}
        self.tasks: dict[asyncio.Task, int | str] = {}  # -> entry id, or origin for a robots.txt fetch
        self.n_records = frontier.n_records()
        self.n_requests = self.n_new = self.pages_in_flight = 0
        self.bar: tqdm | None = None

    # -- scheduling ---------------------------------------------------------------------------------------------------

    async def run(self, *, progress: bool = True) -> None:
        cfg = self.config
        limits = httpx.Limits(max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections)
        self.bar = tqdm(total=cfg.max_pages, initial=self.n_records, unit="page", desc="crawl", disable=not progress)
        # trust_env=False: no proxies or .netrc from the environment; the crawler talks to the sites it names only.
        async with httpx.AsyncClient(
            headers={"User-Agent": cfg.user_agent_header}, follow_redirects=False, trust_env=False, limits=limits
        ) as self.client:
            try:
                while True:
                    wait = self._dispatch()
                    if not self.tasks and wait is None:
                        break
                    if self.tasks:
                        done, _ = await asyncio.wait(self.tasks, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                        for task in done:
                            del self.tasks[task]
                            task.result()  # a bug in a task stops the crawl with its traceback
                    else:
                        await asyncio.sleep(wait)
            finally:
                for task in self.tasks:
                    task.cancel()
                self.bar.close()

    def _budget_left(self) -> bool:
        return self.config.max_pages is None or self.n_records + self.pages_in_flight < self.config.max_pages

    def _dispatch(self) -> float | None:
        """Start every request allowed now; return seconds until one more may be (None: nothing left to wait for)."""
        cfg, wake = self.config, []
        if not self._budget_left():
            return None
        in_flight = {v for v in self.tasks.values() if isinstance(v, int)}
        for org, not_before in self.frontier.queued_origins(in_flight).items():
            now_m, now_w = time.monotonic(), time.time()
            gate = self._gate(org)
            policy = self._policy(org)
            if policy is None or not policy[0].reachable:
                retry_at = self._robots_due(policy)
                if retry_at is None:  # tried too often: give the host up
                    self._give_up_origin(org, policy[1])
                    continue
                if org in self.tasks.values():
                    continue
                ready = gate.ready_at()
                if ready is not None and ready <= now_m and retry_at <= now_w and len(self.tasks) < cfg.max_connections:
                    self.tasks[asyncio.create_task(self._robots(org, gate.start(now_m)))] = org
                elif ready is not None:
                    wake.append(max(ready - now_m, retry_at - now_w))
                continue
            while len(self.tasks) < cfg.max_connections and self._budget_left():
                ready = gate.ready_at()
                if ready is None:
                    break
                if ready > now_m:
                    wake.append(max(ready - now_m, not_before - now_w))
                    break
                entry = self.frontier.next_for(org, now=now_w, exclude=in_flight)
                if entry is None:
                    wake.append(not_before - now_w)
                    break
                if not policy[0].allowed(entry.url):
                    self.frontier.finish(entry, State.BLOCKED, error="disallowed by robots.txt")
                    continue
                slot = gate.start(now_m)
                in_flight.add(entry.id)
                self.pages_in_flight += entry.kind is Kind.PAGE
                self.tasks[asyncio.create_task(self._visit(entry, slot))] = entry.id
        if not wake:
            return None
        return min(max(w, 0.001) for w in wake)

    def _gate(self, org: str) -> HostGate:
        if org not in self.gates:
            # A resumed crawl does not know when the killed run last asked this host: as if it had just now.
            last = time.monotonic() if self.resumed else float("-inf")
            self.gates[org] = HostGate(delay_s=self.config.delay_s, max_connections=self.config.max_connections_per_host, last_start=last)
        return self.gates[org]

    def _policy(self, org: str) -> tuple[RobotsPolicy, RobotsRow] | None:
        """The cached robots.txt policy of an origin, None if there is none or it is older than robots_ttl_s."""
        if org not in self.policies and (row := self.frontier.robots(org)) is not None:
            self._install(org, row)
        got = self.policies.get(org)
        if got is not None and got[0].reachable and time.time() - got[1].fetched_at > self.config.robots_ttl_s:
            return None
        return got

    def _robots_due(self, policy: tuple[RobotsPolicy, RobotsRow] | None) -> float | None:
        """Wall time to (re)fetch robots.txt; None once it failed more than max_retries times in a row."""
        if policy is None:
            return 0.0
        row = policy[1]
        if row.failures > self.config.max_retries:
            return None
        return row.fetched_at + self._backoff(row.failures - 1, jitter=False)

    def _install(self, org: str, row: RobotsRow) -> None:
        policy = RobotsPolicy(RobotsAnswer(status=row.status, body=row.body, error=row.error), token=self.config.robots_token)
        self.policies[org] = (policy, row)
        # A delay learnt from robots.txt applies from the request before it too (the robots.txt fetch itself).
        self._gate(org).delay_s = d if (d := policy.delay()) is not None else self.config.delay_s

    def _backoff(self, n: int, *, jitter: bool = True) -> float:
        """Exponential backoff for the (n+1)-th retry, with equal jitter (so retries of many URLs spread out)."""
        cfg = self.config
        return min(cfg.backoff_cap_s, cfg.backoff_base_s * 2**n) * (random.uniform(0.5, 1.0) if jitter else 1.0)

    def _in_scope(self, url: str) -> bool:
        return in_scope(url, self.domains)

    # -- work ---------------------------------------------------------------------------------------------------------

    async def _robots(self, org: str, slot: Slot) -> None:
        try:
            answer = await fetch_robots(self.client, org, timeout_s=self.config.timeout_s, on_sent=slot.sent)
        finally:
            slot.release()
        self.n_requests += 1
        prev = self.frontier.robots(org)
        failures = 0 if RobotsPolicy(answer, token="").reachable else (prev.failures if prev else 0) + 1
        row = RobotsRow(status=answer.status, body=answer.body, error=answer.error, fetched_at=time.time(), failures=failures)
        self.frontier.save_robots(org, row)
        self._install(org, row)
        policy = self.policies[org][0]
        if policy.reachable and self.config.read_sitemaps:
            maps = [u for s in policy.sitemaps() if (u := normalize_url(s, base=org)) and self._in_scope(u)] or [f"{org}/sitemap.xml"]
            self.frontier.add([NewUrl(url=u, kind=Kind.SITEMAP, depth=0) for u in maps])

    def _give_up_origin(self, org: str, row: RobotsRow) -> None:
        for entry in self.frontier.queued(org):
            error = f"robots.txt unreachable after {row.failures} tries ({row.error}): nothing fetched from {org}"
            self._finish(entry, Fetched(url=entry.url, outcome=Outcome.ERROR, fetched_at="", error=error), state=State.FAILED)

    async def _visit(self, entry: Entry, slot: Slot) -> None:
        cfg = self.config
        is_page = entry.kind is Kind.PAGE
        try:
            try:
                got = await fetch(
                    self.client,
                    entry.url,
                    content_types=cfg.content_types if is_page else SITEMAP_TYPES,
                    max_bytes=cfg.max_bytes if is_page else MAX_SITEMAP_BYTES,
                    timeout_s=cfg.timeout_s,
                    on_sent=slot.sent,
                )
            finally:
                slot.release()
            self.n_requests += 1
            if got.outcome is Outcome.RETRY:
                self._retry(entry, got, slot.gate)
            elif got.outcome is Outcome.REDIRECT:
                self._redirect(entry, got)
            elif not is_page:
                sitemap = parse_sitemap(got.body, entry.url) if got.outcome is Outcome.OK else None
                found = [] if sitemap is None else [NewUrl(url=u, kind=Kind.PAGE, depth=0) for u in sitemap.pages]
                found += [] if sitemap is None else [NewUrl(url=u, kind=Kind.SITEMAP, depth=0) for u in sitemap.sitemaps]
                self._finish(entry, got, state=State.DONE if sitemap else State.FAILED, found=found)
            elif got.outcome is Outcome.OK:
                text, links = await asyncio.to_thread(self._extract, got, entry)
                found = [NewUrl(url=u, kind=Kind.PAGE, depth=entry.depth + 1) for u in links]
                self._finish(entry, got, state=State.DONE, text=text, found=found)
            else:
                self._finish(entry, got, state=State.FAILED)
        finally:
            self.pages_in_flight -= is_page  # after the record is written, so max_pages is never passed

    def _extract(self, got: Fetched, entry: Entry) -> tuple[str, list[str]]:
        mtype = media_type(got.content_type)
        links = page_links(got.body, got.url) if mtype != "text/plain" and entry.depth < self.config.max_depth else []
        return page_text(got.body, mtype, got.url), links

    def _retry(self, entry: Entry, got: Fetched, gate: HostGate) -> None:
        cfg = self.config
        wait = got.retry_after if got.retry_after is not None else self._backoff(entry.attempts)
        if entry.attempts + 1 > cfg.max_retries:
            self._finish(entry, got, state=State.FAILED, error=f"gave up after {entry.attempts + 1} tries: {got.error}")
            return
        if got.retry_after is not None and got.retry_after > cfg.max_retry_after_s:
            error = f"{got.error} with Retry-After {got.retry_after:g} s, over the {cfg.max_retry_after_s:g} s limit"
            self._finish(entry, got, state=State.FAILED, error=error)
            return
        if got.status in (429, 503):  # the server asked for less traffic: hold the whole host, not just this URL
            gate.hold(time.monotonic() + wait)
        self.frontier.retry_later(entry, not_before=time.time() + wait, status=got.status, error=got.error or "")

    def _redirect(self, entry: Entry, got: Fetched) -> None:
        target = normalize_url(got.location or "", base=entry.url)
        chain = [*entry.chain, entry.url]
        error = None
        if target is None:
            error = f"redirect to {got.location!r}, not a crawlable http(s) URL"
        elif target in chain:
            error = "redirect loop: " + " -> ".join([*chain, target])
        elif len(chain) > self.config.max_redirects:
            error = f"more than {self.config.max_redirects} redirects: " + " -> ".join([*chain, target])
        elif not self._in_scope(target):
            error = f"redirect to {target}, outside the crawl's domains"
        if error:
            self._finish(entry, got, state=State.FAILED, error=error)
            return
        new = NewUrl(url=target, kind=entry.kind, depth=entry.depth, chain=tuple(chain))
        self.frontier.finish(entry, State.REDIRECTED, status=got.status, found=[new])

    def _finish(self, entry: Entry, got: Fetched, *, state: State, text: str = "", error: str | None = None, found=()) -> None:
        """Record a finished URL: for a page, append its record and then commit it with the frontier (no await
        between the two, so no other task can interleave)."""
        found = [n for n in found if self._in_scope(n.url)]
        error = error or got.error
        if entry.kind is not Kind.PAGE:
            self.frontier.finish(entry, state, status=got.status, error=error, found=found)
            return
        record = PageRecord(
            url=entry.first_url,
            final_url=entry.url,
            fetched_at=got.fetched_at or time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            status=got.status,
            content_type=got.content_type,
            depth=entry.depth,
            n_bytes=len(got.body),
            error=error,
            text=text,
        )
        raw = None
        if got.outcome is Outcome.OK:
            raw = RawResponse(
                url=got.url, status=got.status, reason=got.reason, http_version=got.http_version, headers=got.headers, body=got.body
            )
        lengths = self.writer.append(record, raw)
        self.frontier.finish(entry, state, status=got.status, error=error, found=found, output=lengths)
        self.n_records += 1
        self.n_new += 1
        if self.bar is not None:
            self.bar.update(1)


def crawl(seeds: list[str], *, out: str | Path, config: CrawlConfig, progress: bool = True) -> CrawlResult:
    """Crawl from `seeds` into the folder `out`, or resume the crawl there (same command; seeds may be omitted)."""
    t0 = time.perf_counter()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PippinError(f"another crawl is running in {folder}; wait for it or use another --out folder.") from None
        stored = load_config(folder)
        changed = check_resume(stored, config, folder) if stored is not None else []
        normalized = []
        for s in seeds:
            if (u := normalize_url(s)) is None:
                raise PippinError(f"seed {s!r} is not an http(s) URL; give full URLs such as https://example.org/.")
            normalized.append(u)
        if stored is None and not normalized:
            raise PippinError(f"{folder} holds no crawl to resume; give seed URLs to start one.")
        frontier = Frontier(folder)
        with contextlib.closing(frontier):
            domains = config.allowed_domains or tuple(sorted({host_name(u) for u in [*frontier.seeds(), *normalized]}))
            outside = [u for u in normalized if not in_scope(u, domains)]
            if outside:
                raise PippinError(f"seeds {outside} are outside allowed_domains {list(domains)}; add their hosts or drop them.")
            write_json_atomic(folder / CONFIG_FILE, config.to_json())
            frontier.add_seeds(normalized)
            names = [JSONL_FILE, WARC_FILE] if config.warc else [JSONL_FILE]
            writer = RecordWriter(folder, committed={n: frontier.committed(n) for n in names}, warc=config.warc)
            with contextlib.closing(writer):
                crawler = Crawler(config=config, frontier=frontier, writer=writer, domains=domains, resumed=stored is not None)
                asyncio.run(crawler.run(progress=progress))
            counts = {f"{k} {s}": n for (k, s), n in sorted(frontier.counts().items())}
            return CrawlResult(
                folder=folder,
                n_records=crawler.n_records,
                n_new_records=crawler.n_new,
                n_requests=crawler.n_requests,
                counts=counts,
                elapsed_s=time.perf_counter() - t0,
                resumed=stored is not None,
                changed=changed,
            )
