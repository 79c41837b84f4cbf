"""A run config asking for a precision the device lacks stops at start with a clear message.

`pretrain/run.py` asks DeepSpeed's accelerator (pretrain.train.precision) before building
anything. The launch test forces the answer "no fp16" inside the trainer process, so it
runs on any machine; where the CPU really lacks fp16 the unforced launch is checked too.

Run: `.venv/bin/python -m pytest -q tests/test_precision_support.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# run.py's main() with the device's answer replaced by "fp32 and bf16 only"
FORCED = ("import sys; import pretrain.train.precision as p; "
          "p.supported_precisions = lambda: ('fp32', 'bf16'); "
          "from pretrain.run import main; main(sys.argv[1:])")
ARGS = ["--output_dir={out}", "--data.sources=/nonexistent/{{0..1}}.tar", "--model.name=ViT-tiny",
        "--train.precision=fp16", "--train.zero_stage=1", "--train.global_batch=2", "--train.micro_batch=2",
        "--data.samples_per_epoch=2", "--logging.mlflow=false"]


def _launch(code: list[str], out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    return subprocess.run([sys.executable, *code, *[a.format(out=out) for a in ARGS]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _assert_refused(proc: subprocess.CompletedProcess, out: Path) -> None:
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2, log[-3000:]
    assert "train.precision=fp16 is not supported on this device: cpu" in log, log[-3000:]
    assert "Precisions this device supports: fp32, bf16" in log and "--train.precision=bf16" in log
    assert "Type fp16 is not supported on your device" not in log  # DeepSpeed's per-rank error
    assert not out.exists()  # refused before the run dir, the process group or the engine


@pytest.mark.slow
def test_unsupported_precision_is_refused_at_start(tmp_path: Path) -> None:
    _assert_refused(_launch(["-c", FORCED], tmp_path / "run"), tmp_path / "run")


@pytest.mark.slow
def test_this_devices_own_answer(tmp_path: Path) -> None:
    from pretrain.train.precision import supported_precisions

    if "fp16" in supported_precisions():
        pytest.skip("this device supports fp16: the forced case above covers the refusal")
    _assert_refused(_launch([str(REPO / "pretrain" / "run.py")], tmp_path / "run"), tmp_path / "run")


def test_supported_precisions_follow_the_accelerator() -> None:
    from deepspeed.accelerator import get_accelerator

    from pretrain.train.precision import supported_precisions

    acc = get_accelerator()
    got = supported_precisions()
    assert got[0] == "fp32"
    assert ("fp16" in got) == bool(acc.is_fp16_supported())
    assert ("bf16" in got) == bool(acc.is_bf16_supported())
    if acc.device_name() == "cpu":
        import torch

        assert ("fp16" in got) == bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
