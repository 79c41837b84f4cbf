"""The data build's typed configuration: one dataclass tree, from YAML + ``--key=value``,
built by the project's one config engine (pretrain/config/engine.py: strict keys with the
nearest valid name, checked types, ``base:`` chains), as the run config is.

    cfg = load_config("build.yaml", ["crawl.timeout=5", "shard.samples_per_shard=1000"])
    cfg.crawl.image_size, cfg.filter.image.min_side, cfg.shard.samples_per_shard

Sections: ``crawl`` (input reading, safety, img2dataset), ``filter`` (the filter rules,
:class:`data_pipeline.filter.FilterConfig`), ``shard`` (output shards). Top level: ``urls``,
``output`` and ``processes``. :func:`dataset_identity` is the part that defines the
dataset (what an output directory is bound to); process and thread counts are not in it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal


from data_pipeline import fsutil
from data_pipeline.filter import FilterConfig
from pretrain.config.engine import ConfigError, deep_merge, from_dict, read_config_file, set_dotted, to_dict
from pretrain.shards.images import MAX_PIXELS

DEFAULT_OPT_OUTS = ["noai", "noimageai", "noindex", "noimageindex"]


def _h(text: str) -> Any:
    return {"help": text}


@dataclass
class CrawlConfig:
    input_format: Literal["auto", "txt", "csv", "tsv", "parquet", "jsonl"] = field(
        default="auto", metadata=_h("format of the URL list; auto = from the file extension"))
    header: bool = field(default=True, metadata=_h("csv/tsv: first line holds column names (else f0, f1, ...)"))
    url_col: str = field(default="url", metadata=_h("column holding the image URL"))
    caption_col: str | None = field(default="caption", metadata=_h("column holding the caption (null: none)"))
    extra_columns: list[str] | None = field(default=None, metadata=_h("input columns kept in each sample's json (null: all)"))
    image_size: int = field(default=256, metadata=_h("img2dataset resize target in pixels"))
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"] = field(
        default="keep_ratio", metadata=_h("img2dataset resize mode"))
    resize_only_if_bigger: bool = field(default=True, metadata=_h("never upscale small images"))
    encode_format: Literal["jpg", "png", "webp"] = field(default="jpg", metadata=_h("image format in the crawl tars"))
    encode_quality: int = field(default=95, metadata=_h("JPEG/WebP quality (PNG: compression 0-9)"))
    max_image_pixels: int = field(default=MAX_PIXELS, metadata=_h(
        "decompression-bomb cap: images declaring more pixels are refused before decoding"))
    timeout: float = field(default=10.0, metadata=_h("seconds per socket operation of an HTTP request"))
    download_deadline: float = field(default=60.0, metadata=_h(
        "seconds one connection (one download, or one redirect hop) may take in all; slower: cut"))
    max_body_bytes: int = field(default=32 * 1024 * 1024, metadata=_h(
        "largest response body the crawl accepts, in bytes; larger: refused (Content-Length) or cut"))
    retries: int = field(default=2, metadata=_h(
        "extra attempts per URL after a transient failure (timeout, connection reset, 429, 502-504)"))
    backoff_s: float = field(default=1.0, metadata=_h(
        "base of the exponential backoff between attempts (full jitter: up to backoff_s * 2**attempt)"))
    max_retry_after_s: float = field(default=60.0, metadata=_h(
        "longest Retry-After waited for; a longer one fails the URL now (--retry-failed fetches it later)"))
    host_max_connections: int = field(default=8, metadata=_h(
        "connections to one host at once, over all crawl processes and machines (0: no limit)"))
    host_rate: float = field(default=4.0, metadata=_h(
        "new connections per second to one host, over all crawl processes and machines (0: no limit)"))
    host_wait_s: float = field(default=600.0, metadata=_h(
        "longest a URL waits in all for a slot of its host; then politeness/host_busy (transient)"))
    shard_deadline: float = field(default=7200.0, metadata=_h(
        "seconds a crawl shard may take: no download starts after it (crawl/shard_deadline)"))
    shard_grace_s: float = field(default=120.0, metadata=_h(
        "the watchdog kills a crawl shard's process still running shard_deadline + download_deadline + "
        "this many seconds after it started, and retries the shard (max_shard_retry times)"))
    thread_count: int = field(default=64, metadata=_h("download threads per process"))
    number_sample_per_shard: int = field(default=10_000, metadata=_h("URLs per crawl tar"))
    distributor: Literal["multiprocessing", "pyspark", "ray"] = field(
        default="multiprocessing", metadata=_h("img2dataset distributor (pyspark/ray: many machines)"))
    subjob_size: int = field(default=1000, metadata=_h("pyspark: crawl shards per Spark job"))
    max_shard_retry: int = field(default=1, metadata=_h(
        "more attempts at a crawl shard whose process was killed by the watchdog or failed"))
    disallowed_header_directives: list[str] = field(default_factory=lambda: list(DEFAULT_OPT_OUTS), metadata=_h(
        "X-Robots-Tag directives that opt an image out ([] honours none)"))
    user_agent_token: str | None = field(default=None, metadata=_h(
        "token matched in X-Robots-Tag's per-agent directives (null: crawl.user_agent)"))
    user_agent: str = field(default="clip-pretrain", metadata=_h(
        "the crawler's product token: robots.txt rules are matched for it"))
    contact_url: str | None = field(default=None, metadata=_h(
        "URL site owners can reach the crawl's operator at: every request's User-Agent is "
        "'<user_agent>/1.0 (+<contact_url>)'"))
    robots_txt: bool = field(default=True, metadata=_h("honour robots.txt (fetched once per host before the crawl)"))
    robots_unreachable: Literal["allow", "deny"] = field(default="allow", metadata=_h(
        "robots.txt answering 5xx or unreachable: allow the host's URLs (the crawl's own fetch "
        "then meets the same host) or deny them (strict RFC 9309 2.3.1.4)"))
    robots_deadline: float = field(default=10.0, metadata=_h("seconds one robots.txt / tdmrep.json fetch may take"))
    tdmrep: bool = field(default=True, metadata=_h(
        "honour the W3C TDM Reservation Protocol's /.well-known/tdmrep.json per host"))
    allow_private_addresses: bool = field(default=False, metadata=_h(
        "crawl URLs on loopback/private/link-local hosts (off: refused and counted)"))
    allowed_networks: list[str] = field(default_factory=list, metadata=_h(
        "CIDR networks exempt from the private-address refusal, e.g. [127.0.0.1/32]"))
    egress_bind: str = field(default="127.0.0.1", metadata=_h(
        "address the crawl's egress proxy listens on (0.0.0.0: Spark/Ray workers on other machines)"))
    egress_port: int = field(default=0, metadata=_h("port of the egress proxy (0: a free one)"))
    egress_advertise: str | None = field(default=None, metadata=_h(
        "address workers reach the egress proxy at (null: egress_bind)"))

    def __post_init__(self) -> None:
        for name in ("image_size", "thread_count", "number_sample_per_shard", "max_image_pixels", "subjob_size",
                     "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"crawl.{name} must be >= 1")
        if self.timeout <= 0 or self.retries < 0:
            raise ValueError("crawl.timeout must be > 0 and crawl.retries >= 0")
        if self.backoff_s < 0 or self.max_retry_after_s < 0 or self.host_wait_s < 0:
            raise ValueError("crawl.backoff_s, crawl.max_retry_after_s and crawl.host_wait_s must be >= 0")
        if self.host_max_connections < 0 or self.host_rate < 0:
            raise ValueError("crawl.host_max_connections and crawl.host_rate must be >= 0 (0: no limit)")
        if self.shard_deadline <= 0 or self.shard_grace_s < 0:
            raise ValueError("crawl.shard_deadline must be > 0 and crawl.shard_grace_s >= 0")
        if self.robots_deadline <= 0:
            raise ValueError("crawl.robots_deadline must be > 0")
        if not re.fullmatch(r"[A-Za-z_-]+", self.user_agent):
            raise ValueError("crawl.user_agent must be a product token (letters, '-' and '_', RFC 9309 2.2.1)")
        if self.download_deadline <= 0:
            raise ValueError("crawl.download_deadline must be > 0")
        if not 0 <= self.egress_port <= 65535:
            raise ValueError("crawl.egress_port must be in 0..65535")
        if self.egress_bind in ("0.0.0.0", "::", "") and not self.egress_advertise:
            raise ValueError(f"crawl.egress_bind={self.egress_bind!r} listens everywhere: set crawl.egress_advertise "
                             "to the address the crawl workers reach this machine at")


@dataclass
class ShardConfig:
    samples_per_shard: int = field(default=10_000, metadata=_h("samples per output tar (the last one partial)"))
    jpeg_quality: int = field(default=95, metadata=_h("quality when an image must be re-encoded as RGB JPEG"))
    name_digits: int = field(default=5, metadata=_h("zero-padded digits of shard names (00000.tar)"))

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1 or not 1 <= self.jpeg_quality <= 100 or self.name_digits < 1:
            raise ValueError("shard.samples_per_shard >= 1, shard.jpeg_quality in 1..100, shard.name_digits >= 1")


def _default_filter() -> FilterConfig:
    cfg = FilterConfig()
    # The crawl resizes images; size rules must judge what the web served, not the copy.
    cfg.image.size_source = "original"
    return cfg


@dataclass
class BuildConfig:
    urls: str = field(default="", metadata=_h("URL list: a file or directory (fsspec URL)"))
    output: str = field(default="", metadata=_h("output directory (fsspec URL)"))
    processes: int = field(default=0, metadata=_h("worker processes for crawl and filter (0: all cores)"))
    crawl: CrawlConfig = field(default_factory=CrawlConfig)
    filter: FilterConfig = field(default_factory=_default_filter)
    shard: ShardConfig = field(default_factory=ShardConfig)

    def resolved_processes(self) -> int:
        return self.processes if self.processes > 0 else (os.cpu_count() or 1)


# Settings that change speed, not the dataset: left out of the identity and the manifest.
_NOT_IDENTITY = {
    "output", "processes",
    "crawl.thread_count", "crawl.distributor", "crawl.subjob_size", "crawl.max_shard_retry",
    "crawl.egress_bind", "crawl.egress_port", "crawl.egress_advertise", "crawl.contact_url", "crawl.robots_deadline",
    # how hard and how politely the crawl tries, not what it is given
    "crawl.retries", "crawl.backoff_s", "crawl.max_retry_after_s", "crawl.host_max_connections", "crawl.host_rate",
    "crawl.host_wait_s", "crawl.shard_deadline", "crawl.shard_grace_s",
    "filter.clip_score.batch_size", "filter.clip_score.device",
    # both engines of pass 2 write byte-identical decisions
    "filter.global_pass.engine", "filter.global_pass.spark_min_rows", "filter.global_pass.spark_master",
}


def _drop(d: dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if rest:
        if isinstance(d.get(head), dict):
            _drop(d[head], rest)
    else:
        d.pop(head, None)


def dataset_identity(cfg: BuildConfig) -> dict[str, Any]:
    d = to_dict(cfg)
    for k in _NOT_IDENTITY:
        _drop(d, k)
    return d


def config_dict(cfg: BuildConfig) -> dict[str, Any]:
    return to_dict(cfg)


def load_config(path: str | None = None, overrides: list[tuple[str, Any]] | None = None,
                base: dict[str, Any] | None = None) -> BuildConfig:
    """Defaults <- ``base`` (e.g. the config saved in an output dir) <- YAML file <- overrides."""
    # Start from the full default tree: a partial section in YAML (filter.image.min_side)
    # then keeps this build's defaults for its other keys (filter.image.size_source).
    data: dict[str, Any] = deep_merge(to_dict(BuildConfig()), base or {})
    if path:
        if not fsutil.exists(path):
            raise ConfigError(f"config file not found: {path}")
        data = deep_merge(data, read_config_file(path))
    data = set_dotted(data, overrides or [])
    return from_dict(BuildConfig, data)
