"""Hugging Face format both ways and safetensors exports, checked with the real
`transformers` and `safetensors` packages (everything local, no hub).

    python -m pytest -q tests/test_hf_format.py
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from pretrain import models  # noqa: E402
from pretrain.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform  # noqa: E402
from pretrain.modelio import load_model, load_state_dict_file, read_hf_dir, save_hf_dir  # noqa: E402
from pretrain.modelio.hf import hf_config, openai_to_hf_state_dict  # noqa: E402
from pretrain.tokenizer import default_tokenizer  # noqa: E402

TEXTS = ["a photo of a cat", "Hello, World!! 123 café", "  lots   of\tspaces\nand lines  ",
         "don't we'll they're it's I'M", "emoji 🐈‍⬛ and 日本語のテキスト", "ÀÉÎÕÜ àéîõü ñ ß",
         "numbers 3.14159 and 2026-12-03", "punctuation?!... (brackets) [x] {y} <z>",
         "URL https://example.com/a_b?c=d#e", "a" * 300, "", "x-ray o'clock", "Ünïcödé MiXeD CaSe"]


def _hf_features(out):
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns an output object


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_export_loads_in_transformers_with_our_embeddings(tmp_path, tok, act):
    torch.manual_seed(0)
    model = models.create_model("ViT-tiny", act=act, init_logit_scale=2.0).eval()
    save_hf_dir(model, tmp_path, tokenizer=tok)
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["hidden_act"] == act
    hf = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    images, tokens = torch.randn(3, 3, 64, 64), tok(TEXTS[:4])
    with torch.no_grad():
        ours_i, ours_t = model.encode_image(images), model.encode_text(tokens)
        hf_i = _hf_features(hf.get_image_features(pixel_values=images))
        hf_t = _hf_features(hf.get_text_features(input_ids=tokens))
        out = hf(input_ids=tokens, pixel_values=images)
    assert (ours_i - hf_i).abs().max() < 1e-5 and (ours_t - hf_t).abs().max() < 1e-5
    assert hf.logit_scale.shape == () and float(hf.logit_scale.detach()) == pytest.approx(2.0)
    logits = model.logit_scale.exp() * torch.nn.functional.normalize(ours_i, dim=-1) @ \
        torch.nn.functional.normalize(ours_t, dim=-1).T
    assert (out.logits_per_image - logits).abs().max() < 1e-4


def test_processor_matches_our_eval_transform(tmp_path, tok):
    save_hf_dir(models.create_model("ViT-tiny"), tmp_path, tokenizer=tok)
    proc = transformers.CLIPProcessor.from_pretrained(tmp_path)
    ip = proc.image_processor
    assert tuple(ip.image_mean) == pytest.approx(CLIP_MEAN) and tuple(ip.image_std) == pytest.approx(CLIP_STD)
    assert ip.crop_size["height"] == ip.crop_size["width"] == 64
    # an image already at the shorter side's size: no resampling, so both must agree exactly
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    ours = EvalTransform(64)(img)
    theirs = proc(images=img, return_tensors="pt").pixel_values[0]
    assert (ours - theirs).abs().max() < 1e-5


def test_tokenizer_files_give_our_ids(tmp_path, tok):
    save_hf_dir(models.create_model("ViT-tiny"), tmp_path, tokenizer=tok)
    ours = tok(TEXTS)
    ht = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    enc = ht(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    mask = enc.attention_mask.bool()
    # content, SOT and EOT agree; transformers pads with EOT where we pad with 0
    assert torch.equal(enc.input_ids[mask], ours[mask]), [t for t, a, b in zip(TEXTS, enc.input_ids, ours)
                                                          if not torch.equal(a[:len(b)], b)]
    assert torch.equal(mask.sum(1), (ours == tok.eot_token_id).int().argmax(1) + 1)
    assert (enc.input_ids[~mask] == tok.eot_token_id).all()
    # ... which does not change the text embedding (pooled at the first EOT, causal mask)
    model = models.create_model("ViT-tiny").eval()
    with torch.no_grad():
        assert (model.encode_text(enc.input_ids) - model.encode_text(ours)).abs().max() < 1e-5


def test_known_tokenizer_differences_html_and_ftfy(tmp_path, tok):
    """Documented differences: our cleaning (OpenAI's) html-unescapes and runs ftfy; the
    transformers 5 CLIPTokenizer only NFC-normalises, collapses whitespace and lowercases."""
    save_hf_dir(models.create_model("ViT-tiny"), tmp_path, tokenizer=tok)
    ht = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    for text in ["fish &amp; chips", "mojibake: Ã©"]:
        assert ht(text).input_ids[1:-1] != tok.encode([text])[0], text


def test_import_a_directory_written_by_transformers(tmp_path):
    """OpenAI's ViT-B/32 layout as transformers writes it (random init, tiny sizes)."""
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                         eos_token_id=2),  # OpenAI's converted config: legacy argmax pooling
        vision_config=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=3,
                           image_size=64, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=48)
    torch.manual_seed(1)
    hf = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        hf.logit_scale.fill_(3.3)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    tokens = torch.randint(1, 999, (2, 77))
    tokens[0, 10], tokens[1, 76] = 999, 999  # the highest id is the EOT
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want_i = _hf_features(hf.get_image_features(pixel_values=images))
        want_t = _hf_features(hf.get_text_features(input_ids=tokens))
    for spec in (tmp_path, f"hf:{tmp_path}"):
        model = load_model(spec)
        assert model.config.vision.heads == 3 and model.config.text.heads == 2 and model.config.act == "quick_gelu"
        with torch.no_grad():
            assert (model.encode_image(images) - want_i).abs().max() < 1e-5
            assert (model.encode_text(tokens) - want_t).abs().max() < 1e-5
        assert float(model.logit_scale.detach()) == pytest.approx(3.3)
    # model.init_from: hf:DIR into a fresh run's model of the same architecture
    from pretrain.train.init_from import init_model_from

    fresh = models.create_model("ViT-tiny", embed_dim=48, vocab_size=1000, text_width=64, text_heads=2,
                                vision_width=96, vision_heads=3, vision_patch_size=32).eval()
    init_model_from(fresh, f"hf:{tmp_path}")
    with torch.no_grad():
        assert (fresh.encode_image(images) - want_i).abs().max() < 1e-5


def test_resnets_are_refused_and_bad_dirs_error(tmp_path):
    with pytest.raises(ValueError, match="no ModifiedResNet"):
        save_hf_dir(models.create_model("RN-tiny"), tmp_path / "rn")
    assert not (tmp_path / "rn").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="config.json"):
        read_hf_dir(bad)
    (bad / "config.json").write_text(json.dumps({"text_config": {}, "vision_config": {}}))
    with pytest.raises(ValueError, match="safetensors"):
        read_hf_dir(bad)
    with pytest.raises(FileNotFoundError):
        read_hf_dir(tmp_path / "missing")
    (bad / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 64, "intermediate_size": 100},
                                                 "vision_config": {}}))
    with pytest.raises(ValueError, match="MLP ratio 4"):
        read_hf_dir(bad)


@pytest.mark.parametrize("name", [n for n in models.list_models() if n.startswith("ViT")])
def test_every_named_vit_covers_transformers_keys(name):
    with torch.device("meta"):
        model = models.create_model(name)
        hf = transformers.CLIPModel(transformers.CLIPConfig(**hf_config(model)))
    ours = openai_to_hf_state_dict(models.to_openai_state_dict(model))
    theirs = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    assert sorted(ours) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_safetensors_state_dict_files_load(tmp_path):
    model = models.create_model("ViT-tiny", image_size=32).eval()
    sd = {k: v.clone().contiguous() for k, v in models.to_openai_state_dict(model).items()}
    safetensors_torch.save_file(sd, str(tmp_path / "w.safetensors"))
    loaded = load_state_dict_file(tmp_path / "w.safetensors")
    assert loaded["logit_scale"].dim() == 0 and all(torch.equal(loaded[k], sd[k]) for k in sd)
    back = load_model(tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match="safetensors"):
        load_state_dict_file(tmp_path / "bad.safetensors")


@pytest.fixture(scope="module")
def trained_vit(tmp_path_factory):
    from train_driver import caption_data, launch, tiny_overrides

    root = tmp_path_factory.mktemp("vit_run")
    run = launch(root / "run", tiny_overrides(caption_data(root / "data", corrupt=False), model="ViT-tiny",
                                              stage=0, steps=3, global_batch=8, micro_batch=8), nprocs=1)
    assert run.rc == 0, run.output[-3000:]
    return root / "run"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_trained_run_exports_safetensors_and_hf(trained_vit, tmp_path, tok):
    from pretrain.modelio import load_model_from_run

    proc = subprocess.run([sys.executable, "-m", "pretrain.export", str(trained_vit), str(tmp_path / "w.safetensors")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "w.safetensors").is_file() and not (tmp_path / "w.pt").exists()
    proc = subprocess.run([sys.executable, "-m", "pretrain.export", str(trained_vit), str(tmp_path / "hf"),
                           "--format", "hf"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    live = load_model_from_run(trained_vit)
    images, tokens = torch.randn(2, 3, 32, 32), tok(TEXTS[:3])
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    from_st = load_model(tmp_path / "w.safetensors")
    with torch.no_grad():
        want_i, want_t = live.encode_image(images), live.encode_text(tokens)
        assert (_hf_features(hf.get_image_features(pixel_values=images)) - want_i).abs().max() < 1e-5
        assert (_hf_features(hf.get_text_features(input_ids=tokens)) - want_t).abs().max() < 1e-5
        assert torch.equal(from_st.encode_image(images), want_i)
    assert float(hf.logit_scale.detach()) == pytest.approx(float(live.logit_scale.detach()))
    assert not any(p.endswith(".pt") for p in map(str, (tmp_path / "hf").iterdir()))


def test_eval_and_clip_score_load_hf_dirs_and_safetensors(tmp_path):
    from data_pipeline.filter.clip_score import load_checkpoint_model
    from pretrain.eval.checkpoints import load_checkpoint

    model = models.create_model("ViT-tiny").eval()
    save_hf_dir(model, tmp_path / "hf")
    safetensors_torch.save_file({k: v.clone().contiguous() for k, v in models.to_openai_state_dict(model).items()},
                                str(tmp_path / "w.safetensors"))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.encode_image(images)
        for loaded in (load_checkpoint(tmp_path / "hf")[0], load_checkpoint(f"hf:{tmp_path / 'hf'}")[0],
                       load_checkpoint(tmp_path / "w.safetensors")[0], load_checkpoint_model(f"hf:{tmp_path / 'hf'}"),
                       load_checkpoint_model(str(tmp_path / "w.safetensors"))):
            assert (loaded.encode_image(images) - want).abs().max() < 1e-6


def test_eval_cli_writes_clip_benchmark_json(tmp_path):
    from pretrain.eval.cli import main as eval_main

    model = models.create_model("ViT-tiny", image_size=32).eval()
    safetensors_torch.save_file({k: v.clone().contiguous() for k, v in models.to_openai_state_dict(model).items()},
                                str(tmp_path / "w.safetensors"))
    rc = eval_main(["zeroshot", "--checkpoint", str(tmp_path / "w.safetensors"), "--dataset", "packaged:digits",
                    "--output-dir", str(tmp_path / "out"), "--no-cache", "--quiet", "--num-workers", "0",
                    "--limit", "64"])
    assert rc == 0
    ours = json.loads(next((tmp_path / "out").glob("zeroshot-*[!k].json")).read_text())
    cb = json.loads(next((tmp_path / "out").glob("*.clip_benchmark.json")).read_text())
    assert cb["task"] == "zeroshot_classification" and cb["pretrained"] == str(tmp_path / "w.safetensors")
    assert cb["metrics"]["acc1"] == ours["metrics"]["top1"] and cb["metrics"]["acc5"] == ours["metrics"]["top5"]
    assert set(cb) == {"dataset", "model", "pretrained", "task", "metrics", "language"}


def test_clip_benchmark_retrieval_keys():
    from pretrain.eval.clip_benchmark import to_clip_benchmark

    res = {"task": "retrieval", "dataset": "captions", "metrics": {"i2t_r1": 0.5, "t2i_r5": 0.25, "n_images": 8}}
    cb = to_clip_benchmark(res, model="m", pretrained="p")
    assert cb["task"] == "zeroshot_retrieval"
    assert cb["metrics"] == {"text_retrieval_recall@1": 0.5, "image_retrieval_recall@5": 0.25}
    assert to_clip_benchmark({"task": "few-shot"}, model="m", pretrained="p") is None
