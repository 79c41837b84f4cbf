"""Train CLIP with DeepSpeed: parse -> set up the process group -> build -> fit.

    deepspeed --num_gpus 8 pretrain/run.py --config run.yaml --train.global_batch=4096
    torchrun --nproc_per_node 8 pretrain/run.py --config run.yaml
    srun python pretrain/run.py --config run.yaml        # one task per device, MASTER_ADDR/PORT set
    python pretrain/run.py --config run.yaml            # one process (CPU or one GPU)

Any `--section.key=value` after the config file overrides it (pretrain/config). The run
dir (`output_dir`) gets run_config.yaml, ds_config.json, git_sha.txt, checkpoints/,
metrics.jsonl, eval/ and the MLflow store; a run dir with a complete checkpoint resumes.
Exit codes: 0 done or preempted (checkpoint saved), 1 error, 3 too many non-finite steps.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

if __package__ in (None, ""):  # `deepspeed pretrain/run.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pretrain.config import load_config  # noqa: E402
from pretrain.train import distributed  # noqa: E402

log = logging.getLogger("pretrain.run")
EXIT_NONFINITE = 3


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="run config YAML (overrides follow as --key=value)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK wins when both are set")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    env = distributed.detect_env(args.local_rank)
    distributed.setup_logging(env.rank)
    try:
        cfg = load_config(args.config, overrides)
        cfg.validate(env.world_size)  # before the process group: a bad config fails fast everywhere
        from pretrain.train.precision import require_precision

        require_precision(cfg.train.precision)  # the device's own answer, not DeepSpeed's per-rank error
    except ValueError as exn:
        log.error("%s", exn)
        distributed.finish(2, synchronize=False)
    from pretrain.train.loop import NonFiniteError, fit

    try:
        device = distributed.init(env, cfg.train.dist_timeout_s)
        code = fit(cfg, env, device)
    except NonFiniteError as exn:  # every rank raises it after the same collective save
        log.error("%s", exn)
        distributed.finish(EXIT_NONFINITE)
    except BaseException:  # noqa: BLE001 - report, then leave without waiting for peers
        traceback.print_exc()
        distributed.finish(1, synchronize=False)
    distributed.finish(code)


if __name__ == "__main__":
    main()
