"""Turn img2dataset's per-sample outcome (``status`` + ``error_message`` in each crawl
shard's parquet) into counted rejection reasons, and check that every URL handed to the
crawl came back with an outcome.

    counts, ok_rows = crawl_accounting(layout, plan, prepare_summary)

Reasons (``stage/reason``):
  download/http_error        HTTP 4xx/5xx              download/timeout   slower than crawl.timeout
  download/opt_out           X-Robots-Tag directive    download/connection_error  refused, DNS, TLS...
  download/error             anything else while downloading
  decode/undecodable         not an image, truncated   decode/empty_body  zero-byte response
  decode/decompression_bomb  more pixels than crawl.max_image_pixels
  decode/error               anything else while decoding/resizing
  download/truncated         the body ended before its declared length (a cut connection)
  crawl/lost                 a URL handed to img2dataset with no outcome row (never expected)

The crawl's fetcher (:mod:`data_pipeline.fetch`) starts each failure message with its
reason in brackets (``[download/too_many_requests] HTTP Error 429: ...``); that reason is
counted as is (adding ``optout/tdm_reservation_header``, ``download/too_many_requests``,
``download/unavailable``, ``download/deadline``, ``politeness/host_busy``,
``crawl/shard_deadline``, ``crawl/shard_killed``, ``crawl/shard_failed``). The text
classification below reads crawl shards written without it.

Refusals and failures of the egress proxy (:mod:`data_pipeline.egress`) arrive as the
reason phrase of its answer (``HTTP Error 403: safety/redirect_to_private``, ``Tunnel
connection failed: 403 safety/private_address``) and are counted under that reason:
``safety/private_address``, ``safety/redirect_to_private``, ``safety/redirect_bad_scheme``,
``safety/bad_scheme``, ``safety/unresolvable``, ``safety/body_too_large``,
``safety/deadline``, ``safety/bad_request``, ``download/connection_error``,
``download/bad_response``. Only those exact reasons are trusted (the proxy replaces an
origin's own reason phrase, so a server cannot fake one). A body cut after its answer
started shows here as ``download/truncated`` (or a TLS error); the proxy's own counts in
``stats.json`` say why it was cut.
"""
from __future__ import annotations

import re
from collections import Counter

import pyarrow.parquet as pq

from data_pipeline import fsutil
from data_pipeline.egress import REASONS as EGRESS_REASONS
from data_pipeline.fetch import tag_of
from data_pipeline.layout import Layout

LOST = "crawl/lost"
_HTTP = re.compile(r"HTTP Error \d{3}")
# urllib's texts for an answer from the proxy: "HTTP Error 403: <reason>" (plain HTTP) and
# "Tunnel connection failed: 403 <reason>" (https): the reason is the whole phrase.
_PROXY = re.compile(r"(?:HTTP Error \d{3}: |Tunnel connection failed: \d{3} )([a-z]+/[a-z_]+)(?![\w/])")


def classify(status: str | None, error: str | None) -> str | None:
    """None for a success, else the counted reason (see module docstring)."""
    if status == "success":
        return None
    msg = error or ""
    if status == "failed_to_download":
        tag = tag_of(msg)  # the crawl's fetcher names its reason first
        if tag is not None:
            return tag
    low = msg.lower()
    if status == "failed_to_resize":
        if "cv_io_max_image_pixels" in low:
            return "decode/decompression_bomb"
        if "!buf.empty()" in low:
            return "decode/empty_body"
        if "image decoding error" in low:
            return "decode/undecodable"
        return "decode/error"
    proxy = _PROXY.search(msg)
    if proxy is not None and proxy.group(1) in EGRESS_REASONS:
        return proxy.group(1)
    if "x-robots-tag" in low:
        return "download/opt_out"
    if "incompleteread" in low:
        return "download/truncated"
    if _HTTP.search(msg):
        return "download/http_error"
    if "timed out" in low or "timeout" in low:
        return "download/timeout"
    if "hash mismatch" in low:
        return "download/hash_mismatch"
    if "urlopen error" in low or "connection" in low or "remote end closed" in low:
        return "download/connection_error"
    return "download/error"


def row_outcomes(layout: Layout, shard_names: list[str]) -> dict[int, tuple[str | None, str]]:
    """input_row -> (reason or None for a success, crawl shard name) over ``shard_names``
    in order: a success anywhere wins (a ``--retry-failed`` round fetched it), else the
    last failure counts; a sample written twice by a retried shard counts once."""
    out: dict[int, tuple[str | None, str]] = {}
    for name in shard_names:
        url = fsutil.join(layout.crawl_dir, name + ".parquet")
        fs, path = fsutil.url_to_fs(url)
        with fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=["input_row", "status", "error_message"]).to_pydict()
        for row, status, err in zip(t["input_row"], t["status"], t["error_message"]):
            if row in out and out[row][0] is None:
                continue
            out[row] = (classify(status, err), name)
    return out


def crawl_accounting(layout: Layout, shard_names: list[str], passed: int) -> tuple[dict[str, int], int]:
    """(counts by reason, number of successes) over the crawl shards ``shard_names``.

    ``passed`` is how many URLs the crawl was given; any without an outcome row count as
    ``crawl/lost`` so the totals always add up.
    """
    counts: Counter[str] = Counter()
    successes = 0
    outcomes = row_outcomes(layout, shard_names)
    for reason, _ in outcomes.values():
        if reason is None:
            successes += 1
        else:
            counts[reason] += 1
    if passed > len(outcomes):
        counts[LOST] += passed - len(outcomes)
    return dict(sorted(counts.items())), successes
