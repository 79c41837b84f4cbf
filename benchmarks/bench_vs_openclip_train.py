"""Training step side by side: samples/s of a small ViT and a small ResNet on 2 CPU
processes, ours (`deepspeed pretrain/run.py`, DeepSpeed ZeRO-1) against open_clip's own
trainer (`open_clip_train.main` under `torchrun`, `--dataset-type webdataset`), on the same
shards with the same global batch, model size, loss and optimizer settings.

    .venv-bench/bin/python benchmarks/bench_vs_openclip_train.py [--models ViT-tiny RN-tiny]
        [--steps 30] [--short-steps 10] [--log-every 10] [--batch 64] [--workers 1] [--px 128]
        [--repeats 3]

Models: open_clip gets model-config JSONs equal to our "ViT-tiny" / "RN-tiny"
(pretrain/models/configs.py), registered with `open_clip.add_model_config` in the torchrun
worker (this script re-entered with --openclip-worker); the parameter counts of both sides
are printed to show the sizes match. Same for both: fp32, global batch --batch (half per
process), AdamW lr 5e-4 betas (0.9, 0.98) eps 1e-6 wd 0.2, gradient clipping 1.0, the CLIP
loss over the all-gathered batch (open_clip: --local-loss --gather-with-grad; ours: "clip"),
--workers data-loader workers per process, OMP_NUM_THREADS=1 per process, shards read
without resampling. Only one thing is adapted on open_clip's side: on CPU its trainer passes
`device_ids=[cpu]` to DistributedDataParallel, which torch rejects for CPU modules, so the
worker drops device_ids for CPU modules (what DDP requires there) and changes nothing else.

Throughput: each trainer's own windowed figures (ours: metrics.jsonl `samples_per_s`;
open_clip: `Batch (t)`, the mean wall time per step of each log window, including data
wait). Windows that contain any of the first --log-every steps are dropped (start-up), the
rest are pooled: samples / seconds per run; each side runs --repeats times, alternating with
the other, and its best run is reported (load from other jobs only ever slows a run down),
with the best single window beside it. Load-robust figure beside it: CPU milliseconds per
sample of the whole launched process tree (ranks, data workers, launcher; polled),
taken as (CPU of a --steps run - CPU of a --short-steps run) / (step difference x batch),
so start-up and the final checkpoint cancel out. On a shared machine the wall-clock rate
follows whatever CPU share a run got; the CPU cost barely moves, and on an idle machine
with one core per process a CPU-bound step's rate is inversely proportional to it.
Target (issue 8): ours >= 1.0x open_clip.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from _common import REPO, machine_line, md_table, require_open_clip  # noqa: E402
from pretrain.train.distributed import free_port  # noqa: E402  (below the ephemeral range)

NPROC = 2
LR, BETAS, EPS, WD, CLIP_NORM = 5e-4, (0.9, 0.98), 1e-6, 0.2, 1.0
OPENCLIP_LOG = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Batch \(t\): ([0-9.]+)")


def open_clip_config(name: str) -> dict[str, Any]:
    """open_clip model-config JSON equal to our model `name` (pretrain/modelio/openclip.py)."""
    from pretrain.models import get_config  # noqa: PLC0415
    from pretrain.modelio.openclip import open_clip_config as from_config  # noqa: PLC0415

    return from_config(get_config(name))


def param_counts(name: str, oc_name: str) -> tuple[int, int]:
    open_clip = require_open_clip()
    from pretrain.models import create_model  # noqa: PLC0415

    ours = sum(p.numel() for p in create_model(name).parameters())
    theirs = sum(p.numel() for p in open_clip.create_model(oc_name).parameters())
    return ours, theirs



def run_logged(cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> tuple[str, float]:
    """(log text, CPU seconds used by the launched process tree). The tree (launcher, ranks,
    data workers) is polled twice a second and each process's last user + system time is
    kept, so processes that exit without being waited for still count; what a process does
    after its last poll is missed, the same at every step count (it cancels in the CPU
    difference of a long and a short run)."""
    last: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{cmd[:4]} ... timed out after {timeout} s; log {log}")
            try:
                tree = [root] + root.children(recursive=True)
            except psutil.Error:
                tree = []
            for p in tree:
                try:
                    t = p.cpu_times()
                    last[p.pid] = t.user + t.system
                except psutil.Error:  # exited between listing and reading
                    pass
            time.sleep(0.5)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} ... exited {proc.returncode}; log {log}:\n{text[-3000:]}")
    return text, sum(last.values())


Windows = list[tuple[float, float]]  # (samples, seconds) of each kept log window


@dataclass
class Run:
    steps: int
    windows: Windows  # empty for the short runs that only serve the CPU difference
    cpu_s: float  # CPU seconds of the whole launch (start-up, steps, final save, exit)


def run_ours(name: str, pattern: str, args: argparse.Namespace, work: Path, env: dict[str, str],
             steps: int) -> Run:
    out = work / f"ours-{name}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = {
        "output_dir": str(out),
        "model": {"name": name},
        "data": {"sources": [{"url": pattern}], "samples_per_epoch": steps * args.batch,
                 "workers": args.workers, "resampled": False},
        "optimizer": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD, "impl": "torch"},
        "train": {"global_batch": args.batch, "micro_batch": args.batch // NPROC, "precision": "fp32",
                  "zero_stage": 1, "grad_clip": CLIP_NORM, "loss": "clip", "seed": 0},
        "checkpoint": {"every_steps": 0},
        "logging": {"every_steps": args.log_every, "mlflow": False},
    }
    cfg_path = work / f"ours-{name}.json"  # JSON is YAML
    cfg_path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(NPROC),
           "--master_port", str(free_port()), "pretrain/run.py", "--config", str(cfg_path)]
    _, cpu_s = run_logged(cmd, work / f"ours-{name}.log", env, args.timeout)
    windows = []
    prev = 0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        n = m["step"] - prev
        if prev >= args.log_every:  # window (prev, step] lies after the start-up steps
            windows.append((n * args.batch, n * args.batch / m["samples_per_s"]))
        prev = m["step"]
    return Run(steps, checked(windows, "ours", name, steps, args), cpu_s)


def run_open_clip(name: str, oc_name: str, pattern: str, args: argparse.Namespace, work: Path,
                  env: dict[str, str], steps: int) -> Run:
    logs = work / "openclip-logs"
    shutil.rmtree(logs / oc_name, ignore_errors=True)
    oc_args = ["--model", oc_name, "--train-data", pattern, "--dataset-type", "webdataset",
               "--train-num-samples", str(steps * args.batch), "--batch-size", str(args.batch // NPROC),
               "--epochs", "1", "--workers", str(args.workers), "--precision", "fp32",
               "--local-loss", "--gather-with-grad", "--lr", str(LR), "--beta1", str(BETAS[0]),
               "--beta2", str(BETAS[1]), "--eps", str(EPS), "--wd", str(WD), "--warmup", "1",
               "--grad-clip-norm", str(CLIP_NORM), "--seed", "0", "--log-every-n-steps", str(args.log_every),
               "--save-frequency", "0", "--zeroshot-frequency", "0", "--report-to", "",
               "--logs", str(logs), "--name", oc_name, "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC),
           "--master_port", str(free_port()), __file__, "--openclip-worker", str(work / "oc_configs"), "--", *oc_args]
    text, cpu_s = run_logged(cmd, work / f"openclip-{name}.log", env, args.timeout)
    windows = []
    prev_i = None
    for samples, batch_t in OPENCLIP_LOG.findall(text):
        i = int(samples) // args.batch - 1  # 0-based index of the window's last step
        if prev_i is not None and prev_i + 1 >= args.log_every:  # steps prev_i+1..i, after start-up
            windows.append(((i - prev_i) * args.batch, (i - prev_i) * float(batch_t)))
        prev_i = i
    return Run(steps, checked(windows, "open_clip", name, steps, args), cpu_s)


def checked(windows: Windows, side: str, name: str, steps: int, args: argparse.Namespace) -> Windows:
    if not windows and steps == args.steps:
        raise RuntimeError(f"{side} {name}: no log window after start-up; raise --steps")
    return windows


def pooled(windows: Windows) -> float:
    """Samples/s over all kept windows of one run."""
    return sum(w[0] for w in windows) / sum(w[1] for w in windows)


def best_window(windows: Windows) -> float:
    """Samples/s of the least disturbed window (machine load only ever slows one down)."""
    return max(w[0] / w[1] for w in windows)


def openclip_worker(config_dir: str, oc_args: list[str]) -> None:
    """torchrun entry: register our model configs, then open_clip's own trainer main()."""
    import torch  # noqa: PLC0415

    open_clip = require_open_clip()
    open_clip.add_model_config(config_dir)
    ddp = torch.nn.parallel.DistributedDataParallel

    class CpuDDP(ddp):  # type: ignore[misc, valid-type]
        """DDP that drops device_ids for a CPU module (torch rejects them there)."""

        def __init__(self, module: torch.nn.Module, device_ids: Any = None, **kw: Any) -> None:
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids=device_ids, **kw)

    torch.nn.parallel.DistributedDataParallel = CpuDDP
    from open_clip_train.main import main as oc_main  # noqa: PLC0415

    oc_main(oc_args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ViT-tiny", "RN-tiny"])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--log-every", type=int, default=10, help="log window (steps); the first is dropped")
    ap.add_argument("--short-steps", type=int, default=10,
                    help="steps of the extra short run per side whose CPU time is subtracted")
    ap.add_argument("--batch", type=int, default=64, help="global batch (half per process)")
    ap.add_argument("--workers", type=int, default=1, help="data-loader workers per process")
    ap.add_argument("--px", type=int, default=128, help="stored JPEG size of the shards")
    ap.add_argument("--samples", type=int, default=2048, help="samples in the shards (256 per shard)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side, alternating; best reported")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--work-dir", default=None, help="default: a fresh temporary directory")
    ap.add_argument("--shard-dir", default="/tmp/bench_vs_openclip_shards")
    ap.add_argument("--openclip-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.openclip_worker:
        openclip_worker(args.openclip_worker, [a for a in args.rest if a != "--"])
        return
    require_open_clip()
    from bench_input_pipeline import make_bench_shards  # noqa: PLC0415  (the shared shard writer)

    if args.steps < 3 * args.log_every:
        sys.exit("--steps must be at least 3 x --log-every (the first window is dropped)")
    if not 0 < args.short_steps < args.steps:
        sys.exit("--short-steps must be between 0 and --steps")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_vs_openclip_train_"))
    (work / "oc_configs").mkdir(parents=True, exist_ok=True)
    pattern = make_bench_shards(Path(args.shard_dir) / f"px{args.px}", args.px, args.samples)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(machine_line("cpu"))
    print(f"# training: {NPROC} CPU processes, global batch {args.batch}, fp32, {args.steps} steps, windows of "
          f"{args.log_every} (first dropped), {args.workers} data worker(s) per process, {args.px} px JPEGs; "
          f"work dir {work}")
    headers = ["model", "params ours / open_clip", "open_clip samples/s", "ours samples/s", "ours / open_clip",
               "best window oc / ours", "CPU ms/sample oc / ours", "CPU ratio", "target >= 1.0x (wall / CPU)"]
    rows = []
    for name in args.models:
        oc_name = f"bench-{name}"
        (work / "oc_configs" / f"{oc_name}.json").write_text(json.dumps(open_clip_config(name), indent=1))
        require_open_clip().add_model_config(str(work / "oc_configs"))
        n_ours, n_theirs = param_counts(name, oc_name)
        runs: dict[str, list[Run]] = {"open_clip": [], "ours": []}
        sides = {"open_clip": lambda n: run_open_clip(name, oc_name, pattern, args, work, env, n),
                 "ours": lambda n: run_ours(name, pattern, args, work, env, n)}
        for _ in range(args.repeats):  # alternating sides, so slow spells of the machine hit both
            for side, launch in sides.items():
                runs[side].append(launch(args.steps))
        # CPU cost per step without start-up and final save: (long - short) / step difference.
        cpu = {}
        for side, launch in sides.items():
            short = launch(args.short_steps)
            long_cpu = statistics.median(r.cpu_s for r in runs[side])
            cpu[side] = 1e3 * (long_cpu - short.cpu_s) / ((args.steps - args.short_steps) * args.batch)
        best = {side: max(pooled(r.windows) for r in rs) for side, rs in runs.items()}
        peak = {side: max(best_window(r.windows) for r in rs) for side, rs in runs.items()}
        x, xc = best["ours"] / best["open_clip"], cpu["open_clip"] / cpu["ours"]
        rows.append([name, f"{n_ours:,} / {n_theirs:,}", f"{best['open_clip']:.1f}", f"{best['ours']:.1f}",
                     f"{x:.2f}x", f"{peak['open_clip']:.0f} / {peak['ours']:.0f}",
                     f"{cpu['open_clip']:.1f} / {cpu['ours']:.1f}", f"{xc:.2f}x",
                     " / ".join("met" if v >= 1.0 else "NOT met" for v in (x, xc))])
        print(md_table(headers, [rows[-1]]).splitlines()[-1], flush=True)
    print()
    print(md_table(headers, rows))


if __name__ == "__main__":
    main()
