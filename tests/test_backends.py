"""The CUDA library settings of a run (pretrain/train/backends.py) follow the run config on
a CUDA device and leave a CPU process untouched. The flags are process-global settings that
can be set and read without a GPU; what they do to kernels is CUDA's."""
from __future__ import annotations

import pytest
import torch

from pretrain.config import load_config
from pretrain.train.backends import configure_backends


def flags() -> tuple[bool, str, bool]:
    return (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(),
            torch.backends.cuda.matmul.allow_tf32)  # the legacy flag stays readable


@pytest.fixture
def restore_flags():
    saved = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    yield
    torch.backends.cudnn.benchmark = saved[0]
    torch.set_float32_matmul_precision(saved[1])


def train_cfg(*overrides: str):
    return load_config(None, ["--output_dir=/tmp/unused", "--data.sources=x.tar", "--data.samples_per_epoch=64",
                              *overrides]).train


def test_cuda_defaults_benchmark_on_and_exact_fp32(restore_flags):
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("high")
    applied = configure_backends(train_cfg(), torch.device("cuda", 0))
    assert applied == {"cudnn_benchmark": True, "float32_matmul_precision": "highest"}
    assert flags() == (True, "highest", False)


def test_cuda_settings_follow_the_run_config(restore_flags):
    applied = configure_backends(train_cfg("--train.cudnn_benchmark=false", "--train.tf32=true"), torch.device("cuda"))
    assert applied == {"cudnn_benchmark": False, "float32_matmul_precision": "high"}
    assert flags() == (False, "high", True)


def test_cpu_changes_nothing(restore_flags):
    before = flags()
    assert configure_backends(train_cfg("--train.tf32=true", "--train.cudnn_benchmark=true"), torch.device("cpu")) == {}
    assert flags() == before
