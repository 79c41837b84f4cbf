"""Each image transform of pretrain.data alone, against hand computations.

    .venv/bin/python -m pytest -q tests/test_data_transforms.py
"""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data import (CLIP_MEAN, CLIP_STD, center_crop_box, decode_rgb, eval_transform,
                           random_square_crop_box, resize_shorter_side_size, sample_rng,
                           to_normalized_tensor, train_transform)
from pretrain.packaged_data import load_packaged


def _jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _real_photo(px: int) -> np.ndarray:
    """A real Fashion-MNIST image, upscaled to px x px RGB with a colour tint."""
    img = load_packaged("fashion-mnist", "test").images[0]
    grey = np.asarray(Image.fromarray(img).resize((px, px), Image.BICUBIC), dtype=np.float32)
    tint = np.array([1.0, 0.8, 0.6], dtype=np.float32)
    return np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("w,h", [(100, 100), (640, 480), (300, 900), (37, 53)])
@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0), (0.5, 0.5)])
def test_random_square_crop_box_is_square_inside_and_in_scale(w, h, scale):
    reach = min(w, h) ** 2 / (w * h)
    for i in range(200):
        x0, y0, x1, y1 = random_square_crop_box(w, h, random.Random(i), scale)
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert x1 - x0 == y1 - y0
        ratio = (x1 - x0) * (y1 - y0) / (w * h)
        if scale[0] < reach:  # reachable: the area ratio is in the range (up to pixel rounding)
            side = x1 - x0
            tol = (2 * side + 1) / (w * h)
            assert scale[0] - tol <= ratio <= min(scale[1], reach) + tol
        else:  # a square cannot cover that much of a non-square image: the largest square
            assert x1 - x0 == min(w, h)


def test_random_square_crop_positions_vary_and_are_deterministic():
    boxes = {random_square_crop_box(400, 300, random.Random(i), (0.2, 0.5)) for i in range(50)}
    assert len(boxes) > 40
    a = random_square_crop_box(400, 300, sample_rng(1, 2, "k"), (0.2, 0.5))
    assert a == random_square_crop_box(400, 300, sample_rng(1, 2, "k"), (0.2, 0.5))
    others = {random_square_crop_box(400, 300, sample_rng(1, e, "k"), (0.2, 0.5)) for e in range(3, 8)}
    assert others - {a}


def test_eval_geometry_by_hand():
    assert resize_shorter_side_size(640, 480, 224) == (298, 224)  # 640 * 224 / 480 = 298.67, truncated (torchvision)
    assert resize_shorter_side_size(480, 640, 224) == (224, 298)
    assert resize_shorter_side_size(50, 50, 224) == (224, 224)
    assert center_crop_box(299, 224, 224) == (38, 0, 262, 224)  # round(75 / 2) = 38 (banker's)
    assert center_crop_box(300, 200, 200) == (50, 0, 250, 200)


def test_normalisation_numbers():
    arr = np.zeros((2, 3, 3), dtype=np.uint8)
    arr[0, 0] = (255, 0, 128)
    x = to_normalized_tensor(arr)
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    for c, v in enumerate((255, 0, 128)):
        assert x[c, 0, 0].item() == pytest.approx((v / 255 - CLIP_MEAN[c]) / CLIP_STD[c], abs=1e-6)
        assert x[c, 1, 1].item() == pytest.approx(-CLIP_MEAN[c] / CLIP_STD[c], abs=1e-6)


def test_eval_transform_centre_crop_without_resize_is_exact():
    # Shorter side already at the target: the result is exactly the centre columns.
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(4, 8, 3), dtype=np.uint8)
    x = eval_transform(4)(arr)
    expect = (torch.from_numpy(arr[:, 2:6].astype(np.float32) / 255).permute(2, 0, 1)
              - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose(x, expect, atol=1e-6)


def test_eval_transform_resize_then_centre_crop():
    # 64 x 128 image: left half red, right half blue, with a 16 px green band at the far left.
    # Resize to 32 x 64, centre-crop columns 16..48: the band (0..8 after resize) is cut away,
    # the left 12 columns are red and the right 12 blue, away from the bicubic seam.
    arr = np.zeros((64, 128, 3), dtype=np.uint8)
    arr[:, :64] = (255, 0, 0)
    arr[:, 64:] = (0, 0, 255)
    arr[:, :16] = (0, 255, 0)
    x = eval_transform(32)(arr)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1), torch.tensor(CLIP_STD).view(3, 1)
    red = ((torch.tensor([1.0, 0, 0]).view(3, 1) - mean) / std)
    blue = ((torch.tensor([0, 0, 1.0]).view(3, 1) - mean) / std)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, :, :12].reshape(3, -1), red.expand(3, 32 * 12), atol=1e-5)
    assert torch.allclose(x[:, :, 20:].reshape(3, -1), blue.expand(3, 32 * 12), atol=1e-5)


def test_eval_transform_accepts_bytes_pil_and_grey():
    photo = _real_photo(96)
    a = eval_transform(48, reduced_decode=False)(_jpeg(photo))
    b = eval_transform(48)(Image.fromarray(photo))
    assert a.shape == b.shape == (3, 48, 48)
    assert (a - b).abs().mean() < 0.05  # JPEG loss only
    grey = load_packaged("fashion-mnist", "test").images[1]
    g = eval_transform(28)(grey)
    assert g.shape == (3, 28, 28)
    assert torch.allclose(g[0] * CLIP_STD[0] + CLIP_MEAN[0], g[1] * CLIP_STD[1] + CLIP_MEAN[1], atol=1e-6)


def test_draft_decode_reduced_size_close_to_full_decode():
    data = _jpeg(_real_photo(512))
    small = decode_rgb(data, (120, 120))
    assert small.size == (128, 128)  # 1/4 DCT scale: the smallest >= 120
    assert decode_rgb(data, (40, 40)).size == (64, 64)  # the smallest scale libjpeg offers is 1/8
    assert decode_rgb(data).size == (512, 512)
    full = np.asarray(decode_rgb(data).resize((128, 128), Image.BICUBIC), dtype=np.float32)
    diff = np.abs(np.asarray(small, dtype=np.float32) - full)
    assert diff.mean() < 3.0, diff.mean()  # on a 0..255 scale
    # PIL's draft mode (the fallback path, taken for an already opened image) agrees.
    drafted = decode_rgb(Image.open(io.BytesIO(data)), (120, 120))
    assert drafted.size == (128, 128)
    assert np.abs(np.asarray(drafted, dtype=np.float32) - np.asarray(small, dtype=np.float32)).mean() < 2.0


def test_train_transform_reduced_decode_close_to_full_decode():
    data = _jpeg(_real_photo(512))
    fast = train_transform(64, (0.5, 1.0))
    slow = train_transform(64, (0.5, 1.0), reduced_decode=False)
    for i in range(5):
        a, b = fast(data, sample_rng(0, 0, str(i))), slow(data, sample_rng(0, 0, str(i)))
        assert a.shape == (3, 64, 64)
        assert (a - b).abs().mean() < 0.05  # normalised units (1/255 ~ 0.015)
        # Same key -> same crop -> identical output.
        assert torch.equal(a, fast(data, sample_rng(0, 0, str(i))))


def test_train_transform_crop_matches_box():
    # A crop covering the whole image (scale 1 on a square) is a plain resize.
    photo = _real_photo(64)
    x = train_transform(32, (1.0, 1.0))(Image.fromarray(photo), random.Random(0))
    ref = to_normalized_tensor(Image.fromarray(photo).resize((32, 32), Image.BICUBIC))
    assert torch.allclose(x, ref, atol=1e-6)


def test_train_transform_rejects_bad_scale():
    with pytest.raises(ValueError):
        train_transform(32, (0.0, 1.0))
    with pytest.raises(ValueError):
        train_transform(32, (0.9, 0.5))


def test_train_transform_writes_into_a_batch_row():
    # The loader decodes straight into rows of one batch buffer: same values as the
    # allocating call, the neighbouring rows untouched, a wrong buffer rejected.
    photo = _real_photo(64)
    tf = train_transform(32, (0.9, 1.0))
    want = tf(Image.fromarray(photo), random.Random(5))
    batch = torch.full((3, 3, 32, 32), 7.0)
    got = tf(Image.fromarray(photo), random.Random(5), batch[1])
    assert got.data_ptr() == batch[1].data_ptr()
    assert torch.equal(batch[1], want)
    assert (batch[0] == 7.0).all() and (batch[2] == 7.0).all()
    with pytest.raises(ValueError, match="out must be"):
        tf(Image.fromarray(photo), random.Random(5), torch.empty(3, 16, 16))
