"""The trainer step keeps its figures on the device, and the AdamW kernels agree.

- `train_step` reads nothing back to the host per micro-batch: during a step of 3
  micro-batches, the calls of Tensor.item / __bool__ / __float__ / __int__ / tolist made
  from the step's own code (pretrain/train/step.py, pretrain/engine_step.py) are counted by
  patching them, and there is exactly one (finish_step's single transfer); the old step
  made three per micro-batch. The step's reported figures equal a host-side recomputation.
- the trainer (`fit`, in-process, one rank) reads the buffered step figures back only every
  `logging.every_steps`: zero read-backs of the step's and loop's code in the other steps,
  one in a logging step; metrics.jsonl rows and the counters equal those of a run reading
  back every step (window losses = mean of the per-step losses); NaN losses injected with
  `train.debug_nan_at_steps` still stop the run with NonFiniteError after the limit.
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
LOOP_FILES = (*STEP_FILES, str(REPO / "pretrain" / "train" / "loop.py"))
READBACKS = ("item", "__bool__", "__float__", "__int__", "tolist")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from gpu_bench import build_bench

    spec = {"model": "ViT-tiny", "ckpt": False, "precision": "fp32", "micro_batch": 4, "global_batch": 12,
            "out_dir": str(tmp_path_factory.mktemp("run"))}
    return build_bench(spec)


def _count_readbacks(fn, files=STEP_FILES):
    counts: dict[str, int] = {}
    originals = {name: getattr(torch.Tensor, name) for name in READBACKS}

    def wrap(name):
        orig = originals[name]

        def patched(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller in files:
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


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from train_driver import caption_data

    return caption_data(tmp_path_factory.mktemp("data"))


def _fit(run_dir: Path, data, extra: list[str], per_step: list | None = None):
    """Train in this process (one rank); `per_step` collects (step, read-backs in that step)."""
    from train_driver import tiny_overrides

    from pretrain.config import load_config
    from pretrain.train import distributed, loop

    cfg = load_config(None, [f"--output_dir={run_dir}", *tiny_overrides(
        data, steps=8, extra=["--logging.mlflow=false", "--data.workers=0", *extra])])
    env = distributed.detect_env()
    device = distributed.init(env, 600)
    original = loop._Trainer._step

    def counted(self, batches):
        _, counts = _count_readbacks(lambda: original(self, batches), LOOP_FILES)
        per_step.append((self.state.step, sum(counts.values())))

    loop._Trainer._step = counted if per_step is not None else original
    try:
        return loop.fit(cfg, env, device)
    finally:
        loop._Trainer._step = original


def _rows(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


COUNTERS = ("skipped_samples", "nonfinite_steps", "overflow_steps", "lr", "logit_scale", "grad_norm", "epoch")


def test_loop_reads_back_only_on_logging_steps(tmp_path, data):
    nan = "--train.debug_nan_at_steps=[3]"  # one skipped step inside a window
    per_step: list = []
    assert _fit(tmp_path / "k4", data, ["--logging.every_steps=4", nan], per_step) == 0
    assert per_step == [(s, 1 if s % 4 == 0 else 0) for s in range(1, 9)], per_step
    assert _fit(tmp_path / "k1", data, ["--logging.every_steps=1", nan]) == 0
    every, window = _rows(tmp_path / "k1"), _rows(tmp_path / "k4")
    assert [r["step"] for r in window] == [4, 8]
    by_step = {r["step"]: r for r in every}
    assert by_step[8]["nonfinite_steps"] == 1 and by_step[8]["skipped_samples"] > 0  # the data has corrupt JPEGs
    for row in window:
        ref = by_step[row["step"]]
        for key in COUNTERS:
            assert row[key] == pytest.approx(ref[key], rel=1e-6), key
        losses = [by_step[s]["loss"] for s in range(row["step"] - 3, row["step"] + 1)]
        finite = [x for x in losses if math.isfinite(x)]
        assert row["loss"] == pytest.approx(sum(finite) / len(finite), rel=1e-5)


def test_consecutive_nan_steps_stop_at_the_next_readback(tmp_path, data):
    from pretrain.train.loop import NonFiniteError

    with pytest.raises(NonFiniteError, match="up to step 3 .*stopped at step 4"):
        _fit(tmp_path / "nan", data, ["--logging.every_steps=4", "--train.max_consecutive_nonfinite=2",
                                      "--train.debug_nan_at_steps=[2,3]"])
    from pretrain.modelio.tags import complete_tags, tag_for

    assert complete_tags(tmp_path / "nan")[-1] == tag_for(4)


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
