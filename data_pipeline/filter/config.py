"""Typed settings of the filter stage (plain dataclasses, so a YAML file or ``--key=value``
overrides can fill them), with defaults a researcher expects from DataComp's "basic
filtering" and LAION's CLIP-score filter.

    from data_pipeline.filter import FilterConfig
    cfg = FilterConfig()                       # defaults below
    cfg = FilterConfig.from_dict({"image": {"min_side": 64}, "dedup": {"phash_distance": 2}})
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pretrain.config.engine import from_dict
from pretrain.shards.images import MAX_PIXELS


@dataclass
class ImageRules:
    """Per-image rules, applied in pass 1 in this order: decode, size, aspect ratio."""

    # Decompression-bomb cap, checked from the header before any pixel is decoded; the
    # default is the shards' one cap, which the trainer's decoder applies too.
    max_pixels: int = MAX_PIXELS
    # DataComp basic filtering: shorter side >= 200 px and aspect ratio < 3.
    min_side: int = 200
    max_aspect_ratio: float = 3.0
    # "image": the size of the stored (possibly resized by the crawl) image;
    # "original": img2dataset's original_width/original_height from the json (falls back
    # to the stored size when absent).
    size_source: str = "image"


@dataclass
class CaptionRules:
    """Caption clean-up and rules. Bounds are inclusive; a bound <= 0 is off."""

    # Captions whose bytes are not UTF-8 (or hold U+FFFD, the trace of an earlier lossy
    # decode): "drop" rejects them as filter/caption_encoding, "strip" removes the bad
    # bytes and carries on with what is left.
    bad_encoding: str = "drop"
    fix_text: bool = True  # ftfy.fix_text (mojibake, HTML entities, odd quotes)
    # DataComp basic filtering keeps captions with more than 5 characters and more than 1
    # word; LAION drops captions under 5 characters.
    min_chars: int = 6
    max_chars: int = 1000
    min_words: int = 2
    max_words: int = 200
    boilerplate: bool = True  # file names, lone generic words, URLs, repeated tokens
    # A caption is "repetitive" when it has >= repeat_min_words words and its most
    # frequent word makes up >= repeat_fraction of them ("sale sale sale sale").
    repeat_min_words: int = 3
    repeat_fraction: float = 0.6
    generic_words: list[str] = field(default_factory=lambda: [
        "image", "images", "img", "photo", "photos", "picture", "pictures", "pic", "pics",
        "untitled", "thumbnail", "thumb", "file", "download", "unknown", "null", "none",
        "placeholder", "default", "banner", "logo", "icon", "screenshot", "jpg", "jpeg",
        "png", "gif", "webp", "no image", "no title", "image not found", "click here",
        "read more", "stock photo", "stock image",
    ])


@dataclass
class DedupConfig:
    """Global (pass 2) duplicate removal; the first sample in (source_tar, key) order wins."""

    image_sha256: bool = True
    url_caption: bool = True
    near_duplicates: bool = True
    # 64-bit pHash (imagehash.phash) Hamming distance counted as "the same picture".
    # JPEG re-encodes and slight resizes measured at 0-4; distinct Fashion-MNIST items are
    # rarely that close (19 pairs at 2 and 158 at 4 among 2M pairs).
    phash_distance: int = 4


@dataclass
class ClipScoreConfig:
    """Minimum image-text cosine with a checkpoint of this project (off by default)."""

    enabled: bool = False
    # An OpenAI-layout state dict file (torch.save) or a training run directory.
    checkpoint: str = ""
    # Accept a TorchScript archive as `checkpoint` (OpenAI's released .pt): loading one RUNS
    # the code it contains; only for files you trust.
    allow_torchscript_code: bool = False
    # Checkpoint tag inside a run dir; "" = the latest complete one. Name a tag (or use a
    # file) for a resumable build: a per-shard record is reused while the settings match.
    tag: str = ""
    # LAION-400M used 0.28 with OpenAI's ViT-B/32; DataComp's "CLIP score" baselines ~0.3.
    min_score: float = 0.28
    batch_size: int = 64
    device: str = "auto"  # "auto": cuda when available, else cpu


@dataclass
class BalanceConfig:
    """MetaCLIP-style balancing over an entry list (off by default).

    A caption matches an entry when the entry occurs in it (case-insensitive) on word
    boundaries. Entry e with count(e) > t keeps each of its samples with probability
    t / count(e); a sample is kept if any of its matched entries keeps it. The draw for
    (sample, entry) is u = first 8 bytes (big-endian) of blake2b(f"{seed}|{sha256}|{url}|{entry}",
    digest_size=16) / 2**64, kept iff u < t / count(e): deterministic, independent of the
    shard layout.
    """

    enabled: bool = False
    entries: list[str] = field(default_factory=list)
    entries_file: str = ""  # one entry per line (fsspec URL), added to `entries`
    max_per_entry: int = 20_000  # MetaCLIP's t for 400M samples
    keep_unmatched: bool = False  # MetaCLIP drops samples that match no entry
    seed: int = 0


@dataclass
class EvalOverlapConfig:
    """Decontamination against an evaluation set (off while eval_images is empty)."""

    eval_images: str = ""  # a folder (local or fsspec URL) of the eval set's image files
    max_distance: int = 4  # pHash Hamming distance counted as the same picture


@dataclass
class GlobalPassConfig:
    """Where pass 2 runs. "local": one process, pandas + numpy (the default for small
    builds). "spark": Spark SQL on the active SparkSession, or a new one on ``spark_master``
    (window functions for the exact duplicates, a band self-join for the near-duplicates).
    "auto": spark when the pass-1 records hold >= spark_min_rows rows and pyspark imports.
    Both engines write byte-identical decisions.parquet."""

    engine: str = "auto"
    # Below ~20M rows one process is faster than Spark's start-up and shuffles and fits
    # in a few GiB (measured: benchmarks/RESULTS.md, "global pass").
    spark_min_rows: int = 20_000_000
    spark_master: str = "local[*]"  # used only when no SparkSession is active


@dataclass
class FilterConfig:
    image: ImageRules = field(default_factory=ImageRules)
    caption: CaptionRules = field(default_factory=CaptionRules)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    clip_score: ClipScoreConfig = field(default_factory=ClipScoreConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    global_pass: GlobalPassConfig = field(default_factory=GlobalPassConfig)
    eval_overlap: EvalOverlapConfig = field(default_factory=EvalOverlapConfig)

    def __post_init__(self) -> None:
        if self.image.size_source not in ("image", "original"):
            raise ValueError(f"image.size_source must be 'image' or 'original', not {self.image.size_source!r}")
        if self.caption.bad_encoding not in ("drop", "strip"):
            raise ValueError(f"caption.bad_encoding must be 'drop' or 'strip', not {self.caption.bad_encoding!r}")
        if self.image.max_aspect_ratio < 1:
            raise ValueError("image.max_aspect_ratio must be >= 1 (it is max(w, h) / min(w, h))")
        if not 0 <= self.dedup.phash_distance < 64:
            raise ValueError("dedup.phash_distance must be in [0, 63]")
        if self.clip_score.enabled and not self.clip_score.checkpoint:
            raise ValueError("clip_score.enabled needs clip_score.checkpoint (a state-dict file or a run dir)")
        if not 0 <= self.eval_overlap.max_distance < 64:
            raise ValueError("eval_overlap.max_distance must be in [0, 63]")
        if self.global_pass.engine not in ("auto", "local", "spark"):
            raise ValueError(f"global_pass.engine must be auto, local or spark, not {self.global_pass.engine!r}")
        if self.balance.enabled and self.balance.max_per_entry < 1:
            raise ValueError("balance.max_per_entry must be >= 1")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "FilterConfig":
        """Build from nested plain data (e.g. a YAML section) with the project's one config
        engine: unknown keys name the nearest valid one, types are checked."""
        return from_dict(cls, d or {}, "filter")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pass1_fingerprint(cfg: FilterConfig, entries: list[str]) -> str:
    """Hash of everything that changes a per-shard record, so a resume reuses a per-shard
    parquet only when it was made with the same rules (pass-2 settings are not in it)."""
    from data_pipeline.filter import RECORD_VERSION

    payload = {
        "version": RECORD_VERSION,
        "image": dataclasses.asdict(cfg.image),
        "caption": dataclasses.asdict(cfg.caption),
        # batch size and device do not change a score (beyond float noise): not in the hash
        "clip_score": (
            {k: v for k, v in dataclasses.asdict(cfg.clip_score).items() if k not in ("batch_size", "device", "allow_torchscript_code")}
            if cfg.clip_score.enabled else None
        ),
        "entries": entries if cfg.balance.enabled else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
