"""Where training data comes from: shard patterns, data-build manifests, opening a shard.

A ``DataSource`` is a braceexpand pattern of webdataset tars (local paths or fsspec URLs;
several patterns joined by ``::``) or the path/URL of a data-build ``manifest.json`` whose
shard paths are relative to the manifest's directory. ``expand_sources`` turns a list of
sources into one shard-URL list per source, failing early with a clear message.

    from pretrain.data import DataSource, expand_sources
    expand_sources([DataSource("/data/laion/{00000..00099}.tar", 2.0),
                    DataSource("s3://bucket/cc12m/manifest.json", 1.0)])
"""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from typing import IO

import braceexpand


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


def is_manifest(url: str) -> bool:
    return url.rstrip("/").endswith(".json")


def _join(base_dir: str, rel: str) -> str:
    """Resolve a manifest entry against the manifest's directory (URLs keep their scheme)."""
    if _is_url(rel) or os.path.isabs(rel):
        return rel
    if _is_url(base_dir):
        return posixpath.join(base_dir, rel)
    return os.path.normpath(os.path.join(base_dir, rel))


def read_manifest(url: str) -> dict:
    """The parsed manifest, read through fsspec for URLs."""
    if _is_url(url):
        import fsspec

        with fsspec.open(url, "rt", encoding="utf-8") as f:
            return json.load(f)
    with open(url, encoding="utf-8") as f:
        return json.load(f)


def manifest_shards(url: str) -> list[str]:
    """Shard URLs listed by a data-build manifest, resolved against its directory."""
    try:
        manifest = read_manifest(url)
    except (OSError, ValueError) as exn:
        raise ValueError(f"cannot read data manifest {url}: {exn}") from exn
    base = posixpath.dirname(url) if _is_url(url) else os.path.dirname(os.path.abspath(url))
    entries = manifest.get("shards")
    if not entries and manifest.get("pattern"):
        return [_join(base, p) for p in braceexpand.braceexpand(manifest["pattern"])]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"manifest {url} lists no shards (expected a non-empty 'shards' list)")
    out = []
    for e in entries:
        path = e["path"] if isinstance(e, dict) else e
        # A shard the build recorded as empty would only waste a read.
        if isinstance(e, dict) and e.get("num_samples") == 0:
            continue
        out.append(_join(base, path))
    if not out:
        raise ValueError(f"manifest {url}: every shard has num_samples == 0")
    return out


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
