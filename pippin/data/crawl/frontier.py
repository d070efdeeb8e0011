"""The crawl's state on disk: frontier, seen set, robots.txt cache and the committed length of the output files.

One SQLite database (DIR/state.sqlite, WAL, synchronous=FULL) holds every URL ever queued (the seen set, keyed by the
normalized URL) with its state, tries and earliest next try; each host's robots.txt; and how many bytes of each
output file are committed. A page is finished in one transaction (its state, the links it found, the new output
lengths), after its record was appended and fsynced: the transaction is the commit point. On open, the output files
are cut back to the committed lengths, so a record written by a run killed before its commit is dropped and its URL,
still queued, is fetched again. Nothing here does I/O over the network.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pippin.data.crawl.urls import origin

STATE_FILE = "state.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS urls (
    id INTEGER PRIMARY KEY,
    url TEXT UNIQUE NOT NULL,
    origin TEXT NOT NULL,
    kind TEXT NOT NULL,
    depth INTEGER NOT NULL,
    chain TEXT NOT NULL DEFAULT '[]',
    state TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    status INTEGER,
    error TEXT
);
CREATE INDEX IF NOT EXISTS urls_queue ON urls (state, origin, id);
CREATE TABLE IF NOT EXISTS robots (
    origin TEXT PRIMARY KEY,
    status INTEGER,
    body TEXT,
    error TEXT,
    fetched_at REAL NOT NULL,
    failures INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS seeds (url TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS output (name TEXT PRIMARY KEY, committed INTEGER NOT NULL);
"""


class Kind(StrEnum):
    PAGE = "page"
    SITEMAP = "sitemap"


class State(StrEnum):
    QUEUED = "queued"
    DONE = "done"  # fetched; a page has a record in the output
    FAILED = "failed"  # given up; a page has a record (with its error) in the output
    BLOCKED = "blocked"  # robots.txt disallows it: never fetched, no record
    REDIRECTED = "redirected"  # answered with a redirect; the target was queued (or had been seen)


@dataclass(kw_only=True)
class Entry:
    id: int
    url: str
    origin: str
    kind: Kind
    depth: int
    chain: list[str]
    """URLs that redirected to this one, first to last."""
    attempts: int

    @property
    def first_url(self) -> str:
        """The URL as linked or seeded, before any redirect."""
        return self.chain[0] if self.chain else self.url


@dataclass(kw_only=True)
class NewUrl:
    url: str
    kind: Kind
    depth: int
    chain: tuple[str, ...] = ()


@dataclass(kw_only=True)
class RobotsRow:
    status: int | None
    body: str | None
    error: str | None
    fetched_at: float
    failures: int


class Frontier:
    def __init__(self, folder: Path):
        self.path = Path(folder) / STATE_FILE
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- writes: each public method is one transaction --------------------------------------------------------------

    def add_seeds(self, urls: list[str]) -> int:
        """Record the seeds and queue those not seen before; returns how many were new."""
        with self._tx():
            self.db.executemany("INSERT OR IGNORE INTO seeds (url) VALUES (?)", [(u,) for u in urls])
            return self._add([NewUrl(url=u, kind=Kind.PAGE, depth=0) for u in urls])

    def add(self, urls: list[NewUrl]) -> int:
        with self._tx():
            return self._add(urls)

    def finish(
        self,
        entry: Entry,
        state: State,
        *,
        status: int | None = None,
        error: str | None = None,
        found: Sequence[NewUrl] = (),
        output: dict[str, int] | None = None,
    ) -> int:
        """Mark `entry` finished, queue what it found and move the output commit marks, atomically; returns how many
        of the found URLs were new."""
        with self._tx():
            self.db.execute("UPDATE urls SET state=?, status=?, error=? WHERE id=?", (state.value, status, error, entry.id))
            n_new = self._add(list(found))
            for name, n in (output or {}).items():
                self.db.execute("INSERT OR REPLACE INTO output (name, committed) VALUES (?, ?)", (name, n))
            return n_new

    def retry_later(self, entry: Entry, *, not_before: float, status: int | None, error: str) -> None:
        with self._tx():
            self.db.execute(
                "UPDATE urls SET attempts=attempts+1, not_before=?, status=?, error=? WHERE id=?",
                (not_before, status, error, entry.id),
            )

    def save_robots(self, origin: str, row: RobotsRow) -> None:
        with self._tx():
            self.db.execute(
                "INSERT OR REPLACE INTO robots (origin, status, body, error, fetched_at, failures) VALUES (?, ?, ?, ?, ?, ?)",
                (origin, row.status, row.body, row.error, row.fetched_at, row.failures),
            )

    def _add(self, urls: list[NewUrl]) -> int:
        before = self.db.total_changes
        self.db.executemany(
            "INSERT OR IGNORE INTO urls (url, origin, kind, depth, chain) VALUES (?, ?, ?, ?, ?)",
            [(n.url, origin(n.url), n.kind.value, n.depth, json.dumps(list(n.chain))) for n in urls],
        )
        return self.db.total_changes - before

    def _tx(self):
        return _Transaction(self.db)

    # -- reads ------------------------------------------------------------------------------------------------------

    def seeds(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT url FROM seeds ORDER BY url")]

    def queued_origins(self, exclude: set[int]) -> dict[str, float]:
        """Each origin with queued URLs not in `exclude` (in flight) -> the earliest time one of them may be tried."""
        marks = ",".join("?" * len(exclude))
        q = f"SELECT origin, MIN(not_before) FROM urls WHERE state='queued' AND id NOT IN ({marks}) GROUP BY origin ORDER BY MIN(id)"
        return dict(self.db.execute(q, tuple(exclude)).fetchall())

    def next_for(self, origin: str, *, now: float, exclude: set[int]) -> Entry | None:
        """The oldest queued URL of `origin` not in `exclude` that may be tried now (breadth-first within a host)."""
        marks = ",".join("?" * len(exclude))
        row = self.db.execute(
            f"SELECT {ENTRY_COLUMNS} FROM urls WHERE state='queued' AND origin=? AND not_before<=? AND id NOT IN ({marks}) "
            "ORDER BY id LIMIT 1",
            (origin, now, *exclude),
        ).fetchone()
        return None if row is None else _entry(row)

    def queued(self, origin: str) -> list[Entry]:
        rows = self.db.execute(f"SELECT {ENTRY_COLUMNS} FROM urls WHERE state='queued' AND origin=? ORDER BY id", (origin,))
        return [_entry(r) for r in rows]

    def robots(self, origin: str) -> RobotsRow | None:
        r = self.db.execute("SELECT status, body, error, fetched_at, failures FROM robots WHERE origin=?", (origin,)).fetchone()
        return None if r is None else RobotsRow(status=r[0], body=r[1], error=r[2], fetched_at=r[3], failures=r[4])

    def committed(self, name: str) -> int:
        r = self.db.execute("SELECT committed FROM output WHERE name=?", (name,)).fetchone()
        return 0 if r is None else r[0]

    def counts(self) -> dict[tuple[str, str], int]:
        """(kind, state) -> number of URLs."""
        return {(k, s): n for k, s, n in self.db.execute("SELECT kind, state, COUNT(*) FROM urls GROUP BY kind, state")}

    def n_records(self) -> int:
        """Page records in the output (finished pages, fetched or given up)."""
        q = "SELECT COUNT(*) FROM urls WHERE kind='page' AND state IN ('done', 'failed')"
        return self.db.execute(q).fetchone()[0]


ENTRY_COLUMNS = "id, url, origin, kind, depth, chain, attempts"


def _entry(row: tuple) -> Entry:
    id_, url, org, kind, depth, chain, attempts = row
    return Entry(id=id_, url=url, origin=org, kind=Kind(kind), depth=depth, chain=json.loads(chain), attempts=attempts)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception (the connection runs in autocommit mode otherwise)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
