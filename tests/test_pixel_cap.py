"""The shards' pixel cap (pretrain.shards.images) holds in the trainer's decoder and in
evaluation, as in the data build's filter.

Reproduces the hole: a 100-megapixel PNG (a few hundred KB on disk) in a training shard
decoded with only Pillow's warning, ~830 MB of RSS in the worker. Now the header is
checked first: the sample is skipped and counted, and no pixel is decoded.

Run: `.venv/bin/python -m pytest -q tests/test_pixel_cap.py`.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pretrain.shards.images import MAX_PIXELS, DecompressionBombError, checked_size
from shard_factory import make_caption_shards

REPO = Path(__file__).resolve().parents[1]


def bomb_png(side: int = 10_000) -> bytes:
    """side x side pixels (100 Mpx by default) of one colour: tiny once compressed."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return bomb_png()


def test_header_check_refuses_the_bomb(bomb: bytes) -> None:
    assert len(bomb) < 2_000_000
    with pytest.raises(DecompressionBombError, match="100,000,000 pixels, over the cap of 89,478,485"):
        checked_size(bomb)
    assert checked_size(bomb, max_pixels=100_000_000) == (10_000, 10_000)
    assert MAX_PIXELS == 89_478_485


def test_filter_and_trainer_share_the_cap(bomb: bytes) -> None:
    from data_pipeline.filter.config import ImageRules
    from data_pipeline.filter.image_rules import DECOMPRESSION_BOMB, check_header

    assert ImageRules().max_pixels == MAX_PIXELS
    assert check_header(bomb, ImageRules().max_pixels) == (None, DECOMPRESSION_BOMB)


def test_trainer_decoder_never_decodes_the_bomb(tmp_path: Path, bomb: bytes) -> None:
    """In a fresh process (a clean peak-RSS reading): the decoder raises at the header and
    the process's peak memory does not grow by the ~300 MB the RGB pixels would take."""
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    code = (
        "import resource, sys\n"
        "from pretrain.data.transforms import decode_rgb\n"
        "from pretrain.shards.images import DecompressionBombError\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    decode_rgb(data, min_size=(32, 32))\n"
        "    print('DECODED')\n"
        "except DecompressionBombError as e:\n"
        "    print('REFUSED', e)\n"
        "print('GROWTH_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert "REFUSED" in out.stdout, out.stdout + out.stderr
    growth_kb = int(out.stdout.rsplit("GROWTH_KB", 1)[1])
    assert growth_kb < 50_000, f"decoder grew peak RSS by {growth_kb} KB"


def test_loader_skips_and_counts_the_bomb(tmp_path: Path, bomb: bytes) -> None:
    """The real training loader: the bomb sample is counted as skipped, the batch is full."""
    from pretrain.data.loader import make_train_loader
    from pretrain.tokenizer import default_tokenizer

    shards = make_caption_shards(tmp_path, n_shards=1, per_shard=8, image_px=32)
    with tarfile.open(shards.shard_paths[0], "a") as tar:
        for name, data in (("bomb.png", bomb), ("bomb.txt", b"a photo of nothing")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    loader = make_train_loader([shards.pattern], tokenizer=default_tokenizer(), image_size=32, micro_batch=9,
                               num_workers=0, seed=0, epoch=0, rank=0, world_size=1, steps=1,
                               resampled=False, shuffle_buffer=16, return_keys=True)
    batches = list(loader)
    assert len(batches) == 1
    b = batches[0]
    assert b["images"].shape[0] == 9  # the bomb's slot refilled from the shuffle buffer
    assert int(b["skipped"]) == 1 and loader.skipped_total() == 1
    assert not any(k.endswith("#bomb") for k in b["keys"])


def test_eval_dataset_refuses_the_bomb(bomb: bytes) -> None:
    from pretrain.eval.datasets import _decode

    with pytest.raises(DecompressionBombError):
        _decode(bomb)
