"""Shared helpers of the side-by-side benchmarks against open_clip (bench_vs_openclip_*.py,
gpu_bench.py): peak memory (CUDA allocator or the process's peak resident set), isolated
child processes, the machine line printed above every table, and markdown tables.

Not a benchmark itself; the scripts import it as `from _common import ...` (they put their
own directory on sys.path), so it works from a checkout without installing anything.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def require_open_clip() -> Any:
    """Import open_clip or exit with the command that creates the benchmark virtualenv."""
    try:
        import open_clip  # noqa: PLC0415 - only the benchmark venv has it
    except ImportError:
        sys.exit("open_clip is not importable: run these benchmarks with the benchmark virtualenv "
                 "(scripts/setup_bench_venv.sh, then .venv-bench/bin/python benchmarks/...)")
    return open_clip


# --- peak memory -----------------------------------------------------------------------
# CPU: torch's allocator is malloc; large tensors are mmap'd and returned to the OS when
# freed, so the kernel's peak resident set (VmHWM) is the true high-water mark of the
# tensors touched. VmHWM can be reset to the current RSS (Linux >= 4.0), so a child process
# measures exactly the window we care about. tracemalloc does not see torch's allocations.

def rss_bytes(field: str = "VmRSS") -> int:
    """VmRSS / VmHWM of this process from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Set VmHWM back to the current VmRSS (write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


class PeakMemory:
    """Peak bytes above a baseline taken at construction: CUDA allocator or process RSS.

        mem = PeakMemory(device)      # baseline now (before the inputs are made)
        ... make inputs ...
        mem.reset_peak()              # creation temporaries do not count
        ... work ...
        mem.peak()                    # peak - baseline, inputs included
    """

    def __init__(self, device: Any) -> None:
        import torch  # noqa: PLC0415

        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss_bytes("VmRSS")

    def reset_peak(self) -> None:
        import torch  # noqa: PLC0415

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()

    def peak(self) -> int:
        import torch  # noqa: PLC0415

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return rss_bytes("VmHWM") - self.base


def run_child(cmd: Sequence[str], timeout: float | None = None, env: dict[str, str] | None = None) -> dict:
    """Run a benchmark child process; its last stdout line is a JSON object (returned).
    A failing child raises with its stderr tail, never a silent zero."""
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"child {' '.join(cmd[:6])} ... failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


# --- reporting -----------------------------------------------------------------------

def machine_line(device: str = "cpu") -> str:
    """Date, device, load average and library versions: printed above every table."""
    import torch  # noqa: PLC0415

    if device.startswith("cuda"):
        dev = torch.cuda.get_device_name(0)
    else:
        dev = f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), load avg " \
              + " ".join(f"{x:.1f}" for x in os.getloadavg())
    parts = [f"date {_dt.datetime.now().isoformat(timespec='minutes')}", f"device {dev}",
             f"torch {torch.__version__}", f"{torch.get_num_threads()} threads"]
    try:
        import open_clip  # noqa: PLC0415

        parts.append(f"open_clip {open_clip.__version__}")
    except ImportError:
        pass
    return "# " + ", ".join(parts)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (pasted as is into benchmarks/RESULTS.md)."""
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)

