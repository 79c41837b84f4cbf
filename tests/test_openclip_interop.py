"""Our OpenAI-layout export loads in the real `open_clip` package and gives our embeddings.

open_clip (which needs torchvision) lives in the peer virtualenv .venv-peer
(scripts/setup_peer.sh, run by `make test`), never in .venv: each case writes our export
plus the pixel tensors and token ids as .npy files, and tests/openclip_peer.py, run by the peer
interpreter, loads the file with open_clip and embeds exactly those inputs. Cases: random-init
ViT-tiny (QuickGELU and GELU) and RN-tiny through a model-config JSON from
`pretrain.modelio.openclip`, a random-init ViT-B/32 through open_clip's own
"ViT-B-32-quickgelu" config, and the .pt pickle through `open_clip.load_openai_model` (config
read from the weights' shapes); tests/test_train_launch.py loads the `clip-export
--open-clip-config` export of a ZeRO-3 trained run the same way. (`load_openai_model` rounds weights through float16, as
OpenAI's fp16 release needs; its cases use weights that float16 holds exactly.) Also: open_clip's tokenizer gives our token ids,
and its eval preprocessing gives our EvalTransform's pixels.

    .venv/bin/python -m pytest -q tests/test_openclip_interop.py

A missing peer virtualenv fails these tests (saying how to build it); SKIP_PEER=1 skips them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from peer_env import (CAPTIONS, assert_same_embeddings, embed_inputs, our_embeddings, peer_python,  # noqa: E402
                      run_peer)
from pretrain import models  # noqa: E402
from pretrain.data.transforms import EvalTransform  # noqa: E402
from pretrain.export import save_openai_layout  # noqa: E402
from pretrain.modelio.openclip import open_clip_config, write_open_clip_config  # noqa: E402
from pretrain.tokenizer import default_tokenizer  # noqa: E402

def _images(work: Path) -> list[str]:
    """Images that exercise the resize + crop: grey 28x28 (Fashion-MNIST's shape), an RGB
    landscape and a portrait, and one already at the target size."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (28, 28), dtype=np.uint8), rng.integers(0, 256, (37, 50, 3), dtype=np.uint8),
              rng.integers(0, 256, (90, 41, 3), dtype=np.uint8), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    paths = []
    for i, a in enumerate(arrays):
        p = work / f"img{i}.png"
        Image.fromarray(a).save(p)
        paths.append(str(p))
    return paths


# name, our model + overrides, how open_clip gets the architecture, loader, export as .pt
RANDOM_CASES = [
    ("vit-tiny-quickgelu", "ViT-tiny", {"image_size": 32}, "json", "create", False),
    ("vit-tiny-gelu", "ViT-tiny", {"act": "gelu", "init_logit_scale": 2.0}, "json", "create", False),
    ("rn-tiny", "RN-tiny", {}, "json", "create", False),
    ("vit-b-32", "ViT-B/32", {}, "ViT-B-32-quickgelu", "create", False),
    ("vit-tiny-openai-pt", "ViT-tiny", {}, None, "openai", True),
    ("rn-tiny-openai-pt", "RN-tiny", {}, None, "openai", True),
]


@pytest.fixture(scope="module")
def random_init(tmp_path_factory):
    """Every random-init case exported and run through open_clip in one peer process."""
    peer_python()  # the missing-peer failure (or SKIP_PEER skip) before any export
    work = tmp_path_factory.mktemp("openclip_interop")
    cfg_dir = work / "configs"
    jobs, ours, scales = [], {}, {}
    for i, (case, name, over, arch, loader, pt) in enumerate(RANDOM_CASES):
        torch.manual_seed(100 + i)
        model = models.create_model(name, **over).eval()
        if loader == "openai":
            # load_openai_model rounds Linear/Conv/attention weights through float16 (OpenAI's
            # release is fp16): weights that float16 holds exactly make that rounding a no-op.
            with torch.no_grad():
                for t in model.state_dict().values():
                    if t.is_floating_point():
                        t.copy_(t.half().float())
        written = save_openai_layout(model, work / case, pt=pt)
        weights = written[-1]  # the .pt when asked for, else the .safetensors
        if arch == "json":
            write_open_clip_config(model.config, cfg_dir / f"{case}.json")
        job, pixels, tokens = embed_inputs(work, model, case)
        job.update(model=case if arch == "json" else arch, config_dir=str(cfg_dir) if arch == "json" else None,
                   weights=str(weights), loader=loader)
        if case == "vit-tiny-quickgelu" or case == "rn-tiny":
            job["images"] = _images(work)
        jobs.append(job)
        ours[case] = our_embeddings(model, pixels, tokens)
        scales[case] = float(model.logit_scale.detach())
    results = run_peer(work, jobs)
    return {case: (ours[case], scales[case], res, job)
            for (case, *_), res, job in zip(RANDOM_CASES, results, jobs)}


@pytest.mark.parametrize("case", [c[0] for c in RANDOM_CASES])
def test_open_clip_loads_our_export_with_our_embeddings(random_init, case):
    ours, scale, theirs, _ = random_init[case]
    assert_same_embeddings(case, ours, theirs, scale)
    assert theirs["meta"]["class"] == "CLIP", theirs["meta"]


def test_open_clip_tokenizer_gives_our_ids(random_init):
    _, _, theirs, _ = random_init["vit-tiny-quickgelu"]
    ours = default_tokenizer()(CAPTIONS).numpy()
    assert theirs["caption_ids"].shape == ours.shape
    bad = [c for c, a, b in zip(CAPTIONS, theirs["caption_ids"], ours) if not np.array_equal(a, b)]
    assert not bad, f"token ids differ for {bad}"


@pytest.mark.parametrize("case", ["vit-tiny-quickgelu", "rn-tiny"])
def test_open_clip_preprocess_gives_our_eval_pixels(random_init, case):
    """open_clip's eval transform (Resize shorter side bicubic, CenterCrop, RGB, CLIP mean/std)
    is our EvalTransform: the same pixels, so an eval through open_clip sees our inputs."""
    _, _, theirs, job = random_init[case]
    size = int(theirs["meta"]["image_size"][0])
    ours = np.stack([EvalTransform(size)(Image.open(p)).numpy() for p in job["images"]])
    assert theirs["preprocessed"].shape == ours.shape
    assert float(np.abs(theirs["preprocessed"] - ours).max()) < 1e-5, theirs["meta"]["transform"]


def test_open_clip_config_matches_open_clips_own_zoo_configs():
    """The config JSON we write for a zoo size loads the same file as open_clip's own config
    (shown by the ViT-B/32 case) and has its values: open_clip's ViT-B-32-quickgelu."""
    cfg = open_clip_config(models.get_config("ViT-B/32"))
    assert cfg["quick_gelu"] is True and cfg["embed_dim"] == 512
    assert cfg["vision_cfg"] == {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32, "head_width": 64}
    assert cfg["text_cfg"] == {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
