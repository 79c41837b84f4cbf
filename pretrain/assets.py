"""Local cache of the files the project needs but never commits (OpenAI's BPE vocabulary).

The vocabulary ships inside the open-clip-torch wheel (no weights there); set-up downloads
that wheel once with ``pip download --no-deps`` and copies the one file into the cache.
Training and tests only ever read the cache: nothing is fetched at run time.

    python -m pretrain.assets fetch    # idempotent
    python -m pretrain.assets path     # print the vocabulary path
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
_WHEEL_SPEC = "open-clip-torch==3.3.0"
_MEMBER = f"open_clip/{VOCAB_NAME}"


def cache_dir() -> Path:
    """``$CLIP_PRETRAIN_CACHE`` or ``~/.cache/clip_pretrain``."""
    return Path(os.environ.get("CLIP_PRETRAIN_CACHE", Path.home() / ".cache" / "clip_pretrain"))


def vocab_path() -> Path:
    """Path of OpenAI's BPE vocabulary in the cache (it may not exist yet)."""
    return cache_dir() / VOCAB_NAME


def require_vocab() -> Path:
    """The cached vocabulary path, or a clear error saying how to fetch it."""
    p = vocab_path()
    if not p.is_file():
        raise FileNotFoundError(
            f"OpenAI's BPE vocabulary is not in the cache ({p}). "
            "Run `python -m pretrain.assets fetch` (or `make setup`) once with access to the package registry."
        )
    return p


def fetch_vocab(force: bool = False) -> Path:
    """Download the open-clip-torch wheel (no dependencies) and extract the vocabulary."""
    dest = vocab_path()
    if dest.is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", _WHEEL_SPEC, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(_MEMBER) as src:
            part = dest.with_suffix(".part")
            with open(part, "wb") as out:
                shutil.copyfileobj(src, out)
            part.replace(dest)  # atomic: a half-copied file is never seen as the vocabulary
    return dest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cmd = args[0] if args else "fetch"
    if cmd == "fetch":
        print(f"[assets] vocabulary: {fetch_vocab(force='--force' in args)}")
    elif cmd == "path":
        print(vocab_path())
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
