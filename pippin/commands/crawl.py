"""`pippin crawl`: a polite crawl from seed URLs into a folder of page records (JSONL, optionally WARC).

  pippin crawl https://example.org/ --out crawls/ex --contact-url https://example.org/about-our-crawler
  pippin crawl seeds.txt --out crawls/ex --contact-url mailto:me@example.org --max-pages 5000 --warc
  pippin crawl --out crawls/ex                      # resume a killed or finished crawl with its stored settings

A SEED is a URL or a text file of URLs (one a line, '#' comments). The crawl writes DIR/pages.jsonl (url, final_url,
fetched_at, status, content_type, error, text, ...), DIR/state.sqlite (frontier and seen set) and DIR/config.json;
running the same command again resumes without refetching. See pippin.data.crawl and docs/data.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("seeds", nargs="*", metavar="SEED", help="seed URLs, or files with one URL a line (none: resume --out)")
    p.add_argument("--out", required=True, help="crawl folder: pages.jsonl, state.sqlite, config.json (resumed if it holds a crawl)")
    p.add_argument("--contact-url", default=None, help="who runs the crawl, sent in User-Agent (https://... or mailto:...); required")
    p.add_argument("--config", default=None, help="a JSON file of CrawlConfig fields; flags override it")
    p.add_argument("--user-agent", default=None, help="product token/version, e.g. pippin-crawler/0.1 (picks the robots.txt group)")
    p.add_argument("--max-pages", type=int, default=None, help="stop after this many page records (default 1000; 0: no limit)")
    p.add_argument("--max-depth", type=int, default=None, help="links to follow from a seed (default 5)")
    p.add_argument("--delay", type=float, default=None, help="seconds between requests to a host without Crawl-delay (default 1)")
    p.add_argument("--max-connections-per-host", type=int, default=None, help="requests in flight per host (default 2)")
    p.add_argument("--max-bytes", type=int, default=None, help="largest page body in bytes (default 5 MiB)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per request, body included (default 30)")
    p.add_argument(
        "--allowed-domain",
        action="append",
        default=None,
        help="crawl this domain and its subdomains (repeatable; default: the seeds' hosts)",
    )
    p.add_argument("--no-sitemaps", action="store_true", help="do not read sitemaps")
    p.add_argument("--warc", action="store_true", help="also write DIR/pages.warc.gz")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def read_seeds(items: list[str]) -> list[str]:
    from pippin.errors import PippinError

    seeds = []
    for item in items:
        if "://" in item:
            seeds.append(item)
            continue
        path = Path(item)
        if not path.is_file():
            raise PippinError(f"seed {item!r} is neither a URL (https://...) nor a file of URLs.")
        seeds += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return seeds


def build_config(args: argparse.Namespace):
    from pippin.data.crawl import CrawlConfig
    from pippin.data.crawl.config import CONFIG_FILE
    from pippin.errors import PippinError

    # Resuming starts from the stored settings, so the same command (or a shorter one) continues the same crawl.
    stored = Path(args.out) / CONFIG_FILE
    fields = json.loads(stored.read_text()) if stored.is_file() else {}
    if args.config:
        try:
            fields.update(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise PippinError(f"cannot read --config {args.config} as JSON ({e}).") from None
    flags = {
        "contact_url": args.contact_url,
        "user_agent": args.user_agent,
        "max_depth": args.max_depth,
        "delay_s": args.delay,
        "max_connections_per_host": args.max_connections_per_host,
        "max_bytes": args.max_bytes,
        "timeout_s": args.timeout,
        "allowed_domains": tuple(args.allowed_domain) if args.allowed_domain else None,
    }
    fields.update({k: v for k, v in flags.items() if v is not None})
    if args.max_pages is not None:
        fields["max_pages"] = args.max_pages or None
    if args.no_sitemaps:
        fields["read_sitemaps"] = False
    if args.warc:
        fields["warc"] = True
    if not fields.get("contact_url"):
        raise PippinError("say who runs this crawl: --contact-url https://... or mailto:... (sent to every site in User-Agent).")
    return CrawlConfig.from_json(fields)


def run(args: argparse.Namespace) -> int:
    from pippin.errors import PippinError

    try:
        from pippin.data.crawl import crawl
    except ImportError as e:
        raise PippinError(f"pippin crawl needs {e.name}, which is not installed: pip install 'pippin[crawl]'.") from None

    config = build_config(args)
    result = crawl(read_seeds(args.seeds), out=args.out, config=config, progress=not args.no_progress)
    if args.json:
        print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}))
        return 0
    if result.changed:
        print(f"resumed with changed settings (harmless): {', '.join(result.changed)}")
    print(f"{'urls':<24}{'count':>8}")
    for key, n in result.counts.items():
        print(f"{key:<24}{n:>8}")
    print(f"page records: {result.n_records} ({result.n_new_records} new) -> {Path(args.out) / 'pages.jsonl'}")
    print(f"requests: {result.n_requests} in {result.elapsed_s:.1f} s")
    return 0
