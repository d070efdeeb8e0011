#!/bin/sh
# Offline text for recipes/pipeline-offline.json, from Debian packages already on the machine or installable:
#   the King James Bible (public domain; `bible-kjv`), one file per book, a blank line between chapters;
#   man pages (section 1, rendered to plain text by man-db/groff; licences vary, mostly free software licences);
#   a crawl's JSONL rows (url, text, fetched_at, status), copied when CRAWL names a folder or file.
# Python's documentation (python3-doc, PSF licence) is read in place from /usr/share/doc/python3.11/html/_sources.
#   apt-get install -y bible-kjv python3-doc man-db groff-base
#   sh recipes/prepare-offline-text.sh [OUT=runs/text] [N_MAN=2000] [CRAWL=path]
set -eu
OUT=${OUT:-runs/text}
N_MAN=${N_MAN:-2000}
mkdir -p "$OUT/kjv" "$OUT/man"
command -v bible >/dev/null || { echo "bible not found: apt-get install -y bible-kjv" >&2; exit 2; }
# "Ge1:1 In the beginning ..." -> runs/text/kjv/Ge.txt, chapters separated by blank lines
bible -f gen1:1-rev22:21 | awk -v out="$OUT/kjv" '
  match($0, /^[0-9]?[A-Za-z]+/) {
    book = substr($0, RSTART, RLENGTH); rest = substr($0, RLENGTH + 1); split(rest, cv, ":")
    if (book != last) { if (f) close(f); f = out "/" book ".txt"; printf "" > f; last = book; ch = "" }
    if (cv[1] != ch) { if (ch != "") print "" >> f; ch = cv[1] }
    sub(/^[^ ]+ /, ""); print >> f
  }'
find /usr/share/man/man1 -name '*.1.gz' | sort | head -n "$N_MAN" | while read -r page; do
  name=$(basename "$page" .1.gz)
  MANWIDTH=80 man -l "$page" 2>/dev/null | col -bx > "$OUT/man/$name.txt" || rm -f "$OUT/man/$name.txt"
done
if [ -n "${CRAWL:-}" ]; then
  mkdir -p "$OUT/crawl"
  find "$CRAWL" -name '*.jsonl*' -type f -exec cp {} "$OUT/crawl/" \;
fi
du -sh "$OUT"/*
