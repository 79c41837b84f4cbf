"""Test helpers for the peer virtualenv (.venv-peer, scripts/setup_peer.sh: the real open_clip
and clip_benchmark, none of this project): find its interpreter, run tests/openclip_peer.py
there on our exported files, and compare its embeddings with ours.

    from peer_env import assert_same_embeddings, embed_inputs, our_embeddings, run_peer
    job, pixels, tokens = embed_inputs(work, model, "case")          # .npy inputs both sides read
    job.update(model="case", config_dir=str(cfg_dir), weights=str(file), loader="create")
    (theirs,) = run_peer(work, [job])
    assert_same_embeddings("case", our_embeddings(model, pixels, tokens), theirs, logit_scale)

A missing peer virtualenv fails the calling test, saying how to build it; SKIP_PEER=1 skips.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.tokenizer import default_tokenizer

REPO = Path(__file__).resolve().parents[1]
PEER_VENV = Path(os.environ.get("PEER_VENV", REPO / ".venv-peer"))
PEER_PY = PEER_VENV / "bin" / "python"
TOL = 1e-5  # max abs difference of raw embeddings, ours vs open_clip's (fp32 on CPU both sides)
CAPTIONS = ["a photo of a cat", "Hello, World!! 123 café", "  lots   of\tspaces\nand lines  ",
            "don't we'll they're it's I'M", "emoji 🐈‍⬛ and 日本語のテキスト", "ÀÉÎÕÜ àéîõü ñ ß",
            "punctuation?!... (brackets) [x] {y} <z>", "a" * 300, "", "Ünïcödé MiXeD CaSe &amp; html"]


def peer_python() -> Path:
    """The peer interpreter, or a failure that says how to build it (SKIP_PEER=1: a skip)."""
    if (PEER_VENV / ".setup-done").is_file() and PEER_PY.is_file():
        return PEER_PY
    why = (f"the peer virtualenv {PEER_VENV} (real open_clip + clip_benchmark) is not built: "
           "run scripts/setup_peer.sh (make test runs it), or set SKIP_PEER=1 to skip")
    if os.environ.get("SKIP_PEER"):
        pytest.skip(why)
    pytest.fail(why, pytrace=False)


def peer_env() -> dict[str, str]:
    """Nothing of this project on the peer's path, and no hub: open_clip alone reads local files."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    return env


def run_peer(work: Path, jobs: list[dict], timeout: float = 600) -> list[dict]:
    """Run tests/openclip_peer.py on `jobs` in the peer interpreter; each job's npz as a dict."""
    py = peer_python()
    for i, job in enumerate(jobs):
        job["out"] = str(work / f"peer_{i}.npz")
    req = work / "peer_jobs.json"
    req.write_text(json.dumps(jobs))
    out = subprocess.run([str(py), str(REPO / "tests" / "openclip_peer.py"), str(req)], cwd=work, env=peer_env(),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"open_clip side failed (rc {out.returncode}):\n{out.stderr[-4000:]}"
    results = []
    for job in jobs:
        with np.load(job["out"]) as z:
            r = {k: z[k] for k in z.files}
        r["meta"] = json.loads(str(r["meta"]))
        results.append(r)
    return results


def embed_inputs(work: Path, model: torch.nn.Module, tag: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Fixed pixels and our token ids saved as .npy (both sides embed exactly these): the
    job's input fields, and the tensors."""
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, model.image_size, model.image_size, generator=gen)
    tokens = default_tokenizer()(CAPTIONS[:5], context_length=model.context_length)
    np.save(work / f"{tag}_pixels.npy", pixels.numpy())
    np.save(work / f"{tag}_tokens.npy", tokens.numpy())
    return {"pixels": str(work / f"{tag}_pixels.npy"), "tokens": str(work / f"{tag}_tokens.npy"),
            "captions": CAPTIONS}, pixels, tokens


def our_embeddings(model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    with torch.no_grad():
        return model.encode_image(pixels).float().numpy(), model.encode_text(tokens).float().numpy()


def assert_same_embeddings(case: str, ours: tuple[np.ndarray, np.ndarray], theirs: dict, logit_scale: float) -> None:
    for side, mine in zip(("image", "text"), ours):
        assert theirs[side].shape == mine.shape, (case, side, theirs[side].shape, mine.shape)
        diff = float(np.abs(theirs[side] - mine).max())
        assert diff < TOL, f"{case}: open_clip's {side} embeddings differ from ours by {diff:.2e}"
        assert float(np.abs(mine).max()) > 1e-2  # not a vacuous match of zeros
    assert theirs["meta"]["logit_scale"] == pytest.approx(logit_scale, abs=1e-6), case
