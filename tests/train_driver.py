"""Test helpers for the trainer: tiny run configs, the real `deepspeed` launcher, run-dir readers.

    from train_driver import launch, tiny_overrides, caption_data
    data = caption_data(tmp_path)                         # real Fashion-MNIST caption shards
    run = launch(tmp_path / "run", tiny_overrides(data, steps=8), nprocs=2)
    assert run.rc == 0, run.output

`launch` starts N ranks of `pretrain/run.py --key=value ...` under the tests' node launcher
(tests/env_launcher.py: the env:// layout DeepSpeed's node launcher gives its ranks, from a
process that does not import DeepSpeed; on CPU N gloo ranks), and waits; `start` returns the
Popen for tests that signal the ranks mid-run (`rank_pids`).

Launchers. `launcher="cli"` runs the README's command, `deepspeed --num_gpus N pretrain/run.py`:
DeepSpeed's runner, which on one node execs DeepSpeed's node launcher, which sets the same
variables and starts the same rank processes. Runner and node launcher each import DeepSpeed,
torch and (through DeepSpeed's autotuner) MLflow, ~4 CPU-seconds each before any rank starts;
so the CLI is used by the tests that are about it (preemption of a `deepspeed` job's process
group, the resume run, one training launch) and the light launcher by the rest.
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from dist_harness import free_port  # noqa: E402
from shard_factory import make_caption_shards  # noqa: E402
from watched import dump_stacks, kill_tree  # noqa: E402


@dataclass
class CaptionData:
    train_manifest: Path
    val_pattern: str
    corrupted: list[str]


def caption_data(root: Path, corrupt: bool = True) -> CaptionData:
    """Training shards (4 x 48 Fashion-MNIST images with class captions; with `corrupt`, shard
    2 truncated mid-member and one corrupt JPEG in each shard) and a 64-image validation
    shard from the test split."""
    train = make_caption_shards(root / "train", n_shards=4, per_shard=48, image_px=32,
                                corrupt={"jpeg": [5, 60, 110, 170], "truncate": [2]} if corrupt else None)
    val = make_caption_shards(root / "val", n_shards=1, per_shard=64, image_px=32, split="test", key_prefix="v")
    return CaptionData(train.manifest, val.pattern, train.corrupted_keys)


def tiny_overrides(data: CaptionData, *, model: str = "RN-tiny", stage: int = 1, precision: str = "fp32",
                   steps: int = 12, global_batch: int = 16, micro_batch: int = 4, lr: float = 2e-3,
                   workers: int = 0, extra: list[str] | None = None) -> list[str]:
    """Command-line overrides of a small, learnable CPU run (no config file needed). No DataLoader
    workers unless asked for: a rank's worker fork server imports torch and the data modules
    (~2.5 s of a 10 s launch here); the tests about workers (exact resume, preemption) ask."""
    return [
        f"--model.name={model}", "--model.overrides.image_size=32", "--model.grad_checkpointing=true",
        f"--data.sources={data.train_manifest}",
        f"--data.samples_per_epoch={global_batch * steps}", f"--data.workers={workers}", "--data.shuffle_buffer=48",
        f"--train.global_batch={global_batch}", f"--train.micro_batch={micro_batch}", "--train.epochs=1",
        f"--train.zero_stage={stage}", f"--train.precision={precision}", f"--optimizer.lr={lr}",
        "--schedule.warmup_steps=2", "--logging.every_steps=1", "--logging.console=every", "--checkpoint.every_steps=0",
        # the final MLflow model (a reload of the run and an upload) and the training figure
        # (matplotlib, ~1 CPU-s) only where a test is about them
        "--logging.log_model=false", "--logging.figure=false",
        *(extra or []),
    ]


def cpu_adam_available() -> bool:
    """DeepSpeedCPUAdam's op is already built (or CLIP_TEST_CPU_ADAM=1 allows the ~93 s build)."""
    if os.environ.get("CLIP_TEST_CPU_ADAM") == "1":
        return True
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    return any(root.glob("**/cpu_adam/cpu_adam*.so"))


def unsupported_precision(overrides: list[str]) -> str | None:
    """Why a case whose `--train.precision=` this device lacks cannot run here (None: it can).

    The device's own answer (DeepSpeed's accelerator via pretrain.train.precision): fp16 on a
    CPU runs only where oneDNN has fp16 kernels, so such cases skip elsewhere, with the reason."""
    from pretrain.train.precision import device_description, supported_precisions

    precision = next((o.split("=", 1)[1] for o in overrides if o.startswith("--train.precision=")), "fp32")
    if precision in supported_precisions():
        return None
    return f"train.precision={precision} is not supported on this device ({device_description()})"


def base_config(extra: list[str] | None = None):
    """A RunConfig for in-process tests (data paths are never opened)."""
    from pretrain.config import load_config

    return load_config(None, ["--output_dir=/nonexistent", "--data.sources=/nonexistent/{0..1}.tar",
                              "--data.samples_per_epoch=64", *(extra or [])])


@dataclass
class Launch:
    rc: int
    output: str
    run_dir: Path
    seconds: float
    leaked_shm: list[str] = field(default_factory=list)  # /dev/shm workspaces left behind


LAUNCHERS = ("env", "cli")


def _command(run_dir: Path, overrides: list[str], nprocs: int, launcher: str) -> list[str]:
    script = [str(REPO / "pretrain" / "run.py"), f"--output_dir={run_dir}", *overrides]
    port = str(free_port())
    if launcher == "cli":
        return [str(REPO / ".venv" / "bin" / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", port, *script]
    if launcher != "env":
        raise ValueError(f"launcher must be one of {LAUNCHERS}, not {launcher!r}")
    return [str(REPO / ".venv" / "bin" / "python"), "-u", str(REPO / "tests" / "env_launcher.py"),
            f"--nprocs={nprocs}", f"--master_port={port}", *script]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               NO_ALBUMENTATIONS_UPDATE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def start(run_dir: Path, overrides: list[str], nprocs: int = 2, launcher: str = "env") -> subprocess.Popen:
    """Start the launcher in its own process group; output is merged into stdout (text)."""
    return subprocess.Popen(_command(run_dir, overrides, nprocs, launcher), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, run_dir: Path, started: float, timeout: float, output: str = "") -> Launch:
    """Read the rest of the output (through the same buffered reader that `read_until`-style
    callers used, so nothing read ahead is lost) and wait; kill the job on timeout."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.read()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        stacks = dump_stacks(proc.pid)  # where each process of the job was (tests/watched.py)
        kill_tree(proc)
        reader.join(30)
        raise AssertionError(f"launch timed out after {timeout} s; stacks:\n{stacks}\n--- output tail ---\n"
                             f"{(output + ''.join(box))[-6000:]}")
    proc.wait()
    return Launch(proc.returncode, output + "".join(box), run_dir, time.monotonic() - started)


def shm_workspaces() -> set[str]:
    """DeepSpeed CPU all-reduce workspaces in /dev/shm (see pretrain/train/distributed.py)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


def launch(run_dir: Path, overrides: list[str], nprocs: int = 2, timeout: float = 300,
           launcher: str = "env") -> Launch:
    started = time.monotonic()
    before = shm_workspaces()
    result = finish(start(run_dir, overrides, nprocs, launcher), run_dir, started, timeout)
    result.leaked_shm = sorted(shm_workspaces() - before)
    return result


def rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """{local rank: pid} of the training processes under a launcher (not their DataLoader
    workers or the fork server that starts them)."""
    out = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd, parent_cmd = child.cmdline(), child.parent().cmdline()
        except (psutil.Error, AttributeError):
            continue
        is_rank = any(c.endswith("run.py") for c in cmd) and any(c.startswith("--local_rank=") for c in cmd)
        if not is_rank or any(c.startswith("--local_rank=") for c in parent_cmd):
            continue
        for arg in cmd:
            if arg.startswith("--local_rank="):
                out[int(arg.split("=", 1)[1])] = child.pid
    return out


def metrics(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: record} (a re-run step after a resume: its last record)."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rows[rec["step"]] = rec
    return rows


def checkpoint_params(run_dir: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    from pretrain.modelio import consolidated_state_dict

    return consolidated_state_dict(run_dir, tag)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> float:
    keys = keys if keys is not None else a.keys()
    assert set(keys) <= set(b), sorted(set(keys) - set(b))[:5]
    return max(float((a[k].detach().float() - b[k].detach().float()).abs().max()) for k in keys)


def read_until(proc, pattern: str, timeout: float = 240) -> tuple[str, re.Match]:
    """Consume the launcher's output until a line matches `pattern`; return (text, match)."""
    text, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"launcher ended before {pattern!r}:\n{text[-4000:]}")
        text += line
        m = re.search(pattern, line)
        if m:
            return text, m
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n{text[-4000:]}")
