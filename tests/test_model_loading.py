"""The one model loader (pretrain.modelio): weights-only everywhere, TorchScript only by opt-in.

- Real ZeRO-0/1/2/3 saves (bf16, one gloo rank, ViT-tiny at 32 px) consolidate to exactly the
  live model's parameters.
- A poisoned run dir (a pickle whose `__reduce__` runs `os.system("touch MARKER")`) loaded by
  eval (API and CLI), export, model.init_from and the CLIP-score filter gives a clear error
  and the marker file is never created; the same file with `weights_only=False` (the old
  loaders) does create it, so the poison is live.
- Resume (DeepSpeed's engine.load_checkpoint + the RNG file) refuses poisoned files too.
- A TorchScript archive is refused without the flag and loads, equal, with it.

    pytest -q tests/test_model_loading.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain import models
from pretrain.modelio import (TorchScriptRefused, UnsafeCheckpointError, consolidated_state_dict, load_model,
                              load_state_dict_file)

REPO = Path(__file__).resolve().parents[1]

_SAVE = r"""
import os, sys, random, yaml, torch, deepspeed
from pretrain.models import create_model
from pretrain.train import checkpoint
stage, run_dir = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = create_model("ViT-tiny", image_size=32)
deepspeed.init_distributed(dist_backend="gloo")
cfg = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
       "bf16": {"enabled": True}}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
with open(f"{run_dir}/run_config.yaml", "w") as f:
    yaml.safe_dump({"model": {"name": "ViT-tiny", "overrides": {"image_size": 32}}}, f)
checkpoint.save(engine, run_dir, step=1, client_state={"step": 1}, keep_last=1)
if stage == 3:
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters
    with GatheredParameters(list(engine.module.parameters())):
        sd = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
else:
    sd = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
torch.save(sd, f"{run_dir}/live.pt")
if stage == 2:  # resume reads DeepSpeed's files and the RNG file weights-only
    expected = torch.rand(3)
    torch.manual_seed(123); random.seed(5)
    state = checkpoint.resume(engine, run_dir)
    assert state["step"] == 1 and state["tag"] == "step_00000001", state
    rng_file = f"{run_dir}/checkpoints/step_00000001/rng_rank00000.pt"
    saved = torch.load(rng_file, weights_only=False)["torch"]
    assert torch.equal(torch.get_rng_state(), saved)
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[3])))
    from test_model_loading import Poison
    from pretrain.modelio import UnsafeCheckpointError
    marker = sys.argv[4]
    for name in ("rng_rank00000.pt", "mp_rank_00_model_states.pt"):
        path = f"{run_dir}/checkpoints/step_00000001/{name}"
        good = open(path, "rb").read()
        torch.save({"python": Poison(marker), "module": Poison(marker)}, path)
        import json; rec_path = f"{run_dir}/checkpoints/step_00000001/COMPLETE"
        rec = json.load(open(rec_path)); rec["files"][name] = os.path.getsize(path); json.dump(rec, open(rec_path, "w"))
        try:
            checkpoint.resume(engine, run_dir)
        except UnsafeCheckpointError as e:
            print("REFUSED", name, e)
        else:
            raise SystemExit(f"resume accepted a poisoned {name}")
        assert not os.path.exists(marker), name
        open(path, "wb").write(good); rec["files"][name] = len(good); json.dump(rec, open(rec_path, "w"))
torch.distributed.barrier(); torch.distributed.destroy_process_group()
"""


class Poison:
    """Unpickling this runs `touch <marker>` (what a hostile checkpoint would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def saves(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("zero")
    procs = {}
    for stage in range(4):
        run = root / f"z{stage}"
        run.mkdir()
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                   LOCAL_RANK="0", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        procs[stage] = (run, subprocess.Popen(
            [sys.executable, "-c", _SAVE, str(stage), str(run), __file__, str(root / f"pwned{stage}")],
            env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out = {}
    for stage, (run, p) in procs.items():
        log, _ = p.communicate(timeout=240)
        assert p.returncode == 0, log[-3000:]
        if stage == 2:
            assert log.count("REFUSED") == 2, log[-3000:]
        out[stage] = run
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_consolidated_weights_equal_the_live_model(saves, stage):
    sd = consolidated_state_dict(saves[stage])
    live = torch.load(saves[stage] / "live.pt", weights_only=True)
    assert sd.keys() == live.keys()
    assert all(sd[k].dtype == torch.float32 and torch.equal(sd[k], live[k]) for k in sd)
    model = load_model(saves[stage])
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())


def _poisoned_run_dir(tmp_path: Path, marker: Path, base: Path | None = None, stage: int = 0) -> Path:
    """A run dir that passes every completeness check but whose model file runs code."""
    import shutil

    run = tmp_path / f"poisoned{stage}"
    tag_dir = run / "checkpoints" / "step_00000001"
    if base is not None:
        shutil.copytree(base, run)
        name = next(p.name for p in tag_dir.iterdir() if p.name.endswith("optim_states.pt")) if stage else \
            "mp_rank_00_model_states.pt"
    else:
        tag_dir.mkdir(parents=True)
        (run / "run_config.yaml").write_text("model: {name: ViT-tiny, overrides: {image_size: 32}}\n")
        name = "mp_rank_00_model_states.pt"
    torch.save({"module": Poison(str(marker)), "optimizer_state_dict": Poison(str(marker))}, tag_dir / name)
    files = {p.name: p.stat().st_size for p in tag_dir.iterdir() if p.name != "COMPLETE"}
    (tag_dir / "COMPLETE").write_text(json.dumps({"step": 1, "zero_stage": stage, "world_size": 1, "files": files}))
    return run


def test_the_poison_is_live_with_weights_only_false(tmp_path):
    marker = tmp_path / "pwned"
    run = _poisoned_run_dir(tmp_path, marker)
    torch.load(run / "checkpoints/step_00000001/mp_rank_00_model_states.pt", weights_only=False)
    assert marker.exists()  # what the old loaders did


def _entry_points(run: Path, tmp_path: Path):
    from data_pipeline.filter.clip_score import load_checkpoint_model
    from pretrain.eval.checkpoints import load_checkpoint
    from pretrain.eval.cli import main as eval_main
    from pretrain.export import export
    from pretrain.train.init_from import init_model_from

    yield "eval", lambda: load_checkpoint(run)
    yield "export", lambda: export(run, tmp_path / "out.pt")
    yield "init_from", lambda: init_model_from(models.create_model("ViT-tiny", image_size=32), run)
    yield "clip_score", lambda: load_checkpoint_model(str(run))
    yield "eval-cli", lambda: eval_main(["zeroshot", "--checkpoint", str(run), "--dataset", "packaged:digits"])


def test_poisoned_run_dir_is_refused_by_every_entry_point(tmp_path):
    marker = tmp_path / "pwned"
    run = _poisoned_run_dir(tmp_path, marker)
    for name, call in _entry_points(run, tmp_path):
        if name == "eval-cli":
            assert call() == 2
        else:
            with pytest.raises(UnsafeCheckpointError, match="could run code"):
                call()
        assert not marker.exists(), f"{name} ran the checkpoint's code"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_poisoned_zero_shards_are_refused(saves, tmp_path, stage):
    """DeepSpeed's zero_to_fp32 (which asks for weights_only=False) is forced weights-only."""
    marker = tmp_path / "pwned"
    run = _poisoned_run_dir(tmp_path, marker, base=saves[stage], stage=stage)
    for name, call in _entry_points(run, tmp_path):
        if name == "eval-cli":
            assert call() == 2
        else:
            with pytest.raises(UnsafeCheckpointError):
                call()
        assert not marker.exists(), f"{name} ran the checkpoint's code"
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # restored after the refusal


def test_poisoned_state_dict_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Poison(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict_file(path)
    assert not marker.exists()


def _torchscript_file(path: Path) -> dict[str, torch.Tensor]:
    """An OpenAI-layout TorchScript archive (as OpenAI's released .pt files are)."""
    torch.manual_seed(0)
    sd = models.to_openai_state_dict(models.create_model("ViT-tiny", image_size=32))
    root = nn.Module()
    for k, v in sd.items():
        *parents, leaf = k.split(".")
        node = root
        for p in parents:
            if not hasattr(node, p):
                node.add_module(p, nn.Module())
            node = getattr(node, p)
        node.register_buffer(leaf, v.clone())
    torch.jit.save(torch.jit.script(root), str(path))
    return sd


def test_torchscript_needs_the_flag_at_every_entry_point(tmp_path):
    from data_pipeline.filter.clip_score import load_checkpoint_model
    from pretrain.eval.checkpoints import load_checkpoint
    from pretrain.eval.cli import main as eval_main
    from pretrain.train.init_from import init_model_from

    path = tmp_path / "ViT-tiny.pt"
    sd = _torchscript_file(path)
    with pytest.raises(TorchScriptRefused, match="--allow-torchscript-code"):
        load_checkpoint(path)
    with pytest.raises(TorchScriptRefused, match="init_from_allow_torchscript_code"):
        init_model_from(models.create_model("ViT-tiny", image_size=32), path)
    with pytest.raises(TorchScriptRefused, match="clip_score.allow_torchscript_code"):
        load_checkpoint_model(str(path))
    assert eval_main(["zeroshot", "--checkpoint", str(path), "--dataset", "packaged:digits"]) == 2

    model, _ = load_checkpoint(path, allow_torchscript=True)
    assert all(torch.equal(v, sd[k]) for k, v in models.to_openai_state_dict(model).items())
    target = models.create_model("ViT-tiny", image_size=32)
    init_model_from(target, path, allow_torchscript=True)
    assert all(torch.equal(v, sd[k]) for k, v in models.to_openai_state_dict(target).items())
    assert load_checkpoint_model(str(path), allow_torchscript=True).image_size == 32


def test_wrapped_and_prefixed_state_dicts_load(tmp_path):
    torch.manual_seed(0)
    sd = models.to_openai_state_dict(models.create_model("ViT-tiny", image_size=32))
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "w.pt")
    model = load_model(tmp_path / "w.pt")
    assert all(torch.equal(v, sd[k]) for k, v in models.to_openai_state_dict(model).items())
