"""Build DeepSpeed's JIT C++ ops ahead of a launch, once, in one process.

    python -m pretrain.train.ds_ops            # the ops a run on this machine's accelerator uses
    python -m pretrain.train.ds_ops --list     # what would be built, and whether it is cached

DeepSpeed compiles some ops the first time a process needs them (on CPU: the shared-memory
all-reduce at `init_distributed`, DeepSpeedCPUAdam for an offloaded optimizer) into
`TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`). Left to the launch, every rank
of every node races for the same file lock while the job's clock runs, and a rank killed
mid-build leaves a lock that makes the next launch wait forever. Building here first (in
set-up, or once per node image before `sbatch`) makes a launch only load them.

The cache is keyed by the build command, which names the virtualenv's path: two checkouts
sharing one cache rebuild each other's ops. `make` therefore points TORCH_EXTENSIONS_DIR into
the checkout's own `.venv`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# The ops a CPU run needs; a CUDA run's fused Adam ships with torch (no build).
CPU_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def extensions_dir() -> Path:
    """Where torch's JIT builds go (torch.utils.cpp_extension's default when unset)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("x", verbose=False)).parent


def remove_stale_locks(root: Path) -> list[Path]:
    """Delete build locks left by killed builds. Only safe when nothing else is building
    into `root` (set-up runs before any test or launch)."""
    # <root>/<op>/lock when TORCH_EXTENSIONS_DIR is set, <root>/py311_cpu/<op>/lock otherwise
    stale = sorted(p for p in root.rglob("lock") if p.is_file())
    for lock in stale:
        lock.unlink(missing_ok=True)
    return stale


def build(names: tuple[str, ...] = CPU_OPS) -> dict[str, float]:
    """Load (building where needed) each compatible op; returns seconds per op."""
    from deepspeed.accelerator import get_accelerator

    seconds = {}
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            continue
        t0 = time.perf_counter()
        builder.load(verbose=False)
        seconds[builder.name] = time.perf_counter() - t0
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the cache directory and exit")
    ap.add_argument("--clear-locks", action="store_true",
                    help="first delete lock files of killed builds (nothing else may be building)")
    args = ap.parse_args(argv)
    root = extensions_dir()
    if args.list:
        print(f"TORCH_EXTENSIONS_DIR={root}")
        for so in sorted(root.rglob("*.so")):
            print(f"  {so.relative_to(root)}")
        return 0
    if args.clear_locks:
        for lock in remove_stale_locks(root):
            print(f"[ds_ops] removed stale lock {lock}", file=sys.stderr)
    for name, secs in build().items():
        print(f"[ds_ops] {name}: ready in {secs:.1f} s ({root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
