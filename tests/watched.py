"""Run a multi-process command from a test so that a hang is diagnosed, not just timed out.

``run_watched`` starts the command in its own session with its output in a log file. If it
outlives ``timeout`` seconds, the Python (and native) stacks of every process in the tree
are dumped with ``py-spy`` before the tree is killed, and the failure message carries the
stacks and the log's tail: a hang seen once on a CI machine can then be read, not guessed.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass
class Finished:
    returncode: int
    output: str  # stdout and stderr interleaved, as a terminal would show them


def _py_spy() -> str | None:
    cand = Path(sys.executable).parent / "py-spy"
    return str(cand) if cand.exists() else shutil.which("py-spy")


def dump_stacks(root_pid: int) -> str:
    """Every process of the tree under ``root_pid``: its command line and its stacks."""
    try:
        procs = [psutil.Process(root_pid)] + psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return "(process tree already gone)"
    spy = _py_spy()
    parts = []
    for p in procs:
        try:
            head = f"=== pid {p.pid} ({p.status()}): {' '.join(p.cmdline())[:300]}"
        except psutil.Error:
            continue
        if spy is None:
            parts.append(head + "\n(py-spy not installed: no stacks)")
            continue
        r = subprocess.run([spy, "dump", "--native", "--pid", str(p.pid)], capture_output=True, text=True,
                           timeout=60)
        parts.append(head + "\n" + (r.stdout + r.stderr).strip())
    return "\n".join(parts)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with `start_new_session=True`, its process group and every
    descendant; return once all of them are gone."""
    try:
        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:  # it has just ended
        tree = [proc.pid]
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in tree:  # a child that made its own session escapes killpg
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    _wait_gone(tree, timeout=30)


def _wait_gone(pids: list[int], timeout: float) -> None:
    """Wait until every killed process is gone (or a zombie awaiting its new parent's reaping).

    SIGKILL is only acted on when the process next runs, so on a loaded machine a grandchild
    can still read as running just after the kill."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)


def run_watched(cmd: list[str], *, log: Path, timeout: float, env: dict | None = None,
                cwd: str | Path | None = None) -> Finished:
    """Run ``cmd`` to completion; on a timeout raise AssertionError with every process's stacks."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        if proc.poll() is None:
            stacks = dump_stacks(proc.pid)
            kill_tree(proc)
            tail = log.read_text(errors="replace")[-6000:]
            raise AssertionError(f"{cmd[:4]} still running after {timeout:.0f} s; stacks:\n{stacks}\n"
                                 f"--- output tail ---\n{tail}")
    return Finished(proc.returncode, log.read_text(errors="replace"))
