"""Single-process tests of pretrain.loss: the plain CLIP loss against a hand-written
reference (explicit loops in float64 numpy), input checks, and the registry.

Run: `.venv/bin/python -m pytest -q tests/test_loss.py`
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretrain.loss import clip_loss, gather_features, get_loss, list_losses


def reference_clip_loss(img: np.ndarray, txt: np.ndarray, scale: float) -> float:
    """CLIP loss written out with loops: row i of image->text and of text->image."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for a, b in ((img, txt), (txt, img)):
            logits = [scale * float(np.dot(a[i], b[j])) for j in range(n)]
            m = max(logits)
            lse = m + math.log(sum(math.exp(z - m) for z in logits))
            total += lse - logits[i]
    return total / (2 * n)


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("n,d,scale", [(1, 4, 14.3), (5, 8, 1 / 0.07), (9, 3, 100.0)])
def test_plain_loss_matches_loops(n: int, d: int, scale: float) -> None:
    img, txt = unit_rows(n, d, 0), unit_rows(n, d, 1)
    got = clip_loss(img, txt, torch.tensor(scale))
    want = reference_clip_loss(img.double().numpy(), txt.double().numpy(), scale)
    assert got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_plain_loss_gradient_matches_finite_differences() -> None:
    # float64 so that gradcheck's finite differences are meaningful.
    img = unit_rows(4, 3, 2).double().requires_grad_()
    txt = unit_rows(4, 3, 3).double().requires_grad_()
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(clip_loss, (img, txt, scale))


def test_scale_forms_and_perfect_alignment() -> None:
    img = torch.eye(4)
    # one-element [1] scale (the model's layout), 0-dim tensor and float all agree
    a = clip_loss(img, img, torch.tensor([50.0]))
    b = clip_loss(img, img, torch.tensor(50.0))
    c = clip_loss(img, img, 50.0)
    assert a.item() == b.item() == c.item()
    # orthonormal, aligned pairs: loss = log(1 + 3 e^-50) per row, about 0
    assert a.item() == pytest.approx(math.log1p(3 * math.exp(-50.0)), abs=1e-12)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(torch.zeros(3, 4), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        clip_loss(torch.zeros(3), torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="one element"):
        clip_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(2))


def test_gather_is_noop_without_process_group() -> None:
    x = torch.randn(3, 2)
    y, offset = gather_features(x)
    assert y is x and offset == 0


def test_registry() -> None:
    assert "clip" in list_losses()
    assert get_loss("clip") is clip_loss
    with pytest.raises(KeyError, match="unknown loss"):
        get_loss("nope")
