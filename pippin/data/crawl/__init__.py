"""A polite web crawler for pretraining text: `crawl(seeds, out=DIR, config=CrawlConfig(...))` or `pippin crawl`.

It honours robots.txt (per user-agent group: Allow, Disallow, Crawl-delay, Request-rate, Sitemap), keeps per-host
delays and connection limits, retries 429 and 5xx with backoff and Retry-After, follows redirects up to a limit,
deduplicates normalized URLs, caps body size and media types, extracts main text with trafilatura, and writes
DIR/pages.jsonl (and optionally WARC). Frontier and seen set live in DIR/state.sqlite: a killed crawl resumes
without refetching what it recorded. It does not render JavaScript or filter the text (that is the data pipeline's
job). Modelled on Scrapy's scheduler, dupe filter and robots middleware; RFC 9309 for robots.txt.
"""

from pippin.data.crawl.config import CrawlConfig
from pippin.data.crawl.crawler import CrawlResult, crawl
from pippin.data.crawl.output import JSONL_FILE, WARC_FILE, PageRecord, read_records

__all__ = ["JSONL_FILE", "WARC_FILE", "CrawlConfig", "CrawlResult", "PageRecord", "crawl", "read_records"]
