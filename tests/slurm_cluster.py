"""Test harness: a real two-node Slurm cluster on this one machine, as a pytest fixture.

One slurmctld and two slurmd daemons ("nodes" n1 and n2, each with 1 CPU) share the host;
each slurmd has its own port and uses `%n` in its spool/pid/log paths
(docs/cpu_development.md). Everything lives in a short temporary directory:
slurm.conf, cgroup.conf, a private munged (own key copy and socket, so a system munged is
neither needed nor touched), state, spool and logs. The node names are mapped to 127.0.0.1
by a tagged line in /etc/hosts while the cluster runs (job scripts take MASTER_ADDR from
`scontrol show hostnames`). Stopping cancels every job, `scontrol shutdown`s the daemons,
ends what is left by pid, and restores /etc/hosts, also when a test failed.

The fixture skips (never fails) where Slurm is missing and cannot be installed
(`apt-get install slurmctld slurmd slurm-client munge` is tried when running as root with
apt; CLIP_SLURM_NO_INSTALL=1 turns that off), or where the daemons cannot be started.
CI sets CLIP_SLURM_REQUIRED=1 to turn those skips into failures.

    from slurm_cluster import slurm_cluster   # noqa: F401  (in a test module)
    def test_x(slurm_cluster):
        job = slurm_cluster.sbatch("slurm/cpu_tiny.sh", env={...})
        info = slurm_cluster.wait_done(job, timeout=120)
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from dist_harness import free_port

NODES = ("n1", "n2")
DAEMONS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "munged")
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_LOCK = Path(tempfile.gettempdir()) / "clip-slurm-test-hosts.lock"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


class SlurmError(RuntimeError):
    pass


def _try_install() -> str | None:
    """None when the Slurm binaries are (now) present, else why not."""
    if all(shutil.which(d) for d in DAEMONS):
        return None
    if os.environ.get("CLIP_SLURM_NO_INSTALL") == "1" or os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"Slurm binaries missing ({[d for d in DAEMONS if not shutil.which(d)]}) and not installable here"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES], env=env,
                       capture_output=True, timeout=600, check=True)
    except (subprocess.SubprocessError, OSError) as exn:
        return f"apt-get install {' '.join(APT_PACKAGES)} failed: {exn}"
    missing = [d for d in DAEMONS if not shutil.which(d)]
    return f"still missing after install: {missing}" if missing else None


def _slurm_conf(root: Path, host: str, ctl_port: int, node_ports: Sequence[int]) -> str:
    nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs=1 RealMemory=1000"
                      for n, p in zip(NODES, node_ports))
    return f"""\
ClusterName=cliptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctl_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a revoked job credential blocks a requeued job from starting
# again (Slurm holds it that long: EligibleTime = requeue + cred_expire); 120 s by default
AuthInfo=socket={root}/munge.sock,cred_expire=15
SlurmUser=root
SlurmdUser=root
SlurmctldPidFile={root}/slurmctld.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdSpoolDir={root}/spool-%n
SlurmdPidFile={root}/slurmd-%n.pid
SlurmdLogFile={root}/log/slurmd-%n.log
StateSaveLocation={root}/state
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# a requeued job becomes eligible by time, not by an event: look at pending jobs every second
SchedulerParameters=sched_interval=1
ReturnToService=2
MpiDefault=none
# tests: SIGKILL 5 s after SIGTERM, keep finished jobs visible to `scontrol show job`
KillWait=5
MinJobAge=900
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def _hosts_lock() -> Iterator[None]:
    """Two clusters may start at once (pytest-xdist workers): their read-modify-write edits of
    /etc/hosts take turns, so neither drops the other's line."""
    with open(HOSTS_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class SlurmCluster:
    """A running two-node cluster; commands go through `SLURM_CONF` = this cluster's config."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.nodes = NODES
        self._hosts_tag = f"# clip-slurm-test {os.getpid()} {root}"
        self._jobs: list[int] = []
        self.history: dict[int, list[tuple[float, str, str]]] = {}  # job -> (time, state, restarts) changes

    # --- environment and commands ----------------------------------------------------------
    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The caller's environment minus any outer Slurm job's variables, plus SLURM_CONF."""
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        base["SLURM_CONF"] = str(self.conf)
        base.update(extra or {})
        return base

    def cmd(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        proc = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)} -> rc {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def sbatch(self, script: str | Path, *script_args: str, sbatch_args: Sequence[str] = (),
               env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(script), *script_args],
                              env=self.env(env), cwd=cwd, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise SlurmError(f"sbatch {script} failed: {proc.stderr.strip()}")
        job = int(proc.stdout.strip().split(";")[0])
        self._jobs.append(job)
        return job

    def job(self, job: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.cmd("scontrol", "show", "job", "-o", str(job)).strip()
        info: dict[str, str] = {}
        for field in out.split():
            key, _, value = field.partition("=")
            info.setdefault(key, value)
        seen = self.history.setdefault(job, [])
        now = (info.get("JobState", "?"), info.get("Restarts", "?"))
        if not seen or seen[-1][1:] != now:
            seen.append((round(time.time(), 2), *now))
        return info

    def wait_for(self, job: int, predicate, timeout: float, what: str, poll: float = 0.5) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info = self.job(job)
        while not predicate(info):
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job}: not {what} after {timeout:.0f} s; last state {info.get('JobState')} "
                                 f"reason {info.get('Reason')}; states {self.history.get(job)}\n{self.logs_tail()}")
            time.sleep(poll)
            info = self.job(job)
        return info

    def wait_done(self, job: int, timeout: float, restarts: int | None = None) -> dict[str, str]:
        """Wait for a final state; with `restarts`, for the end of that attempt (right after
        `scontrol requeue` the old attempt can show a final state for a moment, so the
        attempt must also have been seen RUNNING)."""
        def done(info: dict[str, str]) -> bool:
            if info.get("JobState") not in FINAL_STATES:
                return False
            if restarts is None:
                return True
            return (info.get("Restarts") == str(restarts)
                    and any(st == "RUNNING" and r == str(restarts) for _, st, r in self.history.get(job, [])))
        return self.wait_for(job, done, timeout, "finished" if restarts is None else f"finished attempt {restarts}",
                             poll=0.25)

    def wait_requeued(self, job: int, timeout: float = 60) -> dict[str, str]:
        """Wait until `job` was requeued and is pending again. It starts again by itself once
        its old credential has expired (cred_expire above; forcing StartTime=now earlier
        makes slurmd refuse the launch: "Job credential revoked")."""
        def requeued(info: dict[str, str]) -> bool:
            if info.get("JobState") in FINAL_STATES and info.get("Restarts") == "0":
                raise SlurmError(f"job {job} ended ({info.get('JobState')}) without being requeued")
            return info.get("JobState") in ("PENDING", "RUNNING") and int(info.get("Restarts", "0")) >= 1

        return self.wait_for(job, requeued, timeout, "requeued", poll=0.2)

    def task_pids(self, job: int, procid: int, needle: str = "") -> list[int]:
        """Top processes of task `procid` of `job` whose command line contains `needle`
        (children such as data-loader workers, which inherit both, are left out). Read from
        /proc, which works because the "nodes" are this machine: every process of a task
        carries SLURM_JOB_ID and SLURM_PROCID in its environment."""
        found: dict[int, int] = {}  # pid -> parent pid
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if (f"SLURM_JOB_ID={job}".encode() in environ and f"SLURM_PROCID={procid}".encode() in environ
                    and b"SLURM_STEP_ID=0" in environ and needle in cmdline):
                found[int(entry.name)] = ppid
        return sorted(pid for pid, ppid in found.items() if ppid not in found)

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        (self.root / "log").mkdir(parents=True)
        (self.root / "state").mkdir()
        host = socket.gethostname()
        ports = [free_port() for _ in range(3)]
        self.conf.write_text(_slurm_conf(self.root, host, ports[0], ports[1:]))
        # cgroup/v1 with IgnoreSystemd: this Slurm refuses CgroupPlugin=disabled (docs/cpu_development.md)
        (self.root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n")
        self._start_munge()
        self._add_hosts()
        self.cmd("slurmctld", "-c", "-f", str(self.conf))
        for node in NODES:
            self.cmd("slurmd", "-N", node, "-f", str(self.conf))
        deadline = time.monotonic() + 30
        while True:
            states = self.cmd("sinfo", "-h", "-N", "-o", "%N %T", check=False).split()
            if states.count("idle") == len(NODES):
                return
            if time.monotonic() > deadline:
                raise SlurmError(f"nodes not idle after 30 s: {states}\n{self.logs_tail()}")
            time.sleep(0.3)

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        system_key = Path("/etc/munge/munge.key")
        if system_key.is_file() and os.access(system_key, os.R_OK):
            shutil.copyfile(system_key, key)
        else:
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        subprocess.run(["munged", "--force", f"--socket={self.root}/munge.sock", f"--key-file={key}",
                        f"--log-file={self.root}/log/munged.log", f"--pid-file={self.root}/munged.pid",
                        f"--seed-file={self.root}/munged.seed"], check=True, capture_output=True, timeout=30)

    def _add_hosts(self) -> None:
        with _hosts_lock():
            text = HOSTS_FILE.read_text()
            # in place (not a rename): /etc/hosts is often a bind mount in containers
            with HOSTS_FILE.open("a") as f:
                f.write(("" if text.endswith("\n") else "\n") + f"127.0.0.1 {' '.join(NODES)} {self._hosts_tag}\n")

    def _remove_hosts(self) -> None:
        with _hosts_lock(), contextlib.suppress(OSError):
            lines = HOSTS_FILE.read_text().splitlines(keepends=True)
            kept = [line for line in lines if self._hosts_tag not in line]
            if kept != lines:
                HOSTS_FILE.write_text("".join(kept))

    def _pids_from_files(self) -> dict[str, int]:
        """{"slurmctld": pid, "slurmd-n1": pid, ..., "munged": pid} from the daemons' pid files."""
        pids = {}
        for pidfile in self.root.glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pids[pidfile.stem] = int(pidfile.read_text().strip())
        return pids

    def _our_processes(self) -> list[int]:
        """Processes started by this cluster: they carry our SLURM_CONF or our spool paths."""
        marks = (f"SLURM_CONF={self.conf}".encode(), str(self.root).encode())
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                blob = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
                if any(m in blob for m in marks):
                    found.append(int(entry.name))
        return found

    def stop(self) -> None:
        """Cancel jobs, shut the daemons down, end leftovers by pid, restore /etc/hosts."""
        try:
            if self._jobs:
                self.cmd("scancel", *map(str, self._jobs), check=False)
                deadline = time.monotonic() + 20
                while self.cmd("squeue", "-h", check=False).strip() and time.monotonic() < deadline:
                    time.sleep(0.5)
            self.cmd("scontrol", "shutdown", check=False)
            deadline = time.monotonic() + 15
            slurm_pids = [p for f, p in self._pids_from_files().items() if f != "munged"]
            while time.monotonic() < deadline and any(_alive(p) for p in slurm_pids):
                time.sleep(0.3)
        except (subprocess.SubprocessError, OSError):
            pass
        finally:
            for pid in set(self._pids_from_files().values()) | set(self._our_processes()):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self._remove_hosts()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _skip(why: str) -> None:
    if os.environ.get("CLIP_SLURM_REQUIRED") == "1":
        pytest.fail(f"CLIP_SLURM_REQUIRED=1 but: {why}")
    pytest.skip(why)


@contextlib.contextmanager
def running_cluster() -> Iterator[SlurmCluster]:
    """Start a cluster (or pytest.skip why not) and always stop and remove it afterwards."""
    why = _try_install()
    if why:
        _skip(why)
    if os.geteuid() != 0:
        _skip("the test cluster runs slurmd/munged as root and edits /etc/hosts")
    if not os.access(HOSTS_FILE, os.W_OK):
        _skip(f"{HOSTS_FILE} is not writable: node names n1/n2 cannot be resolved")
    # a short path: the munge socket path must fit in a UNIX socket address (108 bytes)
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp")))
    try:
        try:
            cluster.start()
        except (SlurmError, subprocess.SubprocessError, OSError) as exn:
            _skip(f"could not start a local Slurm cluster: {exn}")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    with running_cluster() as cluster:
        yield cluster
