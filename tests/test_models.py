"""Model zoo tests (CPU, a few seconds): parameter counts of the paper's nine models (meta
device), tiny-model shapes, initialisation statistics, end-of-text pooling and the causal
mask, attention layers against torch's reference MultiheadAttention, overrides, gradient
checkpointing and bf16 autocast.

    .venv/bin/python -m pytest -q tests/test_models.py
"""
from __future__ import annotations

import ast
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models import PAPER_MODELS, create_model, list_models
from pretrain.models.layers import QuickGELU, SelfAttention
from pretrain.models.resnet import AttentionPool2d

# the CLIP paper's counts (arXiv 2103.00020; docs/models.md), millions of parameters
PAPER_PARAMS_M = {"RN50": 102, "RN101": 120, "RN50x4": 178, "RN50x16": 291, "RN50x64": 623,
                  "ViT-B/32": 151, "ViT-B/16": 150, "ViT-L/14": 428, "ViT-L/14@336": 428}
TINY = ("RN-tiny", "ViT-tiny")
EOT = 49407  # <|endoftext|>, the largest id of CLIP's vocabulary


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these models are tiny: one intra-op thread is faster, and on a busy 2-core machine
    # OpenMP threads spinning against other processes slow each op down by 10-50x
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tokens(batch: int, eot_at: list[int], length: int = 77, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, EOT - 1, (batch, length), generator=g)
    for row, pos in enumerate(eot_at):
        t[row, pos] = EOT
        t[row, pos + 1:] = 0
    return t


def test_list_models_names():
    assert list_models() == list(PAPER_PARAMS_M) + list(TINY)


@pytest.mark.parametrize("name", list(PAPER_PARAMS_M))
def test_paper_parameter_counts_within_one_percent(name: str):
    with torch.device("meta"):
        model = create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.01, count
    expected_px = {"RN50x4": 288, "RN50x16": 384, "RN50x64": 448, "ViT-L/14@336": 336}.get(name, 224)
    assert model.image_size == expected_px and model.context_length == 77
    assert model.vocab_size == 49408


@pytest.mark.parametrize("name", TINY)
def test_tiny_shapes_and_normalised_outputs(name: str):
    torch.manual_seed(0)
    model = create_model(name)
    assert model.image_size == 64 and model.embed_dim == 64
    images, tokens = torch.randn(5, 3, 64, 64), _tokens(5, [3, 10, 20, 40, 76])
    assert model.encode_image(images).shape == (5, 64)
    assert model.encode_text(tokens).shape == (5, 64)
    img, txt, scale = model(images, tokens)
    assert img.shape == txt.shape == (5, 64)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(5))
    assert scale.dim() == 0 and abs(scale.item() - 1 / 0.07) < 1e-4
    assert model.logit_scale.shape == (1,)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with pytest.raises(ValueError, match="64px"):
        model.encode_image(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="context"):
        model.encode_text(torch.zeros(2, 78, dtype=torch.long))


def test_overrides():
    m = create_model("ViT-tiny", image_size=32, act="gelu", embed_dim=48, text_layers=3)
    assert m.image_size == 32 and m.embed_dim == 48 and len(m.transformer.resblocks) == 3
    assert m.visual.positional_embedding.shape[0] == (32 // 16) ** 2 + 1
    assert isinstance(m.transformer.resblocks[0].mlp.gelu, nn.GELU)
    assert isinstance(create_model("RN-tiny").transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert create_model("RN-tiny", image_size=96).visual.attnpool.positional_embedding.shape[0] == 10
    assert create_model("RN-tiny", grad_checkpointing=True).visual.grad_checkpointing
    wide = create_model("ViT-tiny", text_width=128, vision_width=192)  # heads follow width/64
    assert wide.config.text.heads == 2 and wide.config.vision.heads == 3
    assert create_model("RN-tiny", vision_width=16).config.vision.heads == 8
    assert create_model("ViT-tiny", text_width=128, text_heads=4).config.text.heads == 4
    with pytest.raises(ValueError, match="unknown model override.*colour"):
        create_model("ViT-tiny", colour="red")
    with pytest.raises(ValueError, match="act"):
        create_model("ViT-tiny", act="relu")
    with pytest.raises(ValueError, match="multiple"):
        create_model("ViT-tiny", image_size=40)
    with pytest.raises(ValueError, match="ViT models only"):
        create_model("RN-tiny", vision_patch_size=8)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("ViT-H/14")


def _std_ok(t: torch.Tensor, expected: float, tol: float = 0.1) -> bool:
    return abs(t.float().std().item() / expected - 1) < tol


def test_init_statistics():
    torch.manual_seed(0)
    vit = create_model("ViT-tiny", text_layers=3)
    rn = create_model("RN-tiny")
    tw = vit.config.text.width
    assert _std_ok(vit.token_embedding.weight, 0.02)
    assert _std_ok(vit.positional_embedding, 0.01)
    assert _std_ok(vit.text_projection, tw ** -0.5)
    for tower, width, layers in ((vit.transformer, tw, 3),
                                 (vit.visual.transformer, vit.config.vision.width, 2)):
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in tower.resblocks:
            assert _std_ok(block.attn.in_proj_weight, width ** -0.5)
            assert _std_ok(block.attn.out_proj.weight, proj_std)
            assert _std_ok(block.mlp.c_fc.weight, (2 * width) ** -0.5)
            assert _std_ok(block.mlp.c_proj.weight, proj_std)
    vw = vit.config.vision.width
    assert _std_ok(vit.visual.proj, vw ** -0.5)
    assert _std_ok(vit.visual.positional_embedding, vw ** -0.5, tol=0.15)  # 17 x 128 values
    pool = rn.visual.attnpool
    for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
        assert _std_ok(proj.weight, proj.in_features ** -0.5)
    blocks = [b for stage in rn.visual.stages() for b in stage]
    assert blocks and all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    assert all(torch.all(b.bn2.weight == 1) for b in blocks)  # only the last BN is zeroed


@pytest.mark.parametrize("name", TINY)
def test_text_features_taken_at_eot(name: str):
    torch.manual_seed(0)
    model = create_model(name).eval()
    tokens = _tokens(3, [5, 30, 76])
    changed = tokens.clone()
    changed[0, 6:] = torch.randint(1, EOT - 1, (71,))  # junk after the EOT
    changed[1, 31:] = 7
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(changed), model.encode_text(tokens),
                                   rtol=0, atol=1e-6)
        # the pooled features are exactly the hidden state at the EOT position
        hidden = model.text_hidden_states(tokens)
        expected = hidden[torch.arange(3), torch.tensor([5, 30, 76])] @ model.text_projection
        torch.testing.assert_close(model.encode_text(tokens), expected)
        # moving the EOT changes the output
        moved = tokens.clone()
        moved[0, 5], moved[0, 4] = 3, EOT
        assert not torch.allclose(model.encode_text(moved)[0], model.encode_text(tokens)[0])


def test_causal_mask():
    torch.manual_seed(0)
    model = create_model("ViT-tiny").eval()
    tokens = _tokens(2, [60, 70])
    later = tokens.clone()
    later[:, 40] = 1234
    with torch.no_grad():
        a, b = model.text_hidden_states(tokens), model.text_hidden_states(later)
    torch.testing.assert_close(a[:, :40], b[:, :40], rtol=0, atol=1e-6)
    assert (a[:, 40:] - b[:, 40:]).abs().amax(dim=-1).min() > 1e-4  # every later position moves


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_matches_torch_multihead_attention(causal: bool):
    torch.manual_seed(0)
    attn = SelfAttention(32, 4, causal=causal)
    nn.init.normal_(attn.in_proj_weight, std=0.2)
    nn.init.normal_(attn.in_proj_bias, std=0.2)
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    ref.load_state_dict(attn.state_dict())  # identical parameter names
    x = torch.randn(3, 9, 32)
    mask = torch.full((9, 9), float("-inf")).triu(1) if causal else None
    expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_pool_matches_full_multihead_attention():
    # OpenAI's formulation: every token is a query, row 0 (the mean token) is the output
    torch.manual_seed(0)
    pool = AttentionPool2d(spacial_dim=3, embed_dim=32, heads=4, output_dim=16)
    x = torch.randn(2, 32, 3, 3)
    seq = x.flatten(2).permute(2, 0, 1)  # (HW, B, C)
    seq = torch.cat([seq.mean(0, keepdim=True), seq]) + pool.positional_embedding[:, None]
    out, _ = F.multi_head_attention_forward(
        seq, seq, seq, embed_dim_to_check=32, num_heads=4, q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True, training=False, need_weights=False)
    torch.testing.assert_close(pool(x), out[0], rtol=1e-5, atol=1e-5)


def _grads(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    img, txt, scale = model(images, tokens)
    logits = scale * img @ txt.t()
    labels = torch.arange(len(images))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", TINY)
def test_grad_checkpointing_same_gradients(name: str):
    torch.manual_seed(0)
    plain = create_model(name).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    images, tokens = torch.randn(6, 3, 64, 64), _tokens(6, [4, 9, 16, 25, 36, 49])
    calls = []
    hook = ckpt.transformer.resblocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    g_plain, g_ckpt = _grads(plain, images, tokens), _grads(ckpt, images, tokens)
    hook.remove()
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing is active
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) == len(list(plain.parameters()))
    for key in g_plain:
        torch.testing.assert_close(g_ckpt[key], g_plain[key], rtol=0, atol=1e-6, msg=key)
    # BatchNorm statistics are updated once, not again by the recomputation
    for (key, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=key)


def test_set_grad_checkpointing_per_tower():
    model = create_model("RN-tiny")
    model.set_grad_checkpointing(True, text=False)
    assert model.visual.grad_checkpointing and not model.transformer.grad_checkpointing
    model.set_grad_checkpointing(True, image=False)
    assert model.visual.grad_checkpointing and model.transformer.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.visual.grad_checkpointing and not model.transformer.grad_checkpointing


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_and_bf16_weights(name: str):
    torch.manual_seed(0)
    model = create_model(name).eval()
    images, tokens = torch.randn(4, 3, 64, 64), _tokens(4, [3, 8, 12, 60])
    with torch.no_grad():
        ref = model(images, tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = model(images, tokens)
        half = model.to(torch.bfloat16)(images, tokens)  # fp32 inputs, bf16 weights
    for r, a, h in zip(ref[:2], amp[:2], half[:2]):
        assert torch.isfinite(a).all() and torch.isfinite(h).all()
        assert F.cosine_similarity(r, a.float()).min() > 0.98
        assert F.cosine_similarity(r, h.float()).min() > 0.98


def test_no_distributed_imports_in_model_package():
    root = Path(__file__).resolve().parents[1] / "pretrain" / "models"
    files = sorted(root.glob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("torch.distributed", "deepspeed")), (path, name)
