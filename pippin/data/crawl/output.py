"""The crawl's output: DIR/pages.jsonl (one record per page) and, if asked, DIR/pages.warc.gz, append-only.

A record is appended, flushed and fsynced, and only then committed by the frontier's transaction, which stores each
file's new length. Opening a writer cuts each file back to its committed length: a record whose URL was not marked
finished (the run was killed between the two steps) is dropped, and the page is fetched and written again. So a
record is never half-written or duplicated after a kill. The WARC file is gzip per record (warcio's default), so a
cut at a record boundary leaves a valid file. This module does not fetch or extract anything.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from pippin.errors import PippinError

JSONL_FILE = "pages.jsonl"
WARC_FILE = "pages.warc.gz"


@dataclass(kw_only=True)
class PageRecord:
    """One line of pages.jsonl."""

    url: str
    """The URL as seeded or linked (before redirects), normalized."""
    final_url: str
    """The URL that gave the last response, after redirects."""
    fetched_at: str
    """When the last response started, ISO 8601 UTC."""
    status: int | None
    """HTTP status of the last response; None when none came (timeout, connection error)."""
    content_type: str | None
    depth: int
    n_bytes: int
    """Body bytes read (after content decoding); 0 when the body was not read."""
    error: str | None
    """Why no text was kept (error status, too large, type not allowed, redirect loop, ...); None for a good page."""
    text: str
    """Main text (trafilatura for HTML, the body for text/plain); empty when `error` is set or nothing was found."""


@dataclass(kw_only=True)
class RawResponse:
    """What the WARC response record stores: the status line, headers and the (decoded) body as received."""

    url: str
    status: int
    reason: str
    http_version: str
    headers: list[tuple[str, str]]
    body: bytes


class RecordWriter:
    def __init__(self, folder: Path, *, committed: dict[str, int], warc: bool):
        self.folder = Path(folder)
        self.names = [JSONL_FILE] + ([WARC_FILE] if warc else [])
        self.files = {name: self._open(name, committed.get(name, 0)) for name in self.names}

    def _open(self, name: str, committed: int):
        path = self.folder / name
        size = path.stat().st_size if path.exists() else 0
        if size < committed:
            raise PippinError(
                f"{path} is shorter ({size} bytes) than the crawl state says was written ({committed}); the output was "
                "changed outside the crawler. Restore it or start a new --out folder."
            )
        f = open(path, "ab")  # noqa: SIM115 (open for the writer's life; close() closes it)
        if size > committed:  # written by a run killed before its commit: the page is still queued
            f.truncate(committed)
            f.seek(committed)
            os.fsync(f.fileno())
        return f

    def append(self, record: PageRecord, raw: RawResponse | None = None) -> dict[str, int]:
        """Write `record` (and its WARC records when WARC is on and there is a response), durably; returns each
        file's new length for the frontier to commit."""
        self._write(JSONL_FILE, (json.dumps(asdict(record), ensure_ascii=False) + "\n").encode())
        if WARC_FILE in self.files and raw is not None:
            buf = io.BytesIO()
            _write_warc(WARCWriter(buf, gzip=True), record, raw)
            self._write(WARC_FILE, buf.getvalue())
        return {name: f.tell() for name, f in self.files.items()}

    def _write(self, name: str, data: bytes) -> None:
        f = self.files[name]
        f.write(data)
        f.flush()
        os.fsync(f.fileno())

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _write_warc(writer: WARCWriter, record: PageRecord, raw: RawResponse) -> None:
    """A `response` record with the HTTP headers and body, then a `conversion` record with the extracted text."""
    # The body is stored decoded, so the headers must no longer claim a content or transfer encoding.
    headers = [(k, v) for k, v in raw.headers if k.lower() not in ("content-encoding", "transfer-encoding", "content-length")]
    headers.append(("Content-Length", str(len(raw.body))))
    http_headers = StatusAndHeaders(f"{raw.status} {raw.reason}".strip(), headers, protocol=raw.http_version)
    date = record.fetched_at.replace("+00:00", "Z")
    response = writer.create_warc_record(
        raw.url, "response", payload=io.BytesIO(raw.body), http_headers=http_headers, warc_headers_dict={"WARC-Date": date}
    )
    writer.write_record(response)
    text = record.text.encode()
    conversion = writer.create_warc_record(
        raw.url,
        "conversion",
        payload=io.BytesIO(text),
        length=len(text),
        warc_content_type="text/plain; charset=utf-8",
        warc_headers_dict={"WARC-Date": date, "WARC-Refers-To": response.rec_headers.get_header("WARC-Record-ID")},
    )
    writer.write_record(conversion)


def read_records(folder: str | Path) -> list[dict]:
    """The page records of a crawl folder (the rows of pages.jsonl)."""
    path = Path(folder) / JSONL_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
