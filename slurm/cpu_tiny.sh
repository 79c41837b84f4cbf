#!/bin/bash
# The CPU variant of the launcher: a tiny ResNet on 2 nodes x 1 task, gloo (preset
# slurm/presets/cpu_tiny.yaml). Same slurm/common.sh as the GPU scripts; only the #SBATCH
# sizes and the preset differ. Used by tests/test_slurm_jobs.py on a local 2-node cluster.
#   CLIP_DATA=/data/shards/{00000..00003}.tar sbatch slurm/cpu_tiny.sh [--key=value ...]
#SBATCH --job-name=clip-cpu-tiny
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
clip_dir="$(dirname "$0")"  # in a job, $0 is Slurm's spool copy: use the submitted path
if [[ -n "${SLURM_JOB_ID:-}" ]]; then clip_dir="$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")"; fi
# shellcheck source=slurm/common.sh
source "${CLIP_REPO:-$clip_dir/..}/slurm/common.sh"
clip_main cpu_tiny "$@"
