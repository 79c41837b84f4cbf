"""OpenAI checkpoint layout tests (CPU, a few seconds): exact round trips through
``to_openai_state_dict`` / ``from_openai_state_dict``, config inference from shapes for
every named model (meta device), the key set of OpenAI's layout (docs/models.md), checkpoint wrappers
and positional-embedding resizing (checked against an independent bicubic).

    .venv/bin/python -m pytest -q tests/test_openai_layout.py
"""
from __future__ import annotations

import io
import math

import pytest
import torch

from pretrain.models import (MODEL_CONFIGS, create_model, from_openai_state_dict, infer_config,
                             resize_grid_embedding, resize_positional_embedding,
                             to_openai_state_dict)

EOT = 49407


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: one thread is faster, and avoids OpenMP thrashing on a busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(px: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, EOT - 1, (batch, 77), generator=g)
    tokens[torch.arange(batch), torch.tensor([3, 20, 50, 76])[:batch]] = EOT
    return torch.randn(batch, 3, px, px, generator=g), tokens


def _trained_looking(name: str, **overrides) -> torch.nn.Module:
    """A tiny model whose BatchNorm statistics and zero-initialised gammas are no longer at
    their init values, so the round trip has to carry every buffer."""
    torch.manual_seed(0)
    model = create_model(name, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.train()(*_inputs(model.image_size))
    return model.eval()


@pytest.mark.parametrize("name,act", [("RN-tiny", "quick_gelu"), ("ViT-tiny", "quick_gelu"),
                                      ("RN-tiny", "gelu"), ("ViT-tiny", "gelu")])
def test_round_trip_is_exact(name: str, act: str):
    model = _trained_looking(name, act=act)
    buffer = io.BytesIO()
    torch.save(to_openai_state_dict(model), buffer)  # through a real file format
    buffer.seek(0)
    sd = torch.load(buffer, weights_only=True)
    assert sd["logit_scale"].dim() == 0
    loaded = from_openai_state_dict(sd, act=act).eval()
    assert loaded.config == model.config and loaded.logit_scale.shape == (1,)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    images, tokens = _inputs(model.image_size)
    with torch.no_grad():
        for a, b in zip(model(images, tokens), loaded(images, tokens)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_config_inferred_from_shapes(name: str):
    with torch.device("meta"):
        model = create_model(name)
    assert infer_config(to_openai_state_dict(model)) == model.config
    assert infer_config(to_openai_state_dict(model), act="gelu").act == "gelu"


_BLOCK = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
          "attn.out_proj.bias", "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
          "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight", "ln_2.bias"]
_BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def _expected_text_keys(layers: int) -> set[str]:
    keys = {"token_embedding.weight", "positional_embedding", "ln_final.weight",
            "ln_final.bias", "text_projection", "logit_scale"}
    return keys | {f"transformer.resblocks.{i}.{k}" for i in range(layers) for k in _BLOCK}


def test_vit_key_layout():
    with torch.device("meta"):
        sd = to_openai_state_dict(create_model("ViT-B/32"))
    expected = _expected_text_keys(12) | {
        "visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
        "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight",
        "visual.ln_post.bias", "visual.proj"}
    expected |= {f"visual.transformer.resblocks.{i}.{k}" for i in range(12) for k in _BLOCK}
    assert set(sd) == expected
    shapes = {"visual.conv1.weight": (768, 3, 32, 32), "visual.class_embedding": (768,),
              "visual.positional_embedding": (50, 768), "visual.proj": (768, 512),
              "text_projection": (512, 512), "positional_embedding": (77, 512),
              "token_embedding.weight": (49408, 512), "logit_scale": (),
              "transformer.resblocks.0.attn.in_proj_weight": (1536, 512),
              "transformer.resblocks.11.mlp.c_fc.weight": (2048, 512)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_resnet_key_layout():
    with torch.device("meta"):
        sd = to_openai_state_dict(create_model("RN50"))
    expected = _expected_text_keys(12)
    for i in (1, 2, 3):
        expected |= {f"visual.conv{i}.weight"} | {f"visual.bn{i}.{k}" for k in _BN}
    for stage, depth in enumerate((3, 4, 6, 3), start=1):
        for j in range(depth):
            prefix = f"visual.layer{stage}.{j}."
            for i in (1, 2, 3):
                expected |= {f"{prefix}conv{i}.weight"} | {f"{prefix}bn{i}.{k}" for k in _BN}
            if j == 0:  # every stage's first block changes width (and stride after layer1)
                expected |= {f"{prefix}downsample.0.weight"} | {f"{prefix}downsample.1.{k}" for k in _BN}
    expected |= {"visual.attnpool.positional_embedding"} | {
        f"visual.attnpool.{p}_proj.{k}" for p in "qkvc" for k in ("weight", "bias")}
    assert set(sd) == expected
    shapes = {"visual.attnpool.positional_embedding": (50, 2048),
              "visual.attnpool.k_proj.weight": (2048, 2048),
              "visual.attnpool.c_proj.weight": (1024, 2048),
              "visual.layer1.0.downsample.0.weight": (256, 64, 1, 1),
              "visual.conv1.weight": (32, 3, 3, 3), "text_projection": (512, 1024)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_wrapped_fp16_checkpoint_loads():
    model = _trained_looking("RN-tiny")
    sd = {f"module.{k}": (v.half() if v.is_floating_point() else v)
          for k, v in to_openai_state_dict(model).items()}
    # OpenAI's JIT-derived dicts carry metadata entries and no num_batches_tracked
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    sd["module.input_resolution"] = torch.tensor(64)
    loaded = from_openai_state_dict({"state_dict": sd, "epoch": 3})
    for key, value in loaded.state_dict().items():
        if value.is_floating_point():
            assert value.dtype == torch.float32
            assert torch.equal(value.reshape(-1), sd[f"module.{key}"].float().reshape(-1)), key


def test_bad_state_dicts_fail_clearly():
    sd = to_openai_state_dict(create_model("ViT-tiny"))
    with pytest.raises(ValueError, match="missing 'text_projection'"):
        from_openai_state_dict({k: v for k, v in sd.items() if k != "text_projection"})
    with pytest.raises(ValueError, match="missing"):
        from_openai_state_dict({k: v for k, v in sd.items() if k != "visual.ln_post.bias"})
    with pytest.raises(ValueError, match="cannot be applied"):
        from_openai_state_dict(sd, embed_dim=32)
    with pytest.raises(ValueError, match="square"):
        from_openai_state_dict({**sd, "visual.positional_embedding": torch.zeros(7, 128)})
    with pytest.raises(ValueError, match="image tower"):
        from_openai_state_dict({k: v for k, v in sd.items() if not k.startswith("visual.")})


def test_identity_resize_is_exact():
    model = _trained_looking("ViT-tiny")
    pos = model.visual.positional_embedding.detach()
    assert torch.equal(resize_grid_embedding(pos, 4), pos)
    same = from_openai_state_dict(to_openai_state_dict(model), image_size=64).eval()
    images, tokens = _inputs(64)
    with torch.no_grad():
        assert torch.equal(same.encode_image(images), model.encode_image(images))


@pytest.mark.parametrize("name,old,new", [("ViT-tiny", 32, 48), ("RN-tiny", 64, 96)])
def test_resized_model_runs_at_new_size(name: str, old: int, new: int):
    model = _trained_looking(name, image_size=old)
    sd = to_openai_state_dict(model)
    bigger = from_openai_state_dict(sd, image_size=new).eval()
    assert bigger.image_size == new
    key = "visual.positional_embedding" if name == "ViT-tiny" else "visual.attnpool.positional_embedding"
    cell = 16 if name == "ViT-tiny" else 32
    new_pos = bigger.state_dict()[key]
    assert new_pos.shape[0] == (new // cell) ** 2 + 1
    assert torch.equal(new_pos[0], sd[key][0])  # class / mean token untouched
    for k, v in bigger.state_dict().items():  # every other tensor is carried unchanged
        if k != key:
            assert torch.equal(v, sd[k].reshape(v.shape)), k
    images, tokens = _inputs(new)
    with torch.no_grad():
        img, txt, _ = bigger(images, tokens)
        assert img.shape == (4, 64) and torch.isfinite(img).all()
        torch.testing.assert_close(txt, model(_inputs(old)[0], tokens)[1], rtol=0, atol=0)


def test_vit_l14_resized_to_336_is_the_336_model():
    with torch.device("meta"):
        sd = to_openai_state_dict(create_model("ViT-L/14"))
        resized = resize_positional_embedding(sd, 336)
    assert infer_config(resized) == MODEL_CONFIGS["ViT-L/14@336"]


def _cubic(x: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel (the one PyTorch's and OpenCV's bicubic use)."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0


def _reference_bicubic(grid: torch.Tensor, size: int) -> torch.Tensor:
    """Independent separable bicubic on a (g, g, C) grid, half-pixel centres, clamped edges."""
    g = grid.shape[0]

    def weights(d: int) -> list[tuple[int, float]]:
        src = (d + 0.5) * g / size - 0.5
        f = math.floor(src)
        return [(min(max(f + k, 0), g - 1), _cubic(src - (f + k))) for k in (-1, 0, 1, 2)]

    out = torch.zeros(size, size, grid.shape[2], dtype=torch.float64)
    for y in range(size):
        for x in range(size):
            for iy, wy in weights(y):
                for ix, wx in weights(x):
                    out[y, x] += wy * wx * grid[iy, ix].double()
    return out


def test_resize_matches_independent_bicubic():
    # The grid is a linear function of position. Note PyTorch's (and open_clip's, timm's)
    # bicubic uses Keys' kernel with a = -0.75, which reproduces constants but not linear
    # functions exactly (only a = -0.5 does), so the check is against an independent
    # implementation of that kernel at every output point, plus the exact properties.
    g, size = 8, 12
    i, j = torch.meshgrid(torch.arange(g, dtype=torch.float64),
                          torch.arange(g, dtype=torch.float64), indexing="ij")
    coeffs = torch.tensor([[0.5, -1.0, 2.0], [0.25, 0.0, -3.0], [1.0, 1.0, 0.1]], dtype=torch.float64)
    linear = coeffs[0] + i[..., None] * coeffs[1] + j[..., None] * coeffs[2]  # (g, g, 3)
    cls = torch.tensor([[7.0, 8.0, 9.0]])
    pos = torch.cat([cls, linear.reshape(g * g, 3).float()])
    out = resize_grid_embedding(pos, size)
    assert out.shape == (size * size + 1, 3) and torch.equal(out[0], cls[0])
    resized = out[1:].reshape(size, size, 3).double()
    torch.testing.assert_close(resized, _reference_bicubic(linear, size), rtol=0, atol=1e-5)
    # away from the clamped border the result stays within 5% of a cell's step of the
    # linear function (a = -0.75 gives 4.6% here; a wrong kernel or offset gives far more)
    src = torch.tensor([(d + 0.5) * g / size - 0.5 for d in range(size)], dtype=torch.float64)
    inner = slice(2, size - 2)
    exact = coeffs[0] + src[:, None, None] * coeffs[1] + src[None, :, None] * coeffs[2]
    bound = 0.05 * coeffs[1:].abs().sum(0) + 1e-5  # per channel
    assert ((resized - exact)[inner, inner].abs() <= bound).all()
    # 3x upsampling puts every third output exactly on a grid node: the node value comes back
    up = resize_grid_embedding(pos, 3 * g)[1:].reshape(3 * g, 3 * g, 3)
    nodes = [d for d in range(3 * g) if (d - 1) % 3 == 0]  # src = (d - 1) / 3
    torch.testing.assert_close(up[nodes][:, nodes].double(), linear, rtol=0, atol=1e-5)
    # a constant grid stays constant everywhere (the kernel weights sum to one)
    const = resize_grid_embedding(torch.full((g * g + 1, 2), 3.25), size)
    torch.testing.assert_close(const, torch.full((size * size + 1, 2), 3.25))
