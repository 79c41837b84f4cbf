"""The hang diagnosis of multi-process tests (tests/watched.py) works: a command that outlives
its timeout is killed with its children, and the failure shows where each process was."""
from __future__ import annotations

import sys

import psutil
import pytest

from watched import run_watched

HANG = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("child", child.pid, flush=True)
def waiting_for_ever():
    time.sleep(120)
waiting_for_ever()
"""


@pytest.mark.timeout(120)
def test_hang_is_killed_and_its_stacks_reported(tmp_path):
    with pytest.raises(AssertionError) as err:
        run_watched([sys.executable, "-c", HANG], log=tmp_path / "log", timeout=5)
    msg = str(err.value)
    assert "still running after 5 s" in msg
    tail = msg.split("--- output tail ---", 1)[1]  # what the command printed
    child = int(tail.split("child ", 1)[1].split()[0])
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    if "Permission denied" not in msg and "Operation not permitted" not in msg:  # py-spy may lack ptrace
        assert "waiting_for_ever" in msg  # the parent's Python stack, read by py-spy


def test_finished_command_returns_its_output(tmp_path):
    done = run_watched([sys.executable, "-c", "print('ok'); raise SystemExit(3)"], log=tmp_path / "log", timeout=60)
    assert done.returncode == 3 and done.output.strip() == "ok"
