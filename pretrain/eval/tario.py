"""Random access into webdataset tar shards for evaluation: index once (the one tar index
reader, pretrain.shards.tario), then read one member by offset.

Eval sets are read in a fixed order (features are cached per sample index), so instead of
streaming we scan each tar's headers once (``tarfile`` seeks over the data) and keep
``(url, offset, size)`` per member; a DataLoader worker then reads one member with a seek.
Local paths and fsspec URLs both work. A truncated or unreadable shard keeps the members
indexed before the damage; the damage is counted, never fatal.

    from pretrain.eval.tario import expand_shards, index_shards
    samples, problems = index_shards(expand_shards("/data/{000..003}.tar"))
"""
from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import braceexpand

from pretrain.shards.manifest import is_manifest, load_manifest
from pretrain.shards.tario import Member, open_binary, scan_members

# webdataset convention: the key is the path up to the first dot of the file's base name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class Problems:
    """Counts of what was skipped while indexing, with a few example messages."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {message}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def expand_shards(spec: str) -> list[str]:
    """Shard URLs from a braceexpand pattern, a ``::``-joined list of patterns, or a manifest.json
    (read by the one manifest reader: its paths stay inside the manifest's folder)."""
    urls: list[str] = []
    for part in spec.split("::"):
        if is_manifest(part):
            urls += load_manifest(part).urls()
        else:
            urls += list(braceexpand.braceexpand(part))
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def shards_dir(spec: str) -> str:
    """The folder of the first shard (where classnames files are looked for)."""
    first = spec.split("::")[0]
    if first.endswith(".json"):
        return first.rsplit("/", 1)[0] if "/" in first else "."
    url = next(iter(braceexpand.braceexpand(first)))
    return url.rsplit("/", 1)[0] if "/" in url else "."


def index_shards(urls: Iterable[str], problems: Problems | None = None) -> tuple[list[dict[str, Member]], Problems]:
    """One dict per sample key: extension -> :class:`Member`, in shard order (headers read by
    the one tar index reader, pretrain.shards.tario)."""
    problems = problems or Problems()
    samples: list[dict[str, Member]] = []
    for url in urls:
        by_key: dict[str, dict[str, Member]] = {}
        try:
            with open_binary(url) as f:
                for name, offset, size in scan_members(f, url):
                    m = _KEY_EXT.match(name)
                    if m is None:
                        problems.add("member_without_extension", f"{url}:{name}")
                        continue
                    key, ext = m.group(1), m.group(2).lower()
                    by_key.setdefault(key, {})[ext] = Member(url, offset, size)
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.add("damaged_shard", str(e) if url in str(e) else f"{url}: {e}")
        samples.extend(by_key.values())
    return samples, problems


def read_text(member: Member) -> str:
    return member.read().decode("utf-8").strip()


def basename(url: str) -> str:
    return PurePosixPath(url).name
