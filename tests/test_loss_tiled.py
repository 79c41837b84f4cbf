"""Single-process tests of the tiled CLIP loss (pretrain/loss/tiled.py): equal to the plain
loss in value and gradients for every block size, float64 gradcheck of the custom autograd
function, and no b x B tensor kept for the backward. The 2/4-process checks live in
tests/test_loss_dist.py.

Run: `.venv/bin/python -m pytest -q tests/test_loss_tiled.py`
"""

from __future__ import annotations

import pytest
import torch

from pretrain.loss import clip_loss, clip_loss_tiled, get_loss
from pretrain.loss.blocks import auto_block_size
from pretrain.loss.tiled import tiled_row_ce


def unit_rows(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


def loss_and_grads(fn, img: torch.Tensor, txt: torch.Tensor, log_scale: float, **kw):  # type: ignore[no-untyped-def]
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    ls = torch.tensor([log_scale], dtype=img.dtype, requires_grad=True)
    loss = fn(img, txt, ls.exp(), **kw)
    return (loss, *torch.autograd.grad(loss, [img, txt, ls]))


@pytest.mark.parametrize("block_size", [1, 3, 7, 13, 1000])
@pytest.mark.parametrize("log_scale", [2.66, 4.6052])  # 1/0.07 and the clamp value 100
def test_tiled_equals_plain(block_size: int, log_scale: float) -> None:
    img, txt = unit_rows(13, 6, 0), unit_rows(13, 6, 1)
    want = loss_and_grads(clip_loss, img, txt, log_scale)
    got = loss_and_grads(clip_loss_tiled, img, txt, log_scale, block_size=block_size)
    for g, w, what in zip(got, want, ["loss", "image grad", "text grad", "scale grad"]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def test_tiled_extreme_logits_are_stable() -> None:
    # Aligned near-duplicate rows at scale 100: logits ~100 with tiny gaps, the overflow case,
    # and ill-conditioned: plain fp32 itself is off by ~1e-5 there, so both fp32 forms are
    # compared with a float64 computation instead of with each other.
    base = unit_rows(1, 8, 3)
    img = base + 1e-3 * unit_rows(6, 8, 4)
    txt = base + 1e-3 * unit_rows(6, 8, 5)
    exact = loss_and_grads(clip_loss, img.double(), txt.double(), 4.6052)
    for fn, kw in ((clip_loss, {}), (clip_loss_tiled, {"block_size": 2})):
        got = loss_and_grads(fn, img, txt, 4.6052, **kw)
        assert all(torch.isfinite(t).all() for t in got)
        for g, w in zip(got, exact):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("offset", [0, 2])
def test_row_ce_gradcheck_float64(offset: int) -> None:
    a = unit_rows(5, 4, 6, torch.float64).requires_grad_()
    c = unit_rows(7, 4, 7, torch.float64).requires_grad_()
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, s: tiled_row_ce(a, c, s, offset, 3), (a, c, s), fast_mode=True)
    labels = torch.arange(offset, offset + 5)
    want = torch.nn.functional.cross_entropy(s * a @ c.T, labels, reduction="none")
    torch.testing.assert_close(tiled_row_ce(a, c, s, offset, 2), want)


def saved_numels(fn, n: int, **kw) -> list[int]:  # type: ignore[no-untyped-def]
    """numel of every tensor the autograd graph of `fn` keeps for its backward."""
    img = unit_rows(n, 4, 8).requires_grad_()
    txt = unit_rows(n, 4, 9).requires_grad_()
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(img, txt, torch.tensor(10.0, requires_grad=True), **kw).backward()
    return sizes


def test_tiled_keeps_no_logit_matrix() -> None:
    n = 64
    assert max(saved_numels(clip_loss, n)) >= n * n  # the probe sees the plain loss's logits
    assert max(saved_numels(clip_loss_tiled, n, block_size=8)) <= n * 4  # only the features


def test_tiled_bf16_close_to_fp32() -> None:
    img, txt = unit_rows(16, 8, 10), unit_rows(16, 8, 11)
    ref = clip_loss(img, txt, 20.0)
    got = clip_loss_tiled(img.bfloat16(), txt.bfloat16(), 20.0, block_size=5)
    assert got.dtype == torch.float32  # accumulated in fp32
    assert got.item() == pytest.approx(ref.item(), rel=2e-2)


def test_registry_and_bad_block_size() -> None:
    img = unit_rows(4, 3, 12)
    assert get_loss("clip_tiled", block_size=2)(img, img, 5.0).item() == pytest.approx(
        clip_loss(img, img, 5.0).item(), rel=1e-6
    )
    assert clip_loss_tiled(img, img, 5.0).item() == pytest.approx(clip_loss(img, img, 5.0).item(), rel=1e-6)
    with pytest.raises(ValueError, match="block_size"):
        clip_loss_tiled(img, img, 5.0, block_size=0)


def test_auto_block_size() -> None:
    assert auto_block_size(4, 3) == 3  # never more columns than exist
    assert auto_block_size(4096, 32768) == (1 << 23) // 4096
    assert auto_block_size(1 << 20, 1 << 20) == 256  # floor keeps blocks from getting thin


def test_tiled_under_autocast_matches_plain() -> None:
    # bf16 autocast (CPU here, CUDA on GPU): both forms see bf16 matmuls; the tiled
    # backward recomputes under the same autocast state, so they agree to bf16 precision.
    img, txt = unit_rows(24, 16, 13), unit_rows(24, 16, 14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = loss_and_grads(clip_loss, img, txt, 2.66)
        got = loss_and_grads(clip_loss_tiled, img, txt, 2.66, block_size=7)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())
