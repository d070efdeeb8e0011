"""What the crawler takes from a body: a page's main text and links, a sitemap's URLs.

Main text is trafilatura's (boilerplate such as menus and footers removed; it copes with broken HTML through lxml);
text/plain bodies are kept as they are. Links are the href of <a> and <area> elements resolved against the page URL
(or its <base href>), skipping rel="nofollow". Sitemaps (sitemaps.org: a urlset or a sitemap index, gzipped or not)
are parsed by lxml with entities and network access off, and a gzipped one is inflated to at most a fixed size.
This module does no I/O.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import lxml.etree
import lxml.html
import trafilatura

from pippin.data.crawl.urls import normalize_url

MAX_SITEMAP_BYTES = 50 * 1024 * 1024  # the sitemaps.org limit for an uncompressed sitemap
HTML_TYPES = ("text/html", "application/xhtml+xml")

logging.getLogger("trafilatura").setLevel(logging.ERROR)  # it logs every page it finds too short at WARNING


def page_text(body: bytes, media_type: str | None, url: str) -> str:
    if media_type in HTML_TYPES:
        return trafilatura.extract(body, url=url, include_comments=False, include_tables=True) or ""
    return body.decode("utf-8", "replace")


def page_links(body: bytes, url: str) -> list[str]:
    """Normalized http(s) links of an HTML page, in document order, without repeats."""
    try:
        doc = lxml.html.document_fromstring(body)
    except (lxml.etree.ParserError, ValueError):  # an empty or unparseable document has no links
        return []
    base = url
    if (base_href := doc.xpath("string(//base/@href)")) and (b := normalize_url(base_href, base=url)):
        base = b
    out: dict[str, None] = {}
    for a in doc.xpath("//a[@href] | //area[@href]"):
        if "nofollow" in (a.get("rel") or "").lower().split():
            continue
        if link := normalize_url(a.get("href"), base=base):
            out[link] = None
    return list(out)


@dataclass(kw_only=True)
class Sitemap:
    pages: list[str]
    """URLs of a <urlset>."""
    sitemaps: list[str]
    """Child sitemaps of a <sitemapindex>."""


def parse_sitemap(body: bytes, url: str) -> Sitemap:
    """The URLs a sitemap lists; an unreadable one lists nothing."""
    if body[:2] == b"\x1f\x8b":
        try:
            body = zlib.decompressobj(wbits=31).decompress(body, MAX_SITEMAP_BYTES)
        except zlib.error:
            return Sitemap(pages=[], sitemaps=[])
    parser = lxml.etree.XMLParser(resolve_entities=False, no_network=True, recover=True, huge_tree=False)
    try:
        root = lxml.etree.fromstring(body, parser=parser)
    except lxml.etree.XMLSyntaxError:
        return Sitemap(pages=[], sitemaps=[])
    if root is None:
        return Sitemap(pages=[], sitemaps=[])
    locs = [normalize_url(t, base=url) for t in root.xpath("//*[local-name()='loc']/text()")]
    locs = [u for u in locs if u]
    if lxml.etree.QName(root).localname == "sitemapindex":
        return Sitemap(pages=[], sitemaps=locs)
    return Sitemap(pages=locs, sitemaps=[])
