"""The trainer step keeps its figures on the device, and the AdamW kernels agree.

- `train_step` reads nothing back to the host per micro-batch: during a step of 3
  micro-batches, the calls of Tensor.item / __bool__ / __float__ / __int__ / tolist made
  from the step's own code (pretrain/train/step.py, pretrain/engine_step.py) are counted by
  patching them, and there is exactly one (finish_step's single transfer); the old step
  made three per micro-batch. The step's reported figures equal a host-side recomputation.
- `optimizer.kernel=foreach|fused` gives the same parameters as torch's default AdamW after
  several steps (CPU supports both kernels).

Run: `.venv/bin/python -m pytest -q tests/test_step_sync_free.py`.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

STEP_FILES = (str(REPO / "pretrain" / "train" / "step.py"), str(REPO / "pretrain" / "engine_step.py"))
READBACKS = ("item", "__bool__", "__float__", "__int__", "tolist")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from gpu_bench import build_bench

    spec = {"model": "ViT-tiny", "ckpt": False, "precision": "fp32", "micro_batch": 4, "global_batch": 12,
            "out_dir": str(tmp_path_factory.mktemp("run"))}
    return build_bench(spec)


def _count_readbacks(fn):
    counts: dict[str, int] = {}
    originals = {name: getattr(torch.Tensor, name) for name in READBACKS}

    def wrap(name):
        orig = originals[name]

        def patched(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller in STEP_FILES:
                counts[name] = counts.get(name, 0) + 1
            return orig(self, *a, **k)
        return patched

    for name in READBACKS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        out = fn()
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)
    return out, counts


def test_step_reads_back_once_per_step(bench):
    from pretrain.train.step import train_step

    assert bench.engine.gradient_accumulation_steps() == 3
    train_step(bench.engine, bench.micro_batches, bench.loss_fn)  # warm-up
    scale_before = float(bench.engine.module.logit_scale.detach().exp())  # the forward's scale
    out, counts = _count_readbacks(lambda: train_step(bench.engine, bench.micro_batches, bench.loss_fn))
    assert sum(counts.values()) == 1 and counts == {"tolist": 1}, counts
    assert out.applied and not out.loss_nonfinite and math.isfinite(out.loss)
    assert out.logit_scale == pytest.approx(scale_before, rel=1e-6)
    assert out.grad_norm is not None and out.grad_norm > 0
    # the reported loss is the mean of the micro-batch losses, recomputed on the host
    model = bench.engine.module
    with torch.no_grad():
        losses = [float(bench.loss_fn(*model(b["images"], b["tokens"]))) for b in bench.micro_batches]
    after = train_step(bench.engine, bench.micro_batches, bench.loss_fn)
    assert after.loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_nan_loss_still_skips_without_readbacks(bench):
    from pretrain.train.step import train_step

    before = [p.detach().clone() for p in bench.engine.module.parameters()]
    out, counts = _count_readbacks(lambda: train_step(bench.engine, bench.micro_batches, bench.loss_fn,
                                                      inject_nan=True))
    assert counts == {"tolist": 1}, counts
    assert out.loss_nonfinite and not out.applied
    # the two finite micro-batches are still averaged; the update was skipped
    assert math.isfinite(out.loss)
    assert all(torch.equal(a, p) for a, p in zip(before, bench.engine.module.parameters()))


@pytest.mark.parametrize("kernel", ["foreach", "fused"])
def test_adamw_kernels_match_the_default(kernel):
    from train_driver import base_config

    from pretrain.models import create_model
    from pretrain.train.optim import build_optimizer

    def run(k: str):
        cfg = base_config(["--model.name=ViT-tiny", f"--optimizer.kernel={k}"])
        torch.manual_seed(0)
        model = create_model(cfg.model.name, **cfg.model.overrides)
        opt = build_optimizer(model, cfg, cpu_adam=False, guard=False)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            opt.zero_grad()
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return opt, [p.detach() for p in model.parameters()]

    opt_default, ref = run("default")
    opt_k, got = run(kernel)
    assert opt_k.defaults[kernel] is True and not opt_default.defaults.get(kernel)
    assert [g["weight_decay"] for g in opt_k.param_groups] == [g["weight_decay"] for g in opt_default.param_groups]
    assert max((a - b).abs().max().item() for a, b in zip(ref, got)) < 1e-6


def test_unknown_kernel_is_rejected():
    from train_driver import base_config

    with pytest.raises(Exception, match="optimizer.kernel"):
        base_config(["--optimizer.kernel=turbo"])
