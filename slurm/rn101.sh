#!/bin/bash
# RN101 as trained in the CLIP paper: 224 px, global batch 32,768, 32 epochs, lr 5e-4 (preset slurm/presets/rn101.yaml).
#   CLIP_DATA=/data/wit/manifest.json sbatch slurm/rn101.sh [--key=value ...]
#   sbatch --nodes=N --ntasks-per-node=G --gpus-per-node=G slurm/rn101.sh --train.micro_batch=M
# Everything else (srun, signals, requeue, NCCL, run dir, logs): slurm/common.sh, slurm/README.md.
#SBATCH --job-name=clip-rn101
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
clip_dir="$(dirname "$0")"  # in a job, $0 is Slurm's spool copy: use the submitted path
if [[ -n "${SLURM_JOB_ID:-}" ]]; then clip_dir="$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")"; fi
# shellcheck source=slurm/common.sh
source "${CLIP_REPO:-$clip_dir/..}/slurm/common.sh"
clip_main rn101 "$@"
