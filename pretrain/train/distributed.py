"""Process setup and teardown for every launcher: `deepspeed`, `torchrun`, one `srun` task
per device, or a plain single process.

- rank / local rank / world size come from RANK/LOCAL_RANK/WORLD_SIZE (deepspeed, torchrun)
  or SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS (srun; MASTER_ADDR/MASTER_PORT must be set
  by the job script); with neither, a single process on a free local port;
- NCCL on CUDA, gloo on CPU, chosen at run time;
- DeepSpeed's CPU shared-memory all-reduce workspace is unlinked as soon as every rank has
  mapped it (`release_shm_workspace`): DeepSpeed itself never removes it, so every launch
  would leave 66 MB per rank in /dev/shm (RAM) until reboot;
- `finish(code)` ends a worker with barrier + destroy_process_group + an immediate
  `os._exit`: letting the interpreter tear down a live gloo group aborts the process now and
  then ("terminate called without an active exception", docs/cpu_development.md), which the launcher
  reports as a failed rank.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import random
import re
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from pretrain.progress import verbose

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # "env" (deepspeed/torchrun), "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host now (for a single-node rendezvous), chosen at random below
    the kernel's ephemeral range: a port from bind(("", 0)) lies in that range, where any
    outgoing connection on the host (an HTTP client, a gloo peer) can take it before the
    rendezvous binds it (EADDRINUSE; seen with three test workers on two cores)."""
    low = _ephemeral_low()
    pick = random.SystemRandom()  # not the seeded module RNG: every caller would pick alike
    for _ in range(64):
        port = pick.randrange(max(1024, low - 16384), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; IANA's 49152 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def detect_env(local_rank_arg: int | None = None) -> DistEnv:
    """Read the launch layout from the environment and export the env:// variables
    (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) that init_distributed reads."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        local = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
        out = DistEnv(int(env["RANK"]), local, int(env["WORLD_SIZE"]), "env")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise RuntimeError(f"srun launch: {missing} not set; export MASTER_ADDR (first host of "
                               "`scontrol show hostnames $SLURM_JOB_NODELIST`) and a MASTER_PORT in the job script")
        out = DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), "slurm")
    else:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
        out = DistEnv(0, 0, 1, "single")
    env.update(RANK=str(out.rank), LOCAL_RANK=str(out.local_rank), WORLD_SIZE=str(out.world_size))
    return out


# torch 2.13 deprecates the collectives DeepSpeed's ZeRO calls on every step (one
# FutureWarning per call); only these messages are silenced, other warnings still show.
_DEPRECATED_COLLECTIVES = ("all_gather_into_tensor", "_all_gather_base", "reduce_scatter_tensor",
                           "_reduce_scatter_base")


def silence_collective_deprecations() -> None:
    for name in _DEPRECATED_COLLECTIVES:
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=rf"`torch\.distributed\.{re.escape(name)}` is ")


def setup_logging(rank: int) -> None:
    """This project's loggers: INFO on rank 0, WARNING elsewhere; other libraries WARNING
    (MLflow too, which installs its own INFO handler at import, unless `MLFLOW_LOGGING_LEVEL`
    or `CLIP_VERBOSE` says otherwise); torch's deprecation warnings for DeepSpeed's per-step
    collectives silenced."""
    silence_collective_deprecations()
    if not verbose():
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, force=True,
                        format=f"[%(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pretrain").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def init(env: DistEnv, timeout_s: int) -> torch.device:
    """Start the process group (NCCL on CUDA, gloo otherwise); return this rank's device."""
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        backend, device = "nccl", torch.device("cuda", env.local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    # DeepSpeed prints "... shm_comm_op built successfully" from every rank: only with CLIP_VERBOSE
    with contextlib.nullcontext() if verbose() else contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
        raise RuntimeError(f"process group has rank {dist.get_rank()}/{dist.get_world_size()}, "
                           f"launch env says {env.rank}/{env.world_size}")
    release_shm_workspace()
    log.info("process group: %s, world size %d, device %s (launcher: %s)", backend, env.world_size, device,
             env.launcher)
    return device


SHM_DIR = "/dev/shm"


def shm_workspace_name(rank: int) -> str:
    """The name DeepSpeed's CPU shm all-reduce gives rank `rank`'s workspace at
    `init_distributed` (deepspeed/ops/csrc/cpu/comm/shm.cpp: buffer, uid, MASTER_ADDR,
    MASTER_PORT, rank)."""
    return (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_workspace() -> bool:
    """Unlink this rank's shm all-reduce workspace name once every rank has mapped every
    workspace (the barrier: DeepSpeed maps all of them inside `init_distributed`). The
    mappings stay valid until the processes exit, and then the memory is freed even after a
    crash or a SIGKILL; left alone, DeepSpeed never unlinks it. True if a name was removed
    (False on GPU or multi-node runs, which do not use it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    try:
        os.remove(os.path.join(SHM_DIR, shm_workspace_name(dist.get_rank())))
    except FileNotFoundError:
        return False
    return True


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """`obj` of rank `src` on every rank (no-op outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def finish(code: int, *, synchronize: bool = True) -> NoReturn:
    """End this worker now. `synchronize=False` skips the barrier (use it when the other
    ranks may not reach it, e.g. after an unexpected exception on this rank only)."""
    try:
        if synchronize and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
