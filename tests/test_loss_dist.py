"""Distributed tests of pretrain.loss.clip_loss: 2 and 4 gloo processes on CPU against one
process computing the full global batch (fp32).

Convention checked (see pretrain/loss/clip.py): mean of the ranks' losses == full-batch loss;
the gradient w.r.t. rank r's own features == world_size x the full-batch gradient of those
rows; the rank-averaged logit-scale and parameter gradients == the full-batch ones. Each
world size starts its processes once and runs every case in them (spawn is the slow part).

Run: `.venv/bin/python -m pytest -q tests/test_loss_dist.py`
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_distributed
from pretrain.loss import clip_loss

LOG_SCALE = math.log(1 / 0.07) + 0.3  # off the init value so its gradient is generic

# (sizes per rank) for the feature-level cases; unequal ones include an empty rank.
FEATURE_CASES: dict[int, list[list[int]]] = {
    2: [[4, 4], [3, 5]],
    4: [[3, 3, 3, 3], [2, 0, 5, 3]],
}
# (model name, overrides, train mode, grad checkpointing, sizes per rank)
ModelCase = tuple[str, dict[str, Any], bool, bool, list[int]]
MODEL_CASES: dict[int, list[ModelCase]] = {
    2: [
        ("ViT-tiny", {"image_size": 32}, True, False, [3, 3]),
        ("ViT-tiny", {"image_size": 32}, True, True, [3, 3]),
        ("ViT-tiny", {"image_size": 32}, True, False, [2, 4]),
        # ResNet in eval mode: in train mode BatchNorm normalises each rank's slice with that
        # slice's statistics, a different function from full-batch BN (not a loss property).
        ("RN-tiny", {"image_size": 32}, False, False, [3, 3]),
        ("RN-tiny", {"image_size": 32}, False, True, [3, 3]),
    ],
    4: [
        ("ViT-tiny", {"image_size": 32}, True, False, [2, 2, 2, 2]),
        ("ViT-tiny", {"image_size": 32}, True, True, [2, 2, 2, 2]),
    ],
}


def global_features(total: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(total, d, generator=g), torch.randn(total, d, generator=g)
    return img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True)


def feature_loss(img: torch.Tensor, txt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss and gradients w.r.t. the given rows and the log logit scale."""
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    log_scale = torch.tensor([LOG_SCALE], requires_grad=True)
    loss = clip_loss(img, txt, log_scale.exp())
    loss.backward()
    return {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": log_scale.grad}


def build_model(name: str, overrides: dict[str, Any], train: bool, ckpt: bool) -> torch.nn.Module:
    from pretrain.models import create_model

    torch.manual_seed(0)  # same init on every rank and in the reference
    model = create_model(name, **overrides)
    model.train(train)
    model.set_grad_checkpointing(ckpt)
    return model


def global_batch(model: torch.nn.Module, total: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(total, 3, model.image_size, model.image_size, generator=g)
    tokens = torch.randint(1, model.vocab_size, (total, model.context_length), generator=g)
    return images, tokens


def model_grads(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    loss = clip_loss(*model(images, tokens))
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rank_slice(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def dist_checks(rank: int, world: int) -> dict[str, Any]:
    """Runs in every rank: all feature cases, then all model cases."""
    out: dict[str, Any] = {"features": [], "models": []}
    for sizes in FEATURE_CASES[world]:
        img, txt = global_features(sum(sizes))
        out["features"].append(feature_loss(img[rank_slice(sizes, rank)], txt[rank_slice(sizes, rank)]))
    for name, overrides, train, ckpt, sizes in MODEL_CASES[world]:
        model = build_model(name, overrides, train, ckpt)
        images, tokens = global_batch(model, sum(sizes))
        sl = rank_slice(sizes, rank)
        grads = model_grads(model, images[sl], tokens[sl])
        for g in grads.values():  # what DDP / DeepSpeed do: average over ranks
            dist.all_reduce(g)
            g /= world
        out["models"].append(grads if rank == 0 else None)
    return out


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_equals_full_batch(world: int) -> None:
    results = run_distributed(dist_checks, world, timeout_s=170)

    for case, sizes in enumerate(FEATURE_CASES[world]):
        ref = feature_loss(*global_features(sum(sizes)))
        per_rank = [r["features"][case] for r in results]
        mean_loss = torch.stack([r["loss"] for r in per_rank]).mean()
        torch.testing.assert_close(mean_loss, ref["loss"], rtol=1e-5, atol=1e-6)
        mean_scale_grad = torch.stack([r["scale"] for r in per_rank]).mean(0)
        torch.testing.assert_close(mean_scale_grad, ref["scale"], rtol=1e-5, atol=1e-6)
        for rank, r in enumerate(per_rank):
            sl = rank_slice(sizes, rank)
            # all_gather's backward sums over ranks: world_size x the full-batch gradient
            torch.testing.assert_close(r["img"], world * ref["img"][sl], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r["txt"], world * ref["txt"][sl], rtol=1e-5, atol=1e-6)

    for case, (name, overrides, train, ckpt, sizes) in enumerate(MODEL_CASES[world]):
        got = results[0]["models"][case]
        # reference: one process, whole batch, no checkpointing
        model = build_model(name, overrides, train, False)
        want = model_grads(model, *global_batch(model, sum(sizes)))
        assert got.keys() == want.keys() and "logit_scale" in want
        for key in want:
            torch.testing.assert_close(
                got[key], want[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} ckpt={ckpt} {sizes} {key}: {m}"
            )
