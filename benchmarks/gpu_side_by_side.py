"""Our trainer's step against open_clip's training step, side by side on one GPU.

    .venv/bin/python benchmarks/gpu_side_by_side.py                 # one GPU, < 8 min
    .venv/bin/python benchmarks/gpu_side_by_side.py --dry-run       # CPU: tiny models, checks the logic
        [--batch 256,512] [--steps 10] [--warmup 3] [--models ViT-B-32,ViT-B-16,RN50]
        [--fast] [--override model.compile=blocks ...] [--no-compile] [--peak-tflops 989]
        [--open-clip-python .venv-peer/bin/python] [--budget-s 480]

Each row is one fresh child process per side (an OOM or allocator state never leaks):
- ours: `gpu_bench.build_bench` (run config, DeepSpeed ZeRO-1 bf16 engine, `train_step`,
  synthetic inputs on the device), with `--fast` (the trainer-step switches of
  profile_step.FAST_OVERRIDES) and any `--override KEY=VALUE` run-config overrides passed
  through (e.g. the model-side `model.*` switches);
- open_clip: `open_clip.create_model(name)` + `open_clip.loss.ClipLoss`, autocast bf16,
  torch AdamW (fused), its SDPA attention, `torch.compile` of the model unless
  --no-compile, the same synthetic inputs on the device: open_clip's own training step
  (open_clip_train.train.train_one_epoch without data loading).
- end-to-end (one more row per model, ours only): synthetic images encoded as JPEG into
  webdataset shards of the project's layout (`KEY.jpg`, `KEY.txt`, `KEY.json` per sample,
  written with pretrain.shards.tario.tar_bytes) in a temp dir, read through the trainer's
  loader (pretrain.data.make_train_loader, `--e2e-workers` DataLoader workers, the
  trainer's DevicePrefetcher on CUDA) into the real `train_step`. Printed: samples/s, the
  data-wait fraction (time blocked on the loader / wall time), the loader workers' CPU
  time (psutil) per second of wall over the timed steps, i.e. the cores the loader keeps
  busy at the measured rate, the same per sample, and the cores per GPU the loader would
  need to feed the synthetic-input row's rate (CPU per sample x that rate).
Printed: samples/s, MFU (3 x forward FLOPs counted by FlopCounterMode on each side's own
model / peak), peak memory, and ours / open_clip, for each model at each per-GPU batch
(256 and 512 by default; a batch that does not fit says OOM). Where open_clip is not
importable by `--open-clip-python` (default: this interpreter), its column says so and why
(install: scripts/fetch_gpu_wheels.sh), and our side still runs. Rows that would start after
`--budget-s` seconds are listed as skipped, so a run fits its time slot.
The dry run uses ViT-tiny / RN-tiny on both sides: open_clip builds them from the configs
pretrain.modelio.openclip writes (the same architectures), in the peer virtualenv
.venv-peer (scripts/setup_peer.sh) where it exists, fp32 and eager on CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from _common import machine_line, md_table, run_child  # noqa: E402


def _sig3(x: float) -> str:
    """Three significant digits, never in exponent form: a small CPU share on a loaded dry run
    (0.0004 cores) must not print as 0.000."""
    if not math.isfinite(x) or x <= 0:
        return f"{x:.3f}"
    return f"{x:.{max(0, 2 - math.floor(math.log10(x)))}f}"


# open_clip's model names -> ours
OURS = {"ViT-B-32": "ViT-B/32", "ViT-B-16": "ViT-B/16", "RN50": "RN50"}
DRY_OURS = {"ViT-B-32": "ViT-tiny", "RN50": "RN-tiny"}
E2E_HEADERS = ["model", "batch", "workers", "e2e samples/s", "data-wait fraction", "loader cores busy",
               "loader CPU ms/sample", "cores/GPU to feed synthetic rate"]
HEADERS = ["model", "batch", "ours samples/s", "ours MFU", "ours peak GiB", "open_clip samples/s",
           "open_clip MFU", "open_clip peak GiB", "ours / open_clip"]


def open_clip_missing(python: str) -> str | None:
    """None when `python` imports open_clip, else why not."""
    import subprocess  # noqa: PLC0415

    try:
        out = subprocess.run([python, "-c", "import open_clip"], capture_output=True, text=True, timeout=300)
    except OSError as e:
        return f"{python} does not run ({e})"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return f"open_clip not importable by {python} ({last}); run scripts/fetch_gpu_wheels.sh and install the wheels"
    return None


def write_dry_open_clip_configs(out_dir: Path) -> Path:
    """open_clip model configs of our tiny models (pretrain.modelio.openclip), one JSON each."""
    from pretrain.models.configs import MODEL_CONFIGS  # noqa: PLC0415
    from pretrain.modelio.openclip import write_open_clip_config  # noqa: PLC0415

    cfg_dir = out_dir / "open_clip_configs"
    for ours in DRY_OURS.values():
        write_open_clip_config(MODEL_CONFIGS[ours], cfg_dir / f"{ours}.json")
    return cfg_dir


def child_open_clip(spec: dict[str, Any]) -> dict[str, Any]:
    """open_clip's training step in this process (see the module docstring); runs in any
    environment with open_clip and torch (nothing of this project is imported)."""
    import time  # noqa: PLC0415

    import open_clip  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from open_clip.loss import ClipLoss  # noqa: PLC0415
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    if spec.get("config_dir"):
        open_clip.add_model_config(spec["config_dir"])
    model = open_clip.create_model(spec["model"], precision="fp32", device=device, output_dict=True)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    n = spec["batch"]
    try:
        images = torch.randn(n, 3, image_size, image_size, device=device)
        tokens = torch.randint(1, model.vocab_size - 1, (n, model.context_length), device=device)
        tokens[:, -1] = model.vocab_size - 1  # the end-of-text id, as the argmax pooling expects
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images[:2], tokens[:2])
        fwd_flops = counter.get_total_flops() / 2
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.2, fused=True)
        loss_fn = ClipLoss()
        run = torch.compile(model) if spec["compile"] else model
        # bf16 autocast as open_clip_train's `--precision amp_bf16`; fp32 on CPU (the dry run)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

        def step() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            with autocast:
                out = run(images, tokens)
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            loss.backward()
            opt.step()
            return loss

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(spec["warmup"]):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(spec["steps"]):
            loss = step()
        sync()
        elapsed = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        return {"fits": False}
    return {"fits": True, "samples_per_s": spec["steps"] * n / elapsed, "fwd_flops_per_sample": fwd_flops,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "loss": float(loss)}


def write_jpeg_shards(root: Path, n_shards: int, per_shard: int, image_px: int, seed: int = 0) -> str:
    """Synthetic JPEG shards (smooth random colour fields plus noise, so JPEG has real work)
    in the project's shard layout; returns their brace pattern."""
    import io  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    from pretrain.shards.tario import tar_bytes  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    words = ["cat", "dog", "red", "blue", "tree", "car", "house", "photo", "small", "large"]
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"{s:05d}{i:06d}"
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(coarse).resize((image_px, image_px), Image.BILINEAR), dtype=np.int16)
            img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            caption = "a " + " ".join(rng.choice(words, 4)) + "."
            meta = {"key": key, "caption": caption, "width": image_px, "height": image_px, "status": "success"}
            samples.append((key, {"jpg": buf.getvalue(), "txt": caption.encode(), "json": json.dumps(meta).encode()}))
        (root / f"{s:05d}.tar").write_bytes(tar_bytes(samples))
    return str(root / f"{{00000..{n_shards - 1:05d}}}.tar")


def _cpu_seconds(procs: list) -> float:
    import psutil  # noqa: PLC0415

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:  # a worker that ended: its time is lost (counted low)
            pass
    return total


def child_e2e(spec: dict[str, Any]) -> dict[str, Any]:
    """Our step fed by our loader from real JPEG shards (see the module docstring)."""
    import tempfile  # noqa: PLC0415
    import time  # noqa: PLC0415

    import psutil  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from gpu_bench import build_bench  # noqa: PLC0415

    from pretrain.data import DataSource, make_train_loader  # noqa: PLC0415
    from pretrain.engine_step import read_back  # noqa: PLC0415
    from pretrain.tokenizer import default_tokenizer  # noqa: PLC0415
    from pretrain.train.prefetch import DevicePrefetcher  # noqa: PLC0415
    from pretrain.train.step import compute_dtype, train_step  # noqa: PLC0415

    b = build_bench(spec)
    module, n = b.engine.module, spec["global_batch"]
    total_steps = spec["warmup"] + spec["steps"]
    workers = spec["workers"]
    with tempfile.TemporaryDirectory(prefix="e2e_shards_") as tmp:
        n_shards = max(2, workers)
        per_shard = min(spec["max_images"], total_steps * n) // n_shards + 1  # the loader repeats them
        pattern = write_jpeg_shards(Path(tmp), n_shards, per_shard, spec["image_px"])
        loader = make_train_loader([DataSource(pattern)], tokenizer=default_tokenizer(),
                                   image_size=module.image_size, micro_batch=n, num_workers=workers, seed=0,
                                   epoch=0, rank=0, world_size=1, steps=total_steps,
                                   context_length=module.context_length)
        batches = iter(loader)
        if b.device.type == "cuda":
            batches = DevicePrefetcher(batches, b.device, compute_dtype(b.engine))
        cuda = b.device.type == "cuda"
        try:
            pending = [train_step(b.engine, [next(batches)], b.loss_fn, defer=True) for _ in range(spec["warmup"])]
            read_back(pending)
            if cuda:
                torch.cuda.synchronize()
            # Worker CPU over the timed window, for the samples consumed in it: in a steady
            # state the prefetch queue is as full at the end as at the start (full when the
            # loader keeps up, empty when it does not), so the workers produced what the step
            # consumed. Workers are the leaf processes (the fork server above them only forks).
            procs = psutil.Process().children(recursive=True)
            leaves = [p for p in procs if not any(q.ppid() == p.pid for q in procs)]
            cpu0, t0, wait, pending = _cpu_seconds(leaves), time.perf_counter(), 0.0, []
            for _ in range(spec["steps"]):
                w = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - w
                pending.append(train_step(b.engine, [batch], b.loss_fn, defer=True))
            outs = read_back(pending)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            cpu = _cpu_seconds(leaves) - cpu0
        finally:
            batches.close()
    samples = spec["steps"] * n
    per_sample = cpu / samples
    return {"samples_per_s": samples / wall, "data_wait_frac": min(1.0, wait / wall), "loader_cores": cpu / wall,
            "cpu_s_per_sample": per_sample, "workers": workers, "loss": outs[-1].loss}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["side"] == "open_clip":
        return child_open_clip(spec)
    if spec["side"] == "e2e":
        return child_e2e(spec)
    from gpu_bench import child_run  # noqa: PLC0415

    return child_run(spec)


def run(spec: dict[str, Any], python: str = sys.executable, env: dict[str, str] | None = None) -> dict[str, Any]:
    return run_child([python, __file__, "--child", json.dumps(spec)], timeout=900, env=env)


def fmt_gib(r: dict[str, Any]) -> str:
    return f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"


def fmt_mfu(r: dict[str, Any], peak: float | None) -> str:
    if peak is None:
        return "- (peak unknown)"
    return f"{100 * r['samples_per_s'] * 3 * r['fwd_flops_per_sample'] / peak:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--batch", default=None, help="per-GPU batches, comma-separated (default 256,512; dry 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; dry 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; dry 1)")
    ap.add_argument("--models", default=None, help="open_clip names, comma-separated (default ViT-B-32,ViT-B-16,RN50)")
    ap.add_argument("--fast", action="store_true", help="our trainer-step speed switches on")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="run-config override for our side (repeatable), e.g. model.compile=blocks")
    ap.add_argument("--no-compile", action="store_true", help="open_clip without torch.compile (the dry run: always)")
    ap.add_argument("--open-clip-python", default=None,
                    help="interpreter for open_clip's side (default: this one; dry run: .venv-peer's where it exists)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no row after this many seconds (default 480; dry: none)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--e2e-workers", type=int, default=None, help="loader workers of the end-to-end row "
                    "(default 8; dry 1); 0 skips the row")
    ap.add_argument("--e2e-image-px", type=int, default=None, help="stored JPEG side (default 256; dry 48)")
    ap.add_argument("--out-dir", default="/tmp/gpu_side_by_side")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import time  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from gpu_bench import peak_flops  # noqa: PLC0415
    from profile_step import FAST_OVERRIDES  # noqa: PLC0415

    t_start = time.monotonic()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or pass --dry-run to check the script on CPU")
    batches = [int(b) for b in (args.batch or ("8" if dry else "256,512")).split(",")]
    steps, warmup = args.steps or (1 if dry else 10), args.warmup or (1 if dry else 3)
    budget = args.budget_s if args.budget_s is not None else (None if dry else 480.0)
    names = args.models.split(",") if args.models else (list(DRY_OURS) if dry else list(OURS))
    table = DRY_OURS if dry else OURS
    overrides = (FAST_OVERRIDES if args.fast else []) + [o.removeprefix("--") for o in args.override]
    for name in names:
        if name not in table:
            sys.exit(f"unknown model {name!r}; known: {sorted(table)}")

    def our_spec(name: str, batch: int) -> dict[str, Any]:
        return {"side": "ours", "model": table[name], "ckpt": False, "precision": "fp32" if dry else "bf16",
                "micro_batch": batch, "global_batch": batch, "steps": steps, "warmup": warmup,
                "out_dir": args.out_dir, "extra": [f"--{o}" for o in overrides]}

    # a bad --override fails here, before the open_clip probe (seconds) or any child engine
    from gpu_bench import bench_config  # noqa: PLC0415
    try:
        bench_config(our_spec(names[0], batches[0]))
    except (ValueError, SystemExit) as e:
        sys.exit(f"bad --override: {e}")
    peer = Path(__file__).resolve().parents[1] / ".venv-peer" / "bin" / "python"
    oc_python = args.open_clip_python or (str(peer) if dry and peer.is_file() else sys.executable)
    # the peer environment is open_clip's alone: nothing of this project on its path, no hub
    oc_env = {"PYTHONPATH": "", "HF_HUB_OFFLINE": "1"} if oc_python != sys.executable else None
    missing = open_clip_missing(oc_python)
    compile_oc = not (args.no_compile or dry)
    cfg_dir = write_dry_open_clip_configs(Path(args.out_dir)) if dry and not missing else None
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_flops(args, device_name)
    print(machine_line("cuda" if not dry else "cpu") + (" (DRY RUN: tiny models)" if dry else ""))
    print(f"# batches {','.join(map(str, batches))}, bf16{' (fp32 on CPU)' if dry else ''}, {warmup} warm-up + "
          f"{steps} timed steps; our overrides: {' '.join(overrides) or 'none'}; open_clip: "
          f"{missing or (('torch.compile' if compile_oc else 'eager') + f' ({oc_python})')}")
    rows, e2e_rows, skipped = [], [], []
    e2e_workers = args.e2e_workers if args.e2e_workers is not None else (1 if dry else 8)
    for name in names:
        ours_name = table[name]
        for batch in batches:
            if budget is not None and time.monotonic() - t_start > budget:
                skipped.append(f"{name} batch {batch}")
                continue
            ours = run(our_spec(name, batch))
            fits = ours.get("fits", True)
            row = [name, batch] + ([_sig3(ours['samples_per_s']), fmt_mfu(ours, peak), fmt_gib(ours)]
                                   if fits else ["OOM", "-", "-"])
            if missing:
                row += ["skipped", "-", "-", "-"]
            else:
                theirs = run({"side": "open_clip", "model": ours_name if dry else name, "batch": batch,
                              "steps": steps, "warmup": warmup, "compile": compile_oc,
                              "config_dir": str(cfg_dir) if cfg_dir else None}, python=oc_python, env=oc_env)
                if not theirs.get("fits", True):
                    row += ["OOM", "-", "-", "-"]
                else:
                    ratio = f"{ours['samples_per_s'] / theirs['samples_per_s']:.2f}x" if fits else "-"
                    row += [_sig3(theirs['samples_per_s']), fmt_mfu(theirs, peak), fmt_gib(theirs), ratio]
                    if fits:  # the same architecture on both sides: the same forward FLOPs
                        print(f"# {name}: forward GFLOP/sample ours {ours['fwd_flops_per_sample'] / 1e9:.4f}, "
                              f"open_clip {theirs['fwd_flops_per_sample'] / 1e9:.4f}", flush=True)
            rows.append(row)
            print(md_table(HEADERS, [row]).splitlines()[-1], flush=True)
            if e2e_workers > 0 and batch == batches[0]:  # the loader's rate hardly depends on the batch
                e2e = run({**our_spec(name, batch), "side": "e2e", "workers": e2e_workers,
                           "image_px": args.e2e_image_px or (48 if dry else 256),
                           "max_images": 64 if dry else 2048, "steps": max(steps, 6 if dry else 30),
                           "warmup": max(warmup, 2 if dry else 5)})
                feed = _sig3(ours['samples_per_s'] * e2e['cpu_s_per_sample']) if fits else "-"
                e2e_row = [name, batch, e2e_workers, _sig3(e2e['samples_per_s']), f"{e2e['data_wait_frac']:.3f}",
                           _sig3(e2e['loader_cores']), _sig3(1000 * e2e['cpu_s_per_sample']), feed]
                e2e_rows.append(e2e_row)
                print("e2e " + md_table(E2E_HEADERS, [e2e_row]).splitlines()[-1], flush=True)
    print()
    print(md_table(HEADERS, rows))
    if e2e_rows:
        print("\n# end to end: real JPEG shards through our loader into our step")
        print(md_table(E2E_HEADERS, e2e_rows))
    if missing:
        print(f"\nopen_clip side skipped: {missing}")
    if skipped:
        print(f"\nnot run (past the {budget:.0f} s budget): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
