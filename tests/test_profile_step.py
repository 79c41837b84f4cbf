"""benchmarks/profile_step.py runs the trainer's real step under torch.profiler and reports
the host time of each labelled phase of `train_step` (checked here on CPU with --dry-run;
on a GPU it adds device time)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_dry_run_reports_every_phase_of_the_step(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_step.py"), "--dry-run", "--warmup", "1",
                          "--steps", "2", "--top", "5", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=280, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    wall = float(re.search(r"wall ([0-9.]+) ms/step", text).group(1))
    phases = dict(re.findall(r"^\| (step\.\w+) \| 1 \| ([0-9.]+) \|$", text, re.M))
    assert set(phases) == {"step.forward", "step.loss", "step.finite_check", "step.backward", "step.optimizer",
                           "step.stats"}, text
    # the phases are parts of the step: together they take no more than its wall time
    assert 0 < sum(float(v) for v in phases.values()) <= wall * 1.05
    assert len(re.findall(r"^\| aten::", text, re.M)) >= 3  # the top-operator table
    assert (tmp_path / "trace.json").stat().st_size > 0


def test_device_busy_time_is_the_union_of_intervals():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from profile_step import union_length

    assert union_length([]) == 0
    # overlapping (two streams), nested, touching and separate intervals
    assert union_length(sorted([(0, 10), (5, 12), (6, 7), (12, 13), (20, 25)])) == 18
