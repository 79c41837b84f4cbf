"""Two data builds on one output directory: the second stops at once naming the holder.

Reproduces the hole: a concurrent build's temp-file sweeper deleted another build's open
temp file. Now every stage holds `OUT/.lock` (pretrain.fs.lock_dir, the lock each build
stage takes); the holder here is a real process holding that lock, the contender a real
`python -m data_pipeline build` on the same output, which must exit 2 with the holder's
pid before it fetches or deletes anything.

Run: `.venv/bin/python -m pytest -q tests/test_build_dir_lock.py`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain import fs

REPO = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from pretrain.fs import lock_dir; "
        "assert lock_dir(sys.argv[1], 'data build (crawl)'); print('held', flush=True); time.sleep(120)")


@pytest.mark.slow
def test_second_build_on_a_locked_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.jpg\n")
    stray = out / "crawl" / "keep.tmp-in-flight"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        stray.parent.mkdir()
        stray.write_bytes(b"a temp file of the running build")
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "data_pipeline", "build", "--urls", str(urls), "--output", str(out),
                               "--allow-private-addresses", "--crawl.host_rate=0"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120)
        text = proc.stdout + proc.stderr
        assert proc.returncode == 2, text[-3000:]
        assert f"pid {holder.pid}" in text and "data build (crawl)" in text, text[-3000:]
        assert stray.exists()  # nothing of the running build was swept
        assert not (out / "crawl" / "00000.tar").exists() and time.monotonic() - t0 < 60
    finally:
        holder.kill()
        holder.wait()
    assert fs.lock_dir(str(out), "test")  # the kernel released the dead holder's lock
    fs.unlock_dir(str(out))
