"""``manifest.json``, the one description of a set of webdataset shards: written by the data
build, read by the trainer's loader, evaluation and anyone a manifest is shared with.

    {"format": "webdataset", "keys": [...],
     "shards": [{"path": "shards/00000.tar", "num_samples": 1000, "sha256": "..."}, ...],
     "num_shards": 4, "total_samples": N, "samples_per_shard": 1000,
     "pattern": "shards/{00000..00003}.tar", ...extra (config, versions)}

    from pretrain.shards.manifest import load_manifest, make_manifest
    m = load_manifest("s3://bucket/cc12m/manifest.json")
    m.urls()                       # shard URLs, resolved, empty shards left out

Rules (one set, for every reader):
- The file is a JSON object with a non-empty ``shards`` list, or (older or hand-written
  manifests) a ``pattern`` string to braceexpand. Each entry is a path string or an object
  with a string ``path``, an optional ``num_samples`` (an integer >= 0; missing means
  unknown, the shard is read) and an optional ``sha256`` string. A shard recorded with
  ``num_samples: 0`` is skipped. Anything else is a ``ManifestError`` naming the entry.
- A manifest is data someone else may have written (``s3://.../manifest.json`` is meant to
  be shared), so its paths are confined: each is relative to the manifest's own folder and
  must stay inside it after normalisation, on the same file system and scheme. Absolute
  paths, ``..`` escapes, URLs (``scheme://``, fsspec ``::`` chains) and ``pipe:`` commands
  are refused: webdataset's ``gopen`` would run a ``pipe:`` entry in a shell. ``pipe:``
  stays available where the user types it in ``data.sources`` (pretrain/data/sources.py).
  Symlinks inside the folder are followed as the file system does; the folder is as
  trusted as whoever can write into it.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import braceexpand

FORMAT = "webdataset"
# A scheme-like head ("s3:", "pipe:", "c:") would let fsspec or webdataset read the entry
# as something other than a file beside the manifest.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class ManifestError(ValueError):
    """A manifest that cannot be used: unreadable, malformed, or naming paths outside itself."""


@dataclass(frozen=True)
class ShardEntry:
    url: str                # resolved against the manifest's folder
    path: str               # as written in the manifest
    num_samples: int | None
    sha256: str | None


@dataclass(frozen=True)
class Manifest:
    url: str
    shards: tuple[ShardEntry, ...]
    record: dict[str, Any]

    def urls(self, skip_empty: bool = True) -> list[str]:
        """Shard URLs in manifest order; shards recorded as empty are left out."""
        return [s.url for s in self.shards if not (skip_empty and s.num_samples == 0)]


def is_manifest(url: str) -> bool:
    return url.rstrip("/").endswith(".json")


def _is_url(path: str) -> bool:
    return "://" in path


def manifest_dir(url: str) -> str:
    """The folder a manifest's relative paths are resolved against."""
    if _is_url(url):
        return posixpath.dirname(url)
    return os.path.dirname(os.path.abspath(url))


def resolve_entry(base: str, rel: str, where: str) -> str:
    """``rel`` joined to the manifest folder ``base``, refused unless it stays inside it."""
    if not isinstance(rel, str) or not rel.strip():
        raise ManifestError(f"{where}: a shard path must be a non-empty string, got {rel!r}")
    if "\x00" in rel or "::" in rel or _SCHEME.match(rel) or "://" in rel:
        raise ManifestError(f"{where}: shard path {rel!r} is a URL or command; manifest paths must be "
                            "relative to the manifest's folder (pipe: only in data.sources)")
    if rel.startswith(("/", "\\")) or os.path.isabs(rel):
        raise ManifestError(f"{where}: shard path {rel!r} is absolute; manifest paths must be relative "
                            "to the manifest's folder")
    if _is_url(base):
        scheme, _, rest = base.partition("://")
        lead = "/" if rest.startswith("/") else ""  # file:///abs keeps its root
        root = posixpath.normpath("/" + rest.lstrip("/"))
        joined = posixpath.normpath(posixpath.join(root, rel))
        inside = joined.startswith(root.rstrip("/") + "/")
        out = f"{scheme}://{lead}{joined.lstrip('/')}"
    else:
        joined = os.path.normpath(os.path.join(base, rel))
        inside = os.path.commonpath([base, joined]) == base and joined != base
        out = joined
    if not inside:
        raise ManifestError(f"{where}: shard path {rel!r} leaves the manifest's folder {base}")
    return out


def _entry(base: str, raw: Any, where: str) -> ShardEntry:
    if isinstance(raw, str):
        return ShardEntry(resolve_entry(base, raw, where), raw, None, None)
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: a shard entry must be a path or an object with 'path', got "
                            f"{type(raw).__name__}")
    if "path" not in raw:
        raise ManifestError(f"{where}: shard entry has no 'path' (keys: {sorted(raw)[:8]})")
    n = raw.get("num_samples")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ManifestError(f"{where}: num_samples must be an integer >= 0, got {n!r}")
    sha = raw.get("sha256")
    if sha is not None and not isinstance(sha, str):
        raise ManifestError(f"{where}: sha256 must be a string, got {type(sha).__name__}")
    return ShardEntry(resolve_entry(base, raw["path"], where), raw["path"], n, sha)


def parse_manifest(url: str, record: Any) -> Manifest:
    """Validate an already-parsed manifest ``record`` read from ``url`` (rules above)."""
    if not isinstance(record, dict):
        raise ManifestError(f"manifest {url}: expected a JSON object with a 'shards' list, got "
                            f"{type(record).__name__}")
    base = manifest_dir(url)
    shards = record.get("shards")
    if shards is None and record.get("pattern") is not None:
        pattern = record["pattern"]
        if not isinstance(pattern, str):
            raise ManifestError(f"manifest {url}: 'pattern' must be a string, got {type(pattern).__name__}")
        entries = [_entry(base, p, f"manifest {url} pattern") for p in braceexpand.braceexpand(pattern)]
    elif isinstance(shards, list) and shards:
        entries = [_entry(base, e, f"manifest {url} shards[{i}]") for i, e in enumerate(shards)]
    else:
        raise ManifestError(f"manifest {url} lists no shards (expected a non-empty 'shards' list, got "
                            f"{type(shards).__name__ if shards is not None else 'none'})")
    return Manifest(url, tuple(entries), record)


def load_manifest(url: str) -> Manifest:
    """Read (local path or any fsspec URL) and validate a manifest."""
    if url.startswith("pipe:"):
        raise ManifestError(f"manifest {url}: a manifest is read as a file, not through a pipe: command")
    try:
        if _is_url(url):
            import fsspec

            with fsspec.open(url, "rt", encoding="utf-8") as f:
                record = json.load(f)
        else:
            with open(url, encoding="utf-8") as f:
                record = json.load(f)
    except (OSError, ValueError) as exn:
        raise ManifestError(f"cannot read data manifest {url}: {exn}") from exn
    manifest = parse_manifest(url, record)
    if not manifest.urls():
        raise ManifestError(f"manifest {url}: every shard has num_samples == 0")
    return manifest


def brace_pattern(paths: list[str]) -> str | None:
    """'shards/{00000..00003}.tar' for consecutive zero-padded names (None when empty)."""
    if not paths:
        return None
    head, _, first = paths[0].rpartition("/")
    last = paths[-1].rpartition("/")[2]
    a, b = first[: -len(".tar")], last[: -len(".tar")]
    prefix = head + "/" if head else ""
    return f"{prefix}{{{a}..{b}}}.tar"


def make_manifest(shards: list[dict[str, Any]], samples_per_shard: int, keys: list[str],
                  **extra: Any) -> dict[str, Any]:
    """The record a writer saves; it is checked against the reading rules before it is returned."""
    record = {
        "format": FORMAT,
        "keys": keys,
        "shards": shards,
        "num_shards": len(shards),
        "total_samples": sum(int(s["num_samples"]) for s in shards),
        "samples_per_shard": samples_per_shard,
        "pattern": brace_pattern([s["path"] for s in shards]),
        **extra,
    }
    if shards:
        parse_manifest("/manifest-check/manifest.json", record)  # a writer never emits what readers refuse
    return record
