#!/bin/bash
# RN50x64, the CLIP paper's largest ResNet: 448 px, global batch 32,768, 32 epochs, bf16,
# ZeRO-2 with gradient checkpointing (preset slurm/presets/rn50x64.yaml).
# 64 nodes x 8 GPUs by default (32,768 = 512 GPUs x 64, no accumulation). The paper used
# 592 GPUs, which do not divide 32,768: `sbatch --nodes=74 slurm/rn50x64.sh
# --train.micro_batch=56 --train.global_batch=33152` is the nearest exact split.
#   CLIP_DATA=/data/wit/manifest.json sbatch slurm/rn50x64.sh [--key=value ...]
#   sbatch --nodes=N --ntasks-per-node=G --gpus-per-node=G slurm/rn50x64.sh --train.micro_batch=M
# Everything else (srun, signals, requeue, NCCL, run dir, logs): slurm/common.sh, slurm/README.md.
#SBATCH --job-name=clip-rn50x64
#SBATCH --nodes=64
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
clip_main rn50x64 "$@"
