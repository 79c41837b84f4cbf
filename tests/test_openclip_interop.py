"""Our OpenAI-layout export loads in the real `open_clip` package and gives our embeddings.

open_clip (which needs torchvision) lives in the peer virtualenv .venv-peer
(scripts/setup_peer.sh, run by scripts/setup.sh), never in .venv: each case writes our export
plus the pixel tensors and token ids as .npy files, and tests/openclip_peer.py, run by the peer
interpreter, loads the file with open_clip and embeds exactly those inputs. Cases: random-init
ViT-tiny (QuickGELU and GELU) and RN-tiny through a model-config JSON from
`pretrain.modelio.openclip`, a random-init ViT-B/32 through open_clip's own
"ViT-B-32-quickgelu" config, the .pt pickle through `open_clip.load_openai_model` (config
read from the weights' shapes), and a tiny run trained by the real launcher and exported by
the `clip-export --open-clip-config` CLI. (`load_openai_model` rounds weights through float16, as
OpenAI's fp16 release needs; its cases use weights that float16 holds exactly.) Also: open_clip's tokenizer gives our token ids,
and its eval preprocessing gives our EvalTransform's pixels.

    .venv/bin/python -m pytest -q tests/test_openclip_interop.py

A missing peer virtualenv fails these tests (saying how to build it); SKIP_PEER=1 skips them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from pretrain import models  # noqa: E402
from pretrain.data.transforms import EvalTransform  # noqa: E402
from pretrain.export import save_openai_layout  # noqa: E402
from pretrain.modelio import load_model, load_model_from_run  # noqa: E402
from pretrain.modelio.openclip import open_clip_config, write_open_clip_config  # noqa: E402
from pretrain.tokenizer import default_tokenizer  # noqa: E402

PEER_VENV = Path(os.environ.get("PEER_VENV", REPO / ".venv-peer"))
PEER_PY = PEER_VENV / "bin" / "python"
TOL = 1e-5
CAPTIONS = ["a photo of a cat", "Hello, World!! 123 café", "  lots   of\tspaces\nand lines  ",
            "don't we'll they're it's I'M", "emoji 🐈‍⬛ and 日本語のテキスト", "ÀÉÎÕÜ àéîõü ñ ß",
            "punctuation?!... (brackets) [x] {y} <z>", "a" * 300, "", "Ünïcödé MiXeD CaSe &amp; html"]


def peer_python() -> Path:
    """The peer interpreter, or a failure that says how to build it (SKIP_PEER=1: a skip)."""
    if (PEER_VENV / ".setup-done").is_file() and PEER_PY.is_file():
        return PEER_PY
    why = (f"the peer virtualenv {PEER_VENV} (real open_clip + clip_benchmark) is not built: "
           "run scripts/setup_peer.sh (scripts/setup.sh runs it), or set SKIP_PEER=1 to skip")
    if os.environ.get("SKIP_PEER"):
        pytest.skip(why)
    pytest.fail(why, pytrace=False)


def run_peer(work: Path, jobs: list[dict], timeout: float = 600) -> list[dict]:
    """Run tests/openclip_peer.py on `jobs` in the peer interpreter; each job's npz as a dict."""
    py = peer_python()
    for i, job in enumerate(jobs):
        job["out"] = str(work / f"peer_{i}.npz")
    req = work / "peer_jobs.json"
    req.write_text(json.dumps(jobs))
    # Nothing of this project on the peer's path, and no hub: open_clip alone reads local files.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    out = subprocess.run([str(py), str(REPO / "tests" / "openclip_peer.py"), str(req)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"open_clip side failed (rc {out.returncode}):\n{out.stderr[-4000:]}"
    results = []
    for job in jobs:
        with np.load(job["out"]) as z:
            r = {k: z[k] for k in z.files}
        r["meta"] = json.loads(str(r["meta"]))
        results.append(r)
    return results


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


def _inputs(work: Path, model: torch.nn.Module, tag: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, model.image_size, model.image_size)
    tokens = default_tokenizer()(CAPTIONS[:5], context_length=model.context_length)
    np.save(work / f"{tag}_pixels.npy", pixels.numpy())
    np.save(work / f"{tag}_tokens.npy", tokens.numpy())
    return {"pixels": str(work / f"{tag}_pixels.npy"), "tokens": str(work / f"{tag}_tokens.npy"),
            "captions": CAPTIONS}, pixels, tokens


def _ours(model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    with torch.no_grad():
        return model.encode_image(pixels).numpy(), model.encode_text(tokens).numpy()


def _assert_same(case: str, ours: tuple[np.ndarray, np.ndarray], theirs: dict, logit_scale: float) -> None:
    for side, mine in zip(("image", "text"), ours):
        assert theirs[side].shape == mine.shape, (case, side, theirs[side].shape, mine.shape)
        diff = float(np.abs(theirs[side] - mine).max())
        assert diff < TOL, f"{case}: open_clip's {side} embeddings differ from ours by {diff:.2e}"
        assert float(np.abs(mine).max()) > 1e-2  # not a vacuous match of zeros
    assert theirs["meta"]["logit_scale"] == pytest.approx(logit_scale, abs=1e-6), case


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
        job, pixels, tokens = _inputs(work, model, case)
        job.update(model=case if arch == "json" else arch, config_dir=str(cfg_dir) if arch == "json" else None,
                   weights=str(weights), loader=loader)
        if case == "vit-tiny-quickgelu" or case == "rn-tiny":
            job["images"] = _images(work)
        jobs.append(job)
        ours[case] = _ours(model, pixels, tokens)
        scales[case] = float(model.logit_scale.detach())
    results = run_peer(work, jobs)
    return {case: (ours[case], scales[case], res, job)
            for (case, *_), res, job in zip(RANDOM_CASES, results, jobs)}


@pytest.mark.parametrize("case", [c[0] for c in RANDOM_CASES])
def test_open_clip_loads_our_export_with_our_embeddings(random_init, case):
    ours, scale, theirs, _ = random_init[case]
    _assert_same(case, ours, theirs, scale)
    want_class = "CLIP"
    assert theirs["meta"]["class"] == want_class, theirs["meta"]


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


def test_open_clip_config_matches_open_clips_own_zoo_configs(random_init):
    """The config JSON we write for a zoo size loads the same file as open_clip's own config
    (shown by the ViT-B/32 case) and has its values: open_clip's ViT-B-32-quickgelu."""
    cfg = open_clip_config(models.get_config("ViT-B/32"))
    assert cfg["quick_gelu"] is True and cfg["embed_dim"] == 512
    assert cfg["vision_cfg"] == {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32, "head_width": 64}
    assert cfg["text_cfg"] == {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}


@pytest.mark.slow
def test_trained_run_export_cli_loads_in_open_clip(tmp_path):
    """A tiny ViT trained by the real launcher (2 ranks, ZeRO-1), exported by the CLI with its
    open_clip config, loads in open_clip with our embeddings of the trained weights."""
    from train_driver import caption_data, launch, tiny_overrides

    peer_python()  # fail fast, before the launch, when the peer is missing
    data = caption_data(tmp_path / "data", corrupt=False)
    run = launch(tmp_path / "run", tiny_overrides(data, model="ViT-tiny", steps=4, extra=["--logging.mlflow=false"]), nprocs=2, timeout=240)
    assert run.rc == 0, run.output[-4000:]
    out_dir = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "pretrain.export", str(run.run_dir), str(out_dir / "trained-vit"),
                           "--open-clip-config"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out_dir / "trained-vit.json").is_file() and (out_dir / "trained-vit.safetensors").is_file()
    model = load_model_from_run(run.run_dir, device="cpu").eval()
    fresh = models.create_model("ViT-tiny", image_size=32)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    # the exported file itself reads back to the run's weights in our loader too
    reread = load_model(str(out_dir / "trained-vit.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reread.state_dict().values()))
    job, pixels, tokens = _inputs(tmp_path, model, "trained")
    job.update(model="trained-vit", config_dir=str(out_dir), weights=str(out_dir / "trained-vit.safetensors"),
               loader="create")
    (theirs,) = run_peer(tmp_path, [job])
    _assert_same("trained", _ours(model, pixels, tokens), theirs, float(model.logit_scale.detach()))
