"""The one fs module (`pretrain.fs`) and the run files written through it, with real processes:

- a writer killed mid-write (SIGXFSZ from RLIMIT_FSIZE, i.e. exactly in the middle of a
  write, as a full disk would cut it) leaves the old eval JSON / run_config.yaml /
  ds_config.json whole, never a torn file;
- the temp sweeper leaves a live writer's temporary alone (another process in the middle of
  `atomic_open`, which then completes) and removes a killed writer's at once; on an object
  store (fsspec's memory://) only temporaries older than the threshold go;
- `lock_dir`: a second process gets DirBusyError naming the holder's pid and host; the
  kernel releases a SIGKILLed holder's lock;
- atomic writes fsync the file before the rename and the directory after it (os.fsync
  wrapped in this process);
- `trim_metrics` keeps the records up to the resumed step and drops later and torn lines.

Run: `.venv/bin/python -m pytest -q tests/test_fs.py`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain import fs

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1", NO_ALBUMENTATIONS_UPDATE="1",
                PYTHONUNBUFFERED="1")


def _python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# --- a writer killed mid-write ---------------------------------------------------------------
_KILLED_WRITER = """
import resource, signal, sys
{imports}
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default (then: EFBIG)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # a write past 4 KiB: SIGXFSZ (killed)
{call}
print("not killed")
"""

_BIG = {"rows": [{"class": f"c{i}", "top1": i / 1000} for i in range(3000)]}  # ~100 KB of JSON


def _killed_write(imports: str, call: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", _KILLED_WRITER.format(imports=imports, call=call)], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGXFSZ, (r.returncode, r.stdout, r.stderr[-2000:])
    return r


def test_eval_report_killed_mid_write_keeps_the_old_file(tmp_path):
    from pretrain.eval.report import write_results

    old = {"top1": 0.5}
    write_results(tmp_path, "zeroshot", old, "| old |\n")
    _killed_write("from pretrain.eval.report import write_results",
                  f"write_results({str(tmp_path)!r}, 'zeroshot', {_BIG!r}, 'new')")
    assert json.loads((tmp_path / "zeroshot.json").read_text()) == old
    assert (tmp_path / "zeroshot.md").read_text() == "| old |\n"
    # the killed writer's temporary is debris: no live process holds it
    assert fs.remove_stale_tmp(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zeroshot.json", "zeroshot.md"]


def test_run_files_killed_mid_write_keep_the_old_files(tmp_path):
    from pretrain.train.run_dir import write_run_files
    from train_driver import base_config

    cfg = base_config([f"--output_dir={tmp_path}"])
    write_run_files(tmp_path, cfg, {"train_batch_size": 16})
    before = {n: (tmp_path / n).read_text() for n in ("run_config.yaml", "ds_config.json")}
    _killed_write(
        "sys.path.insert(0, 'tests'); from train_driver import base_config; "
        "from pathlib import Path; from pretrain.train.run_dir import write_run_files",
        f"write_run_files(Path({str(tmp_path)!r}), base_config(['--output_dir={tmp_path}']), {_BIG!r})")
    after = {n: (tmp_path / n).read_text() for n in ("run_config.yaml", "ds_config.json")}
    assert after == before
    assert json.loads(after["ds_config.json"]) == {"train_batch_size": 16}


# --- the temp sweeper ------------------------------------------------------------------------
_LIVE_WRITER = """
from pretrain.fs import atomic_open
with atomic_open({path!r}, "wb") as f:
    f.write(b"first half ")
    f.flush()
    print("writing", flush=True)
    input()  # the test sweeps now
    f.write(b"second half")
print("done", flush=True)
"""


def test_sweeper_leaves_a_live_writers_temporary_and_removes_a_dead_ones(tmp_path):
    live = _python(_LIVE_WRITER.format(path=str(tmp_path / "a.tar")))
    dead = _python(_LIVE_WRITER.format(path=str(tmp_path / "b.tar")))
    try:
        assert live.stdout.readline() == "writing\n", live.stderr.read()
        assert dead.stdout.readline() == "writing\n", dead.stderr.read()
        dead.kill()
        dead.wait(30)
        tmps = sorted(p.name for p in tmp_path.iterdir())
        assert len(tmps) == 2 and all(fs.TMP_MARK in n for n in tmps), tmps
        for p in tmp_path.iterdir():  # old files: age alone never makes a live one stale
            os.utime(p, (time.time() - 86400, time.time() - 86400))
        assert fs.remove_stale_tmp(tmp_path) == 1
        left = [p.name for p in tmp_path.iterdir()]
        assert len(left) == 1 and left[0].startswith(".a.tar" + fs.TMP_MARK), left
        out, err = live.communicate("\n", timeout=30)
        assert live.returncode == 0 and out == "done\n", err
    finally:
        for p in (live, dead):
            if p.poll() is None:
                p.kill()
                p.wait(30)
    assert (tmp_path / "a.tar").read_bytes() == b"first half second half"
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar"]


def test_object_store_temporaries_go_only_when_old():
    import fsspec

    mem = fsspec.filesystem("memory")
    root = f"/sweep-{os.getpid()}"
    mem.pipe(f"{root}/.x.tar{fs.TMP_MARK}1-aaaa", b"fresh")
    mem.pipe(f"{root}/.y.tar{fs.TMP_MARK}2-bbbb", b"old")
    mem.pipe(f"{root}/z.tar", b"published")
    mem.store[f"{root}/.y.tar{fs.TMP_MARK}2-bbbb"].created = (
        dt.datetime.now(tz=dt.timezone.utc) - dt.timedelta(seconds=fs.REMOTE_STALE_S + 60))
    try:
        assert fs.remove_stale_tmp(f"memory://{root}") == 1
        assert sorted(p.rsplit("/", 1)[1] for p in mem.ls(root, detail=False)) == [
            f".x.tar{fs.TMP_MARK}1-aaaa", "z.tar"]
    finally:
        mem.rm(root, recursive=True)


# --- one owner per directory -----------------------------------------------------------------
_HOLDER = """
import time
from pretrain.fs import lock_dir
lock_dir({path!r}, "data build (test)")
print("held", flush=True)
time.sleep(300)
"""


def test_dir_lock_names_the_holder_and_dies_with_it(tmp_path):
    holder = _python(_HOLDER.format(path=str(tmp_path / "out")))
    try:
        assert holder.stdout.readline() == "held\n", holder.stderr.read()
        with pytest.raises(fs.DirBusyError) as exc:
            fs.lock_dir(tmp_path / "out", "second")
        msg = str(exc.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in msg and "data build (test)" in msg, msg
        holder.kill()
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)
    # the kernel released the dead holder's lock
    assert fs.lock_dir(tmp_path / "out", "after the crash")
    fs.lock_dir(tmp_path / "out")  # re-entrant within one process
    fs.unlock_dir(tmp_path / "out")
    fs.unlock_dir(tmp_path / "out")
    rec = json.loads((tmp_path / "out" / fs.LOCK_NAME).read_text())
    assert rec["pid"] == os.getpid() and rec["purpose"] == "after the crash"


def test_object_store_dirs_are_not_locked_and_say_so(caplog):
    assert fs.lock_dir("memory://no-lock-here") is False
    assert "NOT locked" in caplog.text


# --- fsync -----------------------------------------------------------------------------------
def test_atomic_write_fsyncs_the_file_then_the_directory(tmp_path, monkeypatch):
    events: list[tuple[str, bool]] = []
    real = os.fsync

    def spy(fd):
        events.append((os.readlink(f"/proc/self/fd/{fd}"), os.path.isdir(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    fs.write_text(tmp_path / "COMPLETE", "{}")
    assert (tmp_path / "COMPLETE").read_text() == "{}"
    assert len(events) == 2, events
    (file_path, file_is_dir), (dir_path, dir_is_dir) = events
    assert not file_is_dir and Path(file_path).name.startswith(".COMPLETE" + fs.TMP_MARK)  # before the rename
    assert dir_is_dir and Path(dir_path) == tmp_path  # after it


# --- metrics.jsonl ---------------------------------------------------------------------------
def test_trim_metrics_keeps_steps_up_to_the_resumed_one(tmp_path):
    from pretrain.train.run_dir import trim_metrics

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 8, "lo')  # torn by kill -9
    assert trim_metrics(tmp_path, 4) == 4
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:4])
    assert trim_metrics(tmp_path, 4) == 0
