"""Single-process tests of the SigLIP loss (pretrain/loss/siglip.py) against a hand-written
float64 loop reference and finite differences. The 2/4-process checks live in
tests/test_loss_dist.py.

Run: `.venv/bin/python -m pytest -q tests/test_loss_siglip.py`
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretrain.loss import SIGLIP_INIT_BIAS, SIGLIP_INIT_LOG_SCALE, get_loss, siglip_loss


def reference_siglip(img: np.ndarray, txt: np.ndarray, scale: float, bias: float) -> float:
    """-(1/n) sum_ij log sigmoid(y_ij z_ij), y = +1 on the diagonal, written as loops."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = scale * float(np.dot(img[i], txt[j])) + bias
            y = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-y * z))  # -log sigmoid(y z)
    return total / n


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("n,scale,bias", [(1, 10.0, -10.0), (6, 10.0, -10.0), (9, 3.0, 0.5)])
def test_siglip_matches_loops(n: int, scale: float, bias: float) -> None:
    img, txt = unit_rows(n, 5, 0), unit_rows(n, 5, 1)
    got = siglip_loss(img.float(), txt.float(), torch.tensor([scale]), torch.tensor([bias]))
    want = reference_siglip(img.numpy(), txt.numpy(), scale, bias)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_siglip_gradcheck_float64() -> None:
    img, txt = unit_rows(4, 3, 2).requires_grad_(), unit_rows(4, 3, 3).requires_grad_()
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(siglip_loss, (img, txt, scale, bias))


def test_siglip_init_and_registry() -> None:
    assert math.exp(SIGLIP_INIT_LOG_SCALE) == pytest.approx(10.0) and SIGLIP_INIT_BIAS == -10.0
    img = unit_rows(3, 4, 4).float()
    assert get_loss("siglip")(img, img, 10.0, -10.0).item() == siglip_loss(img, img, 10.0, -10.0).item()
    with pytest.raises(ValueError, match="logit_bias"):
        siglip_loss(img, img, 10.0, torch.zeros(2))
