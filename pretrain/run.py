"""Train CLIP with DeepSpeed: parse -> set up the process group -> build -> fit.

    deepspeed --num_gpus 8 pretrain/run.py --config run.yaml --train.global_batch=4096
    torchrun --nproc_per_node 8 pretrain/run.py --config run.yaml
    srun python pretrain/run.py --config run.yaml        # one task per device, MASTER_ADDR/PORT set
    python pretrain/run.py --config run.yaml            # one process (CPU or one GPU)

Any `--section.key=value` after the config file overrides it (pretrain/config). The run
dir (`output_dir`) gets run_config.yaml, ds_config.json, git_sha.txt, checkpoints/,
metrics.jsonl, eval/ and the MLflow store; a run dir with a complete checkpoint resumes.
Exit codes (pretrain/train/preempt.py):
  0    done, or preempted by SIGUSR1 (Slurm's time-limit warning) after saving a checkpoint
       (slurm/common.sh requeues on 0 plus the log line "preempted: checkpoint saved at step N")
  143  preempted by SIGTERM (scancel, Slurm preemption or time limit, `kill`, a launcher
       shutting down) after saving a checkpoint: not finished, so a supervisor that restarts
       failed jobs (Kubernetes, systemd, torchrun --max-restarts, slurm.conf RequeueExit=143)
       restarts it and the next start resumes; Slurm itself requeues a preempted `--requeue`
       job and keeps a cancelled one cancelled, whatever the code
  1    error; 2 bad config; 3 too many non-finite steps (after a checkpoint of the last good
       state)
The preemption signal may reach any process of the job (ranks, DataLoader workers, the
launcher): workers ignore it, the ranks agree on it at the next step boundary, save, exit.
Under the `deepspeed` launcher a SIGTERM to the launcher also ends the ranks (SIGTERM, then
SIGKILL after 30 s: the step plus the save must fit), and the launcher's own exit code is 1
(or -15): only the ranks' log line says that the checkpoint was saved.
Credentials in URLs (userinfo, presigned query strings) are masked in every log line and in
what goes to MLflow (pretrain/redact.py); run_config.yaml in the run dir keeps them as given.
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
from pretrain.redact import install_log_redaction, redact  # noqa: E402
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
    install_log_redaction()
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
        sys.stderr.write(redact(traceback.format_exc()))
        distributed.finish(1, synchronize=False)
    distributed.finish(code)


if __name__ == "__main__":
    main()
