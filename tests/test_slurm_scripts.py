"""Static checks of the Slurm launch scripts: shellcheck, the shared launcher, and every
script's preset + overrides parsed by the trainer's config loader at the script's default
size (no cluster needed; the real-cluster tests are in test_slurm_jobs.py).

Each script is run in the launcher's dry-run mode (CLIP_DRY_RUN=1: full bash path, prints
the srun command instead of running it), and the printed trainer arguments are checked
with slurm/preflight.py (pretrain.config.load_config + RunConfig.validate(world size)).

    .venv/bin/python -m pytest -q tests/test_slurm_scripts.py
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ModelConfig
from pretrain.models import list_models
from pretrain.models.factory import get_config

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
SCRIPTS = sorted(p for p in SLURM.glob("*.sh") if p.name != "common.sh")

# The paper's recipe, written down independently of the presets (CLIP paper, Tables 19-20;
# image sizes from the model table): script -> (zoo name, px, lr, epochs, is_vit).
PAPER = {
    "rn50": ("RN50", 224, 5e-4, 32, False),
    "rn101": ("RN101", 224, 5e-4, 32, False),
    "rn50x4": ("RN50x4", 288, 5e-4, 32, False),
    "rn50x16": ("RN50x16", 384, 4e-4, 32, False),
    "rn50x64": ("RN50x64", 448, 3.6e-4, 32, False),
    "vit_b32": ("ViT-B/32", 224, 5e-4, 32, True),
    "vit_b16": ("ViT-B/16", 224, 5e-4, 32, True),
    "vit_l14": ("ViT-L/14", 224, 4e-4, 32, True),
    "vit_l14_336": ("ViT-L/14@336", 336, 2e-5, 1, True),
}
HAS_INIT_FROM = "init_from" in {f.name for f in dataclasses.fields(ModelConfig)}


def _preflight():
    spec = importlib.util.spec_from_file_location("slurm_preflight", SLURM / "preflight.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


preflight = _preflight()


def sbatch_header(script: Path) -> dict[str, str]:
    """`#SBATCH --key=value` lines -> {"key": "value"} (flags without a value -> "")."""
    out = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


def dry_run(script: Path, tmp_path: Path, *args: str, nodes: int | None = None,
            extra_env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `script` through the launcher without Slurm; returns the process and the srun argv."""
    head = sbatch_header(script)
    n = nodes or int(head["nodes"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(CLIP_DRY_RUN="1", CLIP_PREFLIGHT="0", CLIP_REPO=str(REPO), CLIP_RUNS_ROOT=str(tmp_path),
               CLIP_DATA="/data/wit/{00000..41407}.tar",
               SLURM_JOB_NAME=head["job-name"], SLURM_NNODES=str(n),
               SLURM_NTASKS=str(n * int(head["ntasks-per-node"])), SLURM_CPUS_PER_TASK=head["cpus-per-task"])
    if script.stem == "vit_l14_336":
        env["CLIP_INIT_FROM"] = str(tmp_path / "clip-vit_l14")
    env.update(extra_env or {})
    proc = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=30)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("dry run:")), "")
    return proc, shlex.split(line[len("dry run:"):])


def trainer_args(argv: list[str]) -> tuple[str, list[str]]:
    """(preset path, overrides) from the srun argv `... run.py --config PRESET --k=v ...`."""
    i = argv.index("--config")
    return argv[i + 1], argv[i + 2:]


def test_every_paper_model_has_a_script():
    assert {p.stem for p in SCRIPTS} == set(PAPER) | {"cpu_tiny"}
    for stem in [*PAPER, "cpu_tiny"]:
        assert (SLURM / "presets" / f"{stem}.yaml").is_file()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_passes_on_every_script():
    files = [str(p.relative_to(REPO)) for p in sorted(SLURM.glob("*.sh"))]
    proc = subprocess.run(["shellcheck", "-x", "--severity=style", *files], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_is_a_thin_wrapper_of_the_shared_launcher(script: Path):
    text = script.read_text()
    head = sbatch_header(script)
    # preemption and requeue: a warning signal to the batch shell, requeue allowed, and
    # batch output appended across attempts
    assert re.fullmatch(r"B:USR1@\d+", head["signal"]), head
    assert "requeue" in head and head["open-mode"] == "append"
    assert head["job-name"] == ("clip-cpu-tiny" if script.stem == "cpu_tiny" else f"clip-{script.stem}")
    assert 'source "${CLIP_REPO:-$clip_dir/..}/slurm/common.sh"' in text
    assert text.rstrip().endswith(f'clip_main {script.stem} "$@"')
    assert "srun" not in text.replace("# Everything else (srun,", "")  # launching lives in common.sh only


@pytest.mark.parametrize("stem", sorted(PAPER))
def test_paper_script_config_at_default_size(stem: str, tmp_path: Path):
    """The exact trainer arguments of the script, at its default node count, parse and fit."""
    if stem == "vit_l14_336" and not HAS_INIT_FROM:
        pytest.skip("the trainer's ModelConfig has no init_from yet (reported to the trainer's owner)")
    script = SLURM / f"{stem}.sh"
    proc, argv = dry_run(script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert argv[:2] == ["srun", "--kill-on-bad-exit=1"]
    head = sbatch_header(script)
    world = int(head["nodes"]) * int(head["ntasks-per-node"])
    assert head["gpus-per-node"] == head["ntasks-per-node"]  # one task per GPU
    preset, overrides = trainer_args(argv)
    plan = preflight.check(preset, overrides, world)
    cfg = plan.config
    name, px, lr, epochs, is_vit = PAPER[stem]
    assert cfg.model.name == name and name in list_models()
    assert get_config(cfg.model.name, **cfg.model.overrides).image_size == px
    assert cfg.optimizer.lr == pytest.approx(lr)
    assert cfg.optimizer.betas == ((0.9, 0.98) if is_vit else (0.9, 0.999))
    assert cfg.optimizer.eps == (1e-6 if is_vit else 1e-8)
    assert cfg.optimizer.weight_decay == 0.2 and cfg.schedule.warmup_steps == 2000
    assert (cfg.train.global_batch, cfg.train.epochs, cfg.train.precision) == (32768, epochs, "bf16")
    assert cfg.train.zero_stage >= 1 and plan.grad_accum == 1  # full contrastive batch per step
    assert cfg.data.samples_per_epoch == 400_000_000
    assert cfg.output_dir == str(tmp_path / head["job-name"])  # one run dir per job name
    assert cfg.data.sources[0].url == "/data/wit/{00000..41407}.tar"
    if stem == "rn50x64":
        assert cfg.model.grad_checkpointing and cfg.train.zero_stage >= 1


def test_rn50x64_on_the_papers_592_gpus(tmp_path: Path):
    """74 nodes x 8 cannot split 32,768: rejected with the arithmetic; the documented
    override is accepted."""
    script = SLURM / "rn50x64.sh"
    _, argv = dry_run(script, tmp_path, nodes=74)
    preset, overrides = trainer_args(argv)
    with pytest.raises(ValueError, match=r"32768.*592 x 64"):
        preflight.check(preset, overrides, 592)
    _, argv = dry_run(script, tmp_path, "--train.micro_batch=56", "--train.global_batch=33152", nodes=74)
    plan = preflight.check(*trainer_args(argv), 592)
    assert plan.grad_accum == 1 and plan.config.train.global_batch == 33152


def test_preflight_in_the_script_stops_a_bad_launch(tmp_path: Path):
    """With the check on (the default), a contradictory override stops the script before srun."""
    proc, argv = dry_run(SLURM / "vit_b32.sh", tmp_path, "--train.micro_batch=100",
                         extra_env={"CLIP_PREFLIGHT": "1"})
    assert proc.returncode == 2 and argv == []
    assert "must be a multiple of train.micro_batch" in proc.stderr or "divisible" in proc.stderr
    assert "nothing launched" in proc.stderr


def test_cpu_variant_uses_the_same_launcher(tmp_path: Path):
    proc, argv = dry_run(SLURM / "cpu_tiny.sh", tmp_path, "--train.max_steps=3")
    assert proc.returncode == 0, proc.stderr
    preset, overrides = trainer_args(argv)
    assert overrides[-1] == "--train.max_steps=3"  # the user's overrides come last and win
    cfg = preflight.check(preset, overrides, 2).config
    assert cfg.model.name in list_models() and cfg.train.precision == "fp32"
    assert cfg.total_steps() == 3


def test_vit_l14_336_requires_its_starting_checkpoint(tmp_path: Path):
    proc, _ = dry_run(SLURM / "vit_l14_336.sh", tmp_path, extra_env={"CLIP_INIT_FROM": ""})
    assert proc.returncode != 0 and "CLIP_INIT_FROM" in proc.stderr


def test_launcher_sets_rendezvous_and_fail_fast_settings(tmp_path: Path):
    """The environment every task inherits: printed by a dry run of common.sh's setup."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    env.update(CLIP_DRY_RUN="1", SLURM_JOB_ID="123456", SLURM_JOB_NAME="x", RANK="7", CLIP_RUNS_ROOT=str(tmp_path))
    code = (f'source {shlex.quote(str(SLURM / "common.sh"))}; clip_setup_paths; clip_setup_dist_env; '
            'echo "$MASTER_PORT ${RANK:-unset} $TORCH_NCCL_ASYNC_ERROR_HANDLING $CLIP_RUN_DIR $PWD"')
    out = subprocess.run(["bash", "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(20000 + 123456 % 20000), "unset", "1", str(tmp_path / "x"), str(REPO)]


def test_cluster_harness_skips_only_where_slurm_is_missing(monkeypatch):
    """No Slurm binaries and no install allowed: skip; CLIP_SLURM_REQUIRED=1 (CI): fail."""
    import slurm_cluster

    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: None)
    monkeypatch.setenv("CLIP_SLURM_NO_INSTALL", "1")
    monkeypatch.delenv("CLIP_SLURM_REQUIRED", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Slurm binaries missing"):
        with slurm_cluster.running_cluster():
            pass
    monkeypatch.setenv("CLIP_SLURM_REQUIRED", "1")
    with pytest.raises(pytest.fail.Exception, match="CLIP_SLURM_REQUIRED=1"):
        with slurm_cluster.running_cluster():
            pass


def test_presets_are_the_paper_base_plus_their_differences():
    """Each paper preset names slurm/presets/paper.yaml as its base and restates none of it."""
    import yaml

    from pretrain.config.loader import read_config_file

    base = yaml.safe_load((SLURM / "presets" / "paper.yaml").read_text())
    for stem in PAPER:
        own = yaml.safe_load((SLURM / "presets" / f"{stem}.yaml").read_text())
        assert own.pop("base") == "paper.yaml", stem
        for section, keys in own.items():
            for key, value in keys.items():
                assert (base.get(section) or {}).get(key, object()) != value, f"{stem}: {section}.{key} repeats the base"
        merged = read_config_file(SLURM / "presets" / f"{stem}.yaml")
        assert "base" not in merged and merged["train"]["global_batch"] == 32768
