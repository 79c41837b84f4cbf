"""Check a Slurm launch before any task starts, and print its plan.

slurm/common.sh runs this once in the batch step: the preset plus the launcher's and the
user's `--key=value` overrides must parse as a run config (pretrain.config, the trainer's
own loader) and fit the allocation (global batch divisible by tasks x micro-batch). A bad
combination then fails with one clear message instead of on every rank of a large job.

    python slurm/preflight.py --world-size 512 --config slurm/presets/rn50x64.yaml -- \
        --output_dir=runs/x --data.sources=/data/{00000..41407}.tar
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from pretrain.config import RunConfig, load_config  # noqa: E402


@dataclass
class Plan:
    config: RunConfig
    world_size: int

    @property
    def grad_accum(self) -> int:
        return self.config.grad_accum(self.world_size)

    def describe(self) -> str:
        c, t = self.config, self.config.train
        lines = [
            f"model {c.model.name}{f' {c.model.overrides}' if c.model.overrides else ''}, "
            f"grad_checkpointing={c.model.grad_checkpointing}",
            f"world {self.world_size} x micro-batch {t.micro_batch} x accumulation {self.grad_accum} "
            f"= global batch {t.global_batch}",
            f"{t.precision}, ZeRO-{t.zero_stage}{' + optimizer offload' if t.offload_optimizer else ''}",
            f"{c.steps_per_epoch()} steps/epoch x {t.epochs} epochs -> {c.total_steps()} steps; "
            f"checkpoint every {c.checkpoint.every_steps or 'end only'}",
            f"run dir {c.output_dir}",
        ]
        if self.grad_accum > 1:
            # Accumulation keeps the optimizer batch but not the contrastive one: each
            # micro-step only sees world x micro-batch negatives.
            lines.append(f"note: contrastive batch per micro-step is {self.world_size * t.micro_batch}, "
                         f"not {t.global_batch} (gradient accumulation {self.grad_accum})")
        return "\n".join(f"preflight: {line}" for line in lines)


def check(config: str | Path, overrides: list[str], world_size: int) -> Plan:
    """The run config a launch would use, validated for `world_size` tasks (ValueError if not)."""
    cfg = load_config(config, overrides)
    cfg.validate(world_size)
    return Plan(cfg, world_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, required=True, help="tasks in the allocation (SLURM_NTASKS)")
    parser.add_argument("--config", required=True, help="the preset YAML")
    parser.add_argument("overrides", nargs="*", help="--key=value overrides, after --")
    args = parser.parse_args(argv)
    try:
        plan = check(args.config, args.overrides, args.world_size)
    except ValueError as exn:
        print(f"preflight: {args.config} with {args.world_size} tasks: {exn}", file=sys.stderr)
        return 2
    print(plan.describe(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
