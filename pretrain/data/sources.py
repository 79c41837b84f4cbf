"""Where training data comes from: shard patterns, data-build manifests, opening a shard.

A ``DataSource`` is a braceexpand pattern of webdataset tars (local paths or fsspec URLs;
several patterns joined by ``::``; ``pipe:cmd`` where the user types it) or the path/URL of a
data-build ``manifest.json``, read by the one manifest reader (pretrain.shards.manifest: its
paths stay inside the manifest's folder, never a command). ``expand_sources`` turns a list of
sources into one shard-URL list per source, failing early with a clear message.

    from pretrain.data import DataSource, expand_sources
    expand_sources([DataSource("/data/laion/{00000..00099}.tar", 2.0),
                    DataSource("s3://bucket/cc12m/manifest.json", 1.0)])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import IO

import braceexpand

from pretrain.shards.manifest import is_manifest, load_manifest


@dataclass(frozen=True)
class DataSource:
    """One shard collection and its sampling weight (relative to the other sources)."""

    url: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.url or not isinstance(self.url, str):
            raise ValueError(f"DataSource.url must be a non-empty string, got {self.url!r}")
        if not self.weight > 0:
            raise ValueError(f"DataSource.weight must be > 0, got {self.weight} for {self.url}")


def _is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def manifest_shards(url: str) -> list[str]:
    """Shard URLs listed by a data-build manifest, confined to its folder (pretrain.shards.manifest)."""
    return load_manifest(url).urls()


def expand_urls(url: str) -> list[str]:
    """Shard URLs of one source: a manifest, or '::'-joined braceexpand patterns."""
    if is_manifest(url):
        return manifest_shards(url)
    urls: list[str] = []
    for pattern in url.split("::"):
        pattern = pattern.strip()
        if pattern:
            urls.extend(braceexpand.braceexpand(pattern))
    if not urls:
        raise ValueError(f"data source {url!r} expands to no shards")
    return urls


def expand_sources(sources: list[DataSource]) -> list[list[str]]:
    """One list of shard URLs per source (same order as ``sources``)."""
    if not sources:
        raise ValueError("no data sources given")
    return [expand_urls(s.url) for s in sources]


def open_shard(url: str) -> IO[bytes]:
    """A binary stream of one shard: a local file, ``pipe:cmd``, or any fsspec URL."""
    if url.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(url, "rb")
    if _is_url(url) and not url.startswith("file://"):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url[len("file://"):] if url.startswith("file://") else url, "rb", buffering=1 << 20)
