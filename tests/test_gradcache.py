"""Exact gradient caching on a plain module, one process (pretrain.gradcache.plain/core/replay).

References are computed without caching: the whole batch through the model with gradients
and one `loss.backward()` (ViT; ResNet in eval mode), or, where the model's function itself
depends on the chunking (BatchNorm in train mode normalises each chunk with its own
statistics; dropout draws per call), every chunk's forward WITH gradients in order, the
features concatenated and one backward: the computation caching must reproduce.

Run: `.venv/bin/python -m pytest -q tests/test_gradcache.py`
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.gradcache import gradcache_backward, preserved_buffers, split_batch
from pretrain.loss import get_loss
from pretrain.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the fp64 reference lives there
from gradcache_reference import clip_loss_grads, reference_grads  # noqa: E402

IMAGE_SIZE = 32
CONTEXT = 16


def make_model(name: str, *, checkpointing: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, image_size=IMAGE_SIZE, context_length=CONTEXT)
    model.set_grad_checkpointing(checkpointing)
    with torch.no_grad():
        model.logit_scale.add_(0.3)  # off the init value so that its gradient is generic
    return model


def make_batch(n: int, vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    tokens = torch.randint(1, vocab, (n, CONTEXT), generator=g)
    tokens[:, -1] = vocab - 1  # the text tower reads the features at the argmax token
    return images, tokens


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        out[name] = p.grad.detach().clone()
    return out


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    worst = {k: float((got[k] - want[k]).abs().max()) for k in got}
    name = max(worst, key=worst.get)
    assert worst[name] <= atol + 1e-5 * float(want[name].abs().max()), f"{name}: max |diff| {worst[name]:.3g}"
    # the gradients are not trivially zero
    assert sum(float(g.abs().sum()) for g in want.values()) > 1.0


def full_batch_grads(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                     loss_name: str) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = get_loss(loss_name)(*model(images, tokens))
    loss.backward()
    return float(loss.detach()), grads_of(model)


def chunked_uncached_grads(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                           chunk: int) -> tuple[float, dict]:
    """Every chunk forward with gradients (activations of all chunks alive), one backward."""
    model.zero_grad(set_to_none=True)
    outs = [model(c.images, c.tokens) for c in split_batch(images, tokens, chunk)]
    img = torch.cat([o[0] for o in outs])
    txt = torch.cat([o[1] for o in outs])
    loss = get_loss("clip")(img, txt, outs[0][2])
    loss.backward()
    return float(loss.detach()), grads_of(model)


def cached_grads(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, chunk: int,
                 loss_name: str = "clip") -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = gradcache_backward(model, images, tokens, get_loss(loss_name), chunk)
    return float(loss), grads_of(model)


@pytest.mark.parametrize("loss_name", ["clip", "clip_tiled", "clip_ring"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_vit_cached_equals_full_batch(loss_name: str, checkpointing: bool) -> None:
    model = make_model("ViT-tiny", checkpointing=checkpointing)
    model.train()
    images, tokens = make_batch(32, model.vocab_size)
    ref_loss, ref = full_batch_grads(make_model("ViT-tiny").train(), images, tokens, "clip")
    loss, got = cached_grads(model, images, tokens, 8, loss_name)
    assert math.isclose(loss, ref_loss, rel_tol=1e-6)
    assert_grads_close(got, ref)


def test_uneven_last_chunk_and_one_chunk() -> None:
    model = make_model("ViT-tiny").train()
    images, tokens = make_batch(30, model.vocab_size)
    _, ref = full_batch_grads(model, images, tokens, "clip")
    for chunk in (8, 30, 64):  # 8+8+8+6; one chunk; chunk larger than the batch
        _, got = cached_grads(model, images, tokens, chunk)
        assert_grads_close(got, ref)


def test_resnet_eval_mode_equals_full_batch() -> None:
    model = make_model("RN-tiny").eval()
    images, tokens = make_batch(32, model.vocab_size)
    _, ref = full_batch_grads(model, images, tokens, "clip")
    _, got = cached_grads(model, images, tokens, 8)
    assert_grads_close(got, ref)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_resnet_train_mode_batchnorm(checkpointing: bool) -> None:
    """Train-mode BN: gradients of the chunk-wise-BN computation, and running statistics
    updated exactly once per chunk (as uncached micro-batches update them)."""
    images, tokens = make_batch(32, 49408)
    ref_model = make_model("RN-tiny").train()
    _, ref = chunked_uncached_grads(ref_model, images, tokens, 8)
    model = make_model("RN-tiny", checkpointing=checkpointing).train()
    _, got = cached_grads(model, images, tokens, 8)
    assert_grads_close(got, ref)
    ref_buffers, buffers = dict(ref_model.named_buffers()), dict(model.named_buffers())
    bn = [k for k in ref_buffers if k.endswith("running_mean")]
    assert bn, "RN-tiny has BatchNorm layers"
    for k in ref_buffers:
        torch.testing.assert_close(buffers[k], ref_buffers[k], rtol=0, atol=0, msg=k)
    # without the restore, pass 2 would have moved the statistics a second time
    twice = make_model("RN-tiny").train()
    chunked_uncached_grads(twice, images, tokens, 8)
    chunked_uncached_grads(twice, images, tokens, 8)
    assert any(not torch.equal(dict(twice.named_buffers())[k], ref_buffers[k]) for k in bn)
    assert int(buffers["visual.bn1.num_batches_tracked"]) == 4  # one update per chunk


class DropoutCLIP(nn.Module):
    """CLIP with dropout on the image tower's output: a model whose forward draws random
    numbers, which the replay must draw again identically."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip, self.drop = clip, nn.Dropout(0.5)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        img = nn.functional.normalize(self.drop(self.clip.encode_image(images)), dim=-1)
        txt = nn.functional.normalize(self.clip.encode_text(tokens), dim=-1)
        return img, txt, self.clip.logit_scale.exp().squeeze(0)


def test_dropout_replayed_with_the_same_random_numbers() -> None:
    images, tokens = make_batch(24, 49408)
    ref_model = DropoutCLIP(make_model("ViT-tiny")).train()
    torch.manual_seed(123)
    _, ref = chunked_uncached_grads(ref_model, images, tokens, 8)
    ref_next = torch.rand(3)  # the generator ends where one forward per chunk leaves it
    model = DropoutCLIP(make_model("ViT-tiny")).train()
    torch.manual_seed(123)
    _, got = cached_grads(model, images, tokens, 8)
    assert torch.equal(torch.rand(3), ref_next)
    assert_grads_close(got, ref)


def test_preserved_buffers_restores_on_error() -> None:
    bn = nn.BatchNorm1d(4).train()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(RuntimeError):
        with preserved_buffers(bn):
            bn(torch.randn(8, 4))
            raise RuntimeError("boom")
    assert all(torch.equal(bn.state_dict()[k], v) for k, v in before.items())


def test_bad_inputs_raise_clear_errors() -> None:
    images, tokens = make_batch(4, 100)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        split_batch(images, tokens, 0)
    with pytest.raises(ValueError, match="same batch size"):
        split_batch(images, tokens[:3], 2)
    with pytest.raises(ValueError, match="non-empty"):
        split_batch(images[:0], tokens[:0], 2)


def test_closed_form_reference_loss_matches_autograd() -> None:
    """The fp64 reference of scripts/gradcache_32k.py: closed-form CLIP loss gradients in
    row blocks == autograd through pretrain.loss.clip_loss."""
    g = torch.Generator().manual_seed(3)
    img = nn.functional.normalize(torch.randn(50, 8, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    txt = nn.functional.normalize(torch.randn(50, 8, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    scale = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)
    loss = get_loss("clip")(img, txt, scale)
    loss.backward()
    got_loss, g_img, g_txt, g_scale = clip_loss_grads(img.detach(), txt.detach(), 7.5, block=16)
    assert math.isclose(got_loss, float(loss.detach()), rel_tol=1e-12)
    torch.testing.assert_close(g_img, img.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_txt, txt.grad, rtol=1e-10, atol=1e-12)
    assert math.isclose(g_scale, float(scale.grad), rel_tol=1e-10)


def test_fp64_reference_grads_match_full_batch_autograd() -> None:
    model = make_model("ViT-tiny").train()
    images, tokens = make_batch(40, model.vocab_size)
    ref_loss, ref = full_batch_grads(model, images, tokens, "clip")
    loss, got = reference_grads(model, lambda a, b: (images[a:b], tokens[a:b]), 40, chunk=16, block=12)
    assert math.isclose(loss, ref_loss, rel_tol=1e-6)
    assert_grads_close({k: v.float() for k, v in got.items()}, ref)
