"""Model-side speed switches (pretrain/models/speed.py, docs/speed.md): each one against
the plain path on CPU in fp32, plus the run-config validation of its key."""
from __future__ import annotations

import copy

import pytest
import torch

from pretrain.models import create_model, to_openai_state_dict
from pretrain.models.layers import LayerNorm, ResidualAttentionBlock
from pretrain.models.patch_dropout import drop_patches, kept_patches
from pretrain.models.resnet import Bottleneck
from pretrain.models.speed import apply_speed_switches, compile_blocks


def _batch(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, model.image_size, model.image_size, generator=g)
    tokens = torch.randint(1, model.vocab_size, (b, 8), generator=g)
    return images, tokens


def _loss_and_grads(model, images, tokens):
    img, txt, scale = model(images, tokens)
    loss = (scale * img @ txt.t()).logsumexp(1).mean() + img.pow(3).sum() + txt.pow(3).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, atol=1e-5):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, atol=atol, rtol=1e-5)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=1e-4, msg=name)


# Inductor generates and builds C++ for every distinct block shape (~10 CPU-s each here, with a
# cold cache as on a fresh CI machine): whole models (the ViT's image and text blocks, the
# ResNet's four bottleneck shapes) go through the same graph capture and autograd tracing
# without code generation (aot_eager), and inductor compiles one block of each kind on its
# own below: a causal attention block and the downsampling bottleneck (the block with the
# average pool that inductor's dynamic shapes once failed on). apply_speed_switches'
# `compile="blocks"` is compile_blocks with the inductor backend.
@pytest.mark.parametrize("name,blocks", [("ViT-tiny", 2 + 2), ("RN-tiny", 4 + 2)])
def test_compiled_blocks_match_eager_with_checkpointing_and_keep_keys(name, blocks):
    torch.manual_seed(0)
    eager = create_model(name)
    eager.set_grad_checkpointing(True)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, backend="aot_eager") == blocks  # image blocks + text blocks
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no "_orig_mod."
    assert list(to_openai_state_dict(compiled)) == list(to_openai_state_dict(eager))
    batch = _batch(eager)
    _assert_same(_loss_and_grads(compiled, *batch), _loss_and_grads(eager, *batch))
    for a, b in zip(compiled.buffers(), eager.buffers()):  # BN statistics updated once
        torch.testing.assert_close(a, b)


def _block_loss_and_grads(block, x):
    xi = x.clone().requires_grad_(True)
    y = block(xi)
    y.pow(2).mean().backward()  # O(1) gradients: fp32 reassociation stays far under atol
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    return y.detach(), {**grads, "(input)": xi.grad}  # the output in the loss's place


@pytest.mark.parametrize("kind", ["attention", "bottleneck"])
def test_one_block_through_inductor_matches_eager(kind):
    torch.manual_seed(0)
    if kind == "attention":  # a text block of an initialised model (a bare block's weights are empty)
        text = create_model("ViT-tiny").transformer
        eager, x = text.resblocks[0], torch.randn(2, 5, text.width)
        assert eager.attn.causal
    else:
        eager, x = Bottleneck(16, 8, stride=2), torch.randn(2, 16, 8, 8)
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=False)  # as compile_blocks does, with its default backend (inductor)
    _assert_same(_block_loss_and_grads(compiled, x), _block_loss_and_grads(eager, x))
    for a, b in zip(compiled.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b)


def test_residual_block_compiles_without_graph_breaks():
    block = ResidualAttentionBlock(64, 2, causal=True)
    explanation = torch._dynamo.explain(block)(torch.randn(2, 5, 64))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_channels_last_resnet_matches_plain():
    torch.manual_seed(0)
    plain = create_model("RN-tiny")
    fast = apply_speed_switches(copy.deepcopy(plain), channels_last=True)
    assert fast.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    batch = _batch(plain)
    _assert_same(_loss_and_grads(fast, *batch), _loss_and_grads(plain, *batch))
    with pytest.raises(ValueError, match="ResNet"):
        apply_speed_switches(create_model("ViT-tiny"), channels_last=True)


def test_layernorm_fp32_input_takes_no_casts_and_native_bf16_is_close():
    ln = LayerNorm(32)
    torch.nn.init.normal_(ln.weight)
    x = torch.randn(4, 32)
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, (32,), ln.weight, ln.bias), atol=0, rtol=0)
    ln_bf16 = copy.deepcopy(ln).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    exact = ln_bf16(xb)
    ref = torch.nn.functional.layer_norm(xb.float(), (32,), ln_bf16.weight.float(), ln_bf16.bias.float()).to(torch.bfloat16)
    assert torch.equal(exact, ref)  # default: statistics in fp32
    ln_bf16.fp32 = False
    native = ln_bf16(xb)
    assert native.dtype == torch.bfloat16
    torch.testing.assert_close(native.float(), exact.float(), atol=0.05, rtol=0.02)
    model = apply_speed_switches(create_model("ViT-tiny"), ln_fp32=False)
    assert all(not m.fp32 for m in model.modules() if isinstance(m, LayerNorm))


def test_patch_dropout_keeps_cls_and_k_tokens_per_sample_seeded():
    x = torch.randn(8, 1 + 16, 4)
    assert drop_patches(x, 0.0) is x
    y = drop_patches(x, 0.5, generator=torch.Generator().manual_seed(3))
    assert y.shape == (8, 1 + kept_patches(16, 0.5), 4) == (8, 9, 4)
    assert torch.equal(y[:, 0], x[:, 0])
    subsets = []
    for i in range(8):  # every kept token is one of that sample's own patches, none twice
        rows = [int(((x[i, 1:] - t).abs().sum(-1) == 0).nonzero()) for t in y[i, 1:]]
        assert len(set(rows)) == 8 and rows == sorted(rows)
        subsets.append(tuple(rows))
    assert len(set(subsets)) > 1  # a different subset per sample
    again = drop_patches(x, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(y, again)
    with pytest.raises(ValueError):
        drop_patches(x, 1.0)


def test_vit_patch_dropout_training_only_and_exact_at_zero():
    torch.manual_seed(0)
    plain = create_model("ViT-tiny")
    images, tokens = _batch(plain, b=3)
    zero = apply_speed_switches(copy.deepcopy(plain), patch_dropout=0.0)
    _assert_same(_loss_and_grads(zero, images, tokens), _loss_and_grads(plain, images, tokens), atol=0)
    dropped = apply_speed_switches(copy.deepcopy(plain), patch_dropout=0.5)
    seen = []
    dropped.visual.transformer.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    plain.eval(), dropped.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropped.encode_image(images), plain.encode_image(images), atol=0, rtol=0)
        dropped.train()
        out = dropped.encode_image(images)
    grid = (plain.image_size // plain.visual.patch_size) ** 2
    assert seen == [1 + grid, 1 + grid // 2]
    assert not torch.allclose(out, plain.encode_image(images))
    with pytest.raises(ValueError, match="ViT"):
        apply_speed_switches(create_model("RN-tiny"), patch_dropout=0.5)


@pytest.mark.parametrize("args, match", [
    (["--model.compile=full"], "model.compile"),
    (["--model.patch_dropout=1.0"], "patch_dropout"),
    (["--model.name=RN-tiny", "--model.patch_dropout=0.5"], "ViT models only"),
    (["--model.name=ViT-tiny", "--model.channels_last=true"], "ResNet models only"),
])
def test_run_config_rejects_bad_switches(args, match):
    from pretrain.config import load_config
    from tests.test_config import REQUIRED
    with pytest.raises(ValueError, match=match):
        load_config(None, REQUIRED + args)


def test_run_config_accepts_switches():
    from pretrain.config import load_config
    from tests.test_config import REQUIRED
    cfg = load_config(None, REQUIRED + ["--model.name=ViT-tiny", "--model.compile=blocks",
                                        "--model.patch_dropout=0.5", "--model.ln_fp32=false"])
    assert (cfg.model.compile, cfg.model.patch_dropout, cfg.model.ln_fp32) == ("blocks", 0.5, False)
