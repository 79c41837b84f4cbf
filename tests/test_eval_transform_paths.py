"""One eval transform (pretrain.data.transforms.EvalTransform, docs/eval_transform.md):

- it follows OpenAI CLIP's preprocessing to the value: torchvision's Resize(S, BICUBIC)
  (shorter side to S, longer side truncated), CenterCrop(S) (offsets round-half-even),
  ToTensor, Normalize(CLIP mean/std), written out below with PIL as torchvision does it;
- the data build's entry point (`pretrain.data.eval_transform`, the CLIP-score filter's)
  and the eval library's (`pretrain.eval.transforms.get_eval_transform`) are that transform;
- the trainer's periodic zero-shot (pretrain.train.evaluation.PeriodicEval on a real
  DeepSpeed engine) and the offline CLI (`clip-eval zeroshot` on the same weights) feed the
  image tower identical tensors for the same images (recorded by a forward pre-hook).

Run: `.venv/bin/python -m pytest -q tests/test_eval_transform_paths.py`
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_harness import run_distributed
from pretrain.data import CLIP_MEAN, CLIP_STD, eval_transform
from pretrain.eval.transforms import get_eval_transform

# Sizes where truncating and rounding the longer side differ (97 x 75 at 64: 82.77), and
# where the crop offset's round-half-even and floor differ (119 - 64 = 55: 27.5 -> 28).
SIZES = [(97, 75), (70, 131), (64, 90), (200, 64), (333, 517)]


def _photo(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: bicubic resampling has something to act on."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def openai_reference(img: Image.Image, size: int) -> torch.Tensor:
    """OpenAI's `_transform(n_px)` (clip/clip.py): Resize(n_px, BICUBIC), CenterCrop(n_px),
    convert RGB, ToTensor, Normalize; with torchvision's rules for PIL images spelt out."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # torchvision _compute_resized_output_size
    nw, nh = (size, new_long) if w <= h else (new_long, size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))  # F.center_crop
    img = img.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # ToTensor
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("w,h", SIZES)
def test_eval_transform_is_openais_preprocessing(w: int, h: int) -> None:
    size = 64
    img = Image.fromarray(_photo(w, h, seed=w * h))
    want = openai_reference(img, size)
    eval_fn, _ = get_eval_transform(size)
    for got in (eval_fn(img), eval_transform(size)(img), eval_transform(size)(_png(img)),
                eval_transform(size)(np.asarray(img))):
        assert got.shape == (3, size, size)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_eval_transform_keeps_pil_modes_like_openai() -> None:
    """Grey and RGBA images are resized in their own mode before the RGB conversion, as in
    OpenAI's Compose (Resize, CenterCrop, then _convert_image_to_rgb)."""
    rgb = _photo(97, 75, seed=1)
    grey = Image.fromarray(rgb[..., 0])
    rgba = Image.fromarray(np.dstack([rgb, np.linspace(0, 255, 97 * 75).reshape(75, 97).astype(np.uint8)]))
    for img in (grey, rgba):
        torch.testing.assert_close(eval_transform(64)(img), openai_reference(img, 64), rtol=0, atol=1e-6)


def test_eval_transform_is_picklable_and_named() -> None:
    import pickle

    fn, ident = get_eval_transform(48)
    again = pickle.loads(pickle.dumps(fn))
    img = Image.fromarray(_photo(90, 50, seed=3))
    assert torch.equal(again(img), fn(img))
    assert ident == eval_transform(48).ident and "48" in ident
    assert eval_transform(48, reduced_decode=True).ident != ident  # a different output, a different cache key
    with pytest.raises(ValueError, match="positive"):
        eval_transform(0)


def _write_eval_folder(root: Path) -> None:
    """ROOT/test/<class>/*: a JPEG, a PNG, a grey PNG per class, sizes from SIZES."""
    for c, name in enumerate(("cat", "dog")):
        d = root / "test" / name
        d.mkdir(parents=True)
        for k, (w, h) in enumerate(SIZES[c:c + 3]):
            img = Image.fromarray(_photo(w, h, seed=10 * c + k))
            if k == 0:
                img.save(d / f"{k}.jpg", quality=90)
            elif k == 1:
                img.save(d / f"{k}.png")
            else:
                img.convert("L").save(d / f"{k}.png")


def _both_paths(rank: int, world: int, folder: str, out: str) -> dict:
    """In one process: the trainer's periodic eval on a real DeepSpeed engine, then
    `clip-eval zeroshot` on the same weights; returns what the image tower received."""
    from train_driver import base_config

    from pretrain.eval.cli import main as clip_eval
    from pretrain.models import to_openai_state_dict
    from pretrain.tokenizer import default_tokenizer
    from pretrain.train.build import build_engine
    from pretrain.train.evaluation import PeriodicEval

    cfg = base_config(["--model.name=ViT-tiny", "--train.global_batch=2", "--train.micro_batch=2",
                       f"--eval.zeroshot_dataset=imagefolder:{folder}", "--eval.templates=single",
                       "--eval.batch_size=4"])
    engine, _ = build_engine(cfg, world)
    visual_type = type(engine.module.visual)
    seen: dict[str, list[torch.Tensor]] = {"trainer": [], "cli": []}
    current = ["trainer"]

    def record(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, visual_type):
            seen[current[0]].append(args[0].detach().float().cpu().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        metrics = PeriodicEval(cfg, default_tokenizer(), out, rank).run(engine, step=1)
        ckpt = Path(out) / "model.pt"
        torch.save(to_openai_state_dict(engine.module), ckpt)
        current[0] = "cli"
        rc = clip_eval(["zeroshot", "--checkpoint", str(ckpt), "--dataset", f"imagefolder:{folder}",
                        "--templates", "single", "--device", "cpu", "--batch-size", "4", "--num-workers", "0",
                        "--no-cache", "--output-dir", str(Path(out) / "cli"), "--quiet"])
    finally:
        handle.remove()
    return {"rc": rc, "metrics": metrics, "trainer": torch.cat(seen["trainer"]), "cli": torch.cat(seen["cli"])}


@pytest.mark.slow
def test_trainer_eval_and_cli_feed_identical_tensors(tmp_path: Path) -> None:
    folder = tmp_path / "evalset"
    _write_eval_folder(folder)
    (res,) = run_distributed(_both_paths, 1, str(folder), str(tmp_path / "run"), timeout_s=240)
    assert res["rc"] == 0
    assert "eval/zeroshot_top1" in res["metrics"]
    assert res["trainer"].shape == res["cli"].shape == (6, 3, 64, 64)
    assert torch.equal(res["trainer"], res["cli"])
    # ... and they are OpenAI's preprocessing of the files (sorted class folders and files).
    files = sorted((folder / "test").glob("*/*"))
    want = torch.stack([openai_reference(Image.open(f), 64) for f in files])
    torch.testing.assert_close(res["trainer"], want, rtol=0, atol=1e-6)
