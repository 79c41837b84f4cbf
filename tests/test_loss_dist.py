"""Distributed tests of pretrain.loss ("clip", "clip_tiled", "clip_ring", "siglip"): 2 and 4 gloo
processes on CPU against one process computing the full global batch (fp32).

Convention checked (see pretrain/loss/clip.py): mean of the ranks' losses == full-batch loss;
the gradient w.r.t. rank r's own features == world_size x the full-batch gradient of those
rows; the rank-averaged logit-scale (and SigLIP bias) and parameter gradients == the
full-batch ones. The reference of "clip_tiled" and "clip_ring" is the plain "clip" loss. Each world size
starts its processes once and runs every case in them (spawn is the slow part).

Run: `.venv/bin/python -m pytest -q tests/test_loss_dist.py`
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_distributed
from pretrain.loss import get_loss

LOG_SCALE = math.log(1 / 0.07) + 0.3  # off the init value so its gradient is generic
BIAS = -4.0  # SigLIP bias: with d=8 random features, keeps both label signs in play

# name -> (loss used in the ranks, loss used for the single-process reference)
LOSSES: dict[str, tuple[str, dict[str, Any], str]] = {
    "clip": ("clip", {}, "clip"),
    "clip_tiled": ("clip_tiled", {"block_size": 3}, "clip"),  # blocks straddle rank slices
    "clip_ring": ("clip_ring", {"block_size": 2}, "clip"),  # several blocks per ring hop
    "siglip": ("siglip", {}, "siglip"),
}

# (sizes per rank) for the feature-level cases; unequal ones include an empty rank.
FEATURE_CASES: dict[int, list[list[int]]] = {
    2: [[4, 4], [3, 5]],
    4: [[3, 3, 3, 3], [2, 0, 5, 3]],
}
# (model name, overrides, train mode, grad checkpointing, sizes per rank, loss name); the
# reference is always one process, whole batch, no checkpointing, plain "clip" loss.
ModelCase = tuple[str, dict[str, Any], bool, bool, list[int], str]
VIT: tuple[str, dict[str, Any]] = ("ViT-tiny", {"image_size": 32})
MODEL_CASES: dict[int, list[ModelCase]] = {
    2: [
        (*VIT, True, False, [3, 3], "clip"),
        (*VIT, True, True, [3, 3], "clip"),
        (*VIT, True, False, [2, 4], "clip"),
        (*VIT, True, True, [3, 3], "clip_tiled"),
        (*VIT, True, True, [2, 4], "clip_ring"),
        # ResNet in eval mode: in train mode BatchNorm normalises each rank's slice with that
        # slice's statistics, a different function from full-batch BN (not a loss property).
        ("RN-tiny", {"image_size": 32}, False, False, [3, 3], "clip"),
        ("RN-tiny", {"image_size": 32}, False, True, [3, 3], "clip"),
    ],
    4: [
        (*VIT, True, False, [2, 2, 2, 2], "clip"),
        (*VIT, True, True, [2, 2, 2, 2], "clip"),
        (*VIT, True, False, [1, 3, 2, 2], "clip_ring"),
    ],
}


def global_features(total: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(total, d, generator=g), torch.randn(total, d, generator=g)
    return img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True)


def feature_loss(img: torch.Tensor, txt: torch.Tensor, loss_name: str, **options: Any) -> dict[str, torch.Tensor]:
    """Loss and gradients w.r.t. the given rows, the log logit scale (and SigLIP's bias)."""
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    log_scale = torch.tensor([LOG_SCALE], requires_grad=True)
    bias = torch.tensor([BIAS], requires_grad=True)
    extra = (bias,) if loss_name == "siglip" else ()
    loss = get_loss(loss_name, **options)(img, txt, log_scale.exp(), *extra)
    loss.backward()
    out = {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": log_scale.grad}
    if extra:
        out["bias"] = bias.grad
    return out


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


def model_grads(
    model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, loss_name: str = "clip"
) -> dict[str, torch.Tensor]:
    loss = get_loss(loss_name, **LOSSES[loss_name][1])(*model(images, tokens))
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rank_slice(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def dist_checks(rank: int, world: int) -> dict[str, Any]:
    """Runs in every rank: all feature cases, then all model cases."""
    out: dict[str, Any] = {"features": {}, "models": []}
    for key, (loss_name, options, _) in LOSSES.items():
        for case, sizes in enumerate(FEATURE_CASES[world]):
            img, txt = global_features(sum(sizes))
            sl = rank_slice(sizes, rank)
            out["features"][key, case] = feature_loss(img[sl], txt[sl], loss_name, **options)
    for name, overrides, train, ckpt, sizes, loss_name in MODEL_CASES[world]:
        model = build_model(name, overrides, train, ckpt)
        images, tokens = global_batch(model, sum(sizes))
        sl = rank_slice(sizes, rank)
        grads = model_grads(model, images[sl], tokens[sl], loss_name)
        for g in grads.values():  # what DDP / DeepSpeed do: average over ranks
            dist.all_reduce(g)
            g /= world
        out["models"].append(grads if rank == 0 else None)
    return out


def _by_feature_case(results: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, torch.Tensor]]]:
    """(loss key, case index) -> the ranks' results, in rank order."""
    return {k: [r["features"][k] for r in results] for k in results[0]["features"]}


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_equals_full_batch(world: int) -> None:
    results = run_distributed(dist_checks, world, timeout_s=170)

    for (key, case), per_rank_list in _by_feature_case(results).items():
        sizes = FEATURE_CASES[world][case]
        ref = feature_loss(*global_features(sum(sizes)), LOSSES[key][2])

        def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
            torch.testing.assert_close(
                got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key} sizes={sizes} {what}: {m}"
            )

        close(torch.stack([r["loss"] for r in per_rank_list]).mean(), ref["loss"], "mean loss")
        for param in ("scale", "bias") if key == "siglip" else ("scale",):
            close(torch.stack([r[param] for r in per_rank_list]).mean(0), ref[param], f"{param} grad")
        for rank, r in enumerate(per_rank_list):
            sl = rank_slice(sizes, rank)
            # all_gather's backward sums over ranks: world_size x the full-batch gradient
            # (compared after dividing by world_size, so the tolerance is in full-batch units)
            close(r["img"] / world, ref["img"][sl], f"rank {rank} image grad / world_size")
            close(r["txt"] / world, ref["txt"][sl], f"rank {rank} text grad / world_size")

    for case, (name, overrides, train, ckpt, sizes, loss_name) in enumerate(MODEL_CASES[world]):
        got = results[0]["models"][case]
        # reference: one process, whole batch, no checkpointing
        model = build_model(name, overrides, train, False)
        want = model_grads(model, *global_batch(model, sum(sizes)))
        assert got.keys() == want.keys() and "logit_scale" in want
        for key in want:
            torch.testing.assert_close(
                got[key], want[key], rtol=1e-5, atol=1e-5,
                msg=lambda m: f"{name} {loss_name} ckpt={ckpt} {sizes} {key}: {m}",
            )


def failing_rank(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    dist.barrier()  # rank 0 blocks here; the harness must still return promptly
    return rank


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_harness_reports_a_rank_error() -> None:
    with pytest.raises(Exception, match="rank 1 fails on purpose"):
        run_distributed(failing_rank, 2, timeout_s=50)
