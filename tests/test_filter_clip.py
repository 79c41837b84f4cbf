"""The optional CLIP-score rule with a tiny randomly initialised model of this project saved
in OpenAI layout: the stage's scores equal an independent per-sample cosine, and the
threshold rejects exactly the samples below it."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import pretrain.models as models
import pretrain.tokenizer as tokenizer_mod
from data_pipeline.filter import FilterConfig, filter_stage
from test_filter_support import distinct_indices, encode, real_caption, real_image, sample, write_tar

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def reference_scores(model, images: list[bytes], captions: list[str]) -> np.ndarray:
    """One sample at a time, float64 cosine: shorter side -> S bicubic (longer side truncated,
    as OpenAI's torchvision Resize: docs/eval_transform.md), centre crop, mean/std."""
    s = model.image_size
    tok = tokenizer_mod.default_tokenizer()
    out = []
    for data, cap in zip(images, captions):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        nw, nh = (s, int(h * s / w)) if w <= h else (int(w * s / h), s)
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = round((nw - s) / 2), round((nh - s) / 2)
        x = (np.asarray(img.crop((left, top, left + s, top + s)), dtype=np.float64) / 255 - MEAN) / STD
        x = torch.tensor(x.transpose(2, 0, 1)[None], dtype=torch.float32)
        with torch.no_grad():
            fi = model.encode_image(x).double()[0]
            ft = model.encode_text(tok([cap], context_length=model.context_length)).double()[0]
        out.append(float(fi @ ft / (fi.norm() * ft.norm())))
    return np.array(out)


@pytest.mark.timeout(180)
def test_clip_score_matches_independent_cosine_and_threshold(tmp_path):
    torch.manual_seed(0)
    model = models.create_model("ViT-tiny", image_size=32).eval()
    ckpt = tmp_path / "tiny_openai.pt"
    torch.save(models.to_openai_state_dict(model), ckpt)

    d = distinct_indices(10)
    images = [encode(real_image(d[i]), size=(256, 300) if i % 2 else 256) for i in range(10)]
    captions = [real_caption(d[i]) for i in range(10)]
    tar = write_tar(tmp_path / "00000.tar", [sample(f"{i:09d}", im, c) for i, (im, c) in enumerate(zip(images, captions))])
    ref = reference_scores(model, images, captions)
    assert np.ptp(ref) > 1e-3  # the random model gives distinct scores

    # Threshold between the 4th and 5th smallest: exactly 4 rejected. Batch size 3 makes
    # the batches ragged.
    thr = float(np.sort(ref)[3:5].mean())
    cfg = FilterConfig.from_dict({"clip_score": {"enabled": True, "checkpoint": str(ckpt), "min_score": thr,
                                                 "batch_size": 3, "device": "cpu"}})
    res = filter_stage([tar], str(tmp_path / "work"), cfg)
    assert res.counts == {"filter/clip_score": 4}
    assert res.kept["key"].tolist() == [f"{i:09d}" for i in range(10) if ref[i] >= thr]
    np.testing.assert_allclose(res.kept["clip_score"].to_numpy(), ref[ref >= thr], atol=1e-5)
    dec = pd.read_parquet(tmp_path / "work" / "decisions.parquet")
    np.testing.assert_allclose(dec["clip_score"].to_numpy(), ref, atol=1e-5)  # rejected ones scored too


def test_run_dir_checkpoint_goes_through_the_weights_only_loader(tmp_path):
    """A run dir is read by pretrain.modelio (complete tag, weights-only), in eval mode."""
    import json

    from data_pipeline.filter.clip_score import load_checkpoint_model

    torch.manual_seed(0)
    model = models.create_model("ViT-tiny", image_size=32)
    tag_dir = tmp_path / "checkpoints" / "step_00000010"
    tag_dir.mkdir(parents=True)
    (tmp_path / "run_config.yaml").write_text("model: {name: ViT-tiny, overrides: {image_size: 32}}\n")
    torch.save({"module": model.state_dict()}, tag_dir / "mp_rank_00_model_states.pt")
    files = {"mp_rank_00_model_states.pt": (tag_dir / "mp_rank_00_model_states.pt").stat().st_size}
    (tag_dir / "COMPLETE").write_text(json.dumps({"step": 10, "zero_stage": 0, "files": files}))
    loaded = load_checkpoint_model(str(tmp_path), "step_00000010")
    assert not loaded.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        load_checkpoint_model(str(tmp_path), "step_00000020")
    with pytest.raises(FileNotFoundError, match="no such"):
        load_checkpoint_model(str(tmp_path / "nothing.pt"))


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_clip_score_on_cuda_matches_cpu(tmp_path):
    from data_pipeline.filter.clip_score import ClipScorer
    from data_pipeline.filter.config import ClipScoreConfig

    torch.manual_seed(0)
    model = models.create_model("ViT-tiny", image_size=32).eval()
    ckpt = tmp_path / "tiny_openai.pt"
    torch.save(models.to_openai_state_dict(model), ckpt)
    d = distinct_indices(6)
    imgs = [Image.open(io.BytesIO(encode(real_image(d[i])))).convert("RGB") for i in range(6)]
    caps = [real_caption(d[i]) for i in range(6)]
    cpu = ClipScorer.from_config(ClipScoreConfig(enabled=True, checkpoint=str(ckpt), device="cpu", batch_size=4))
    gpu = ClipScorer.from_config(ClipScoreConfig(enabled=True, checkpoint=str(ckpt), device="auto", batch_size=4))
    assert gpu.device == "cuda"
    np.testing.assert_allclose(gpu.score(imgs, caps), cpu.score(imgs, caps), atol=2e-3)  # TF32 matmuls
