# shellcheck shell=bash
# The one Slurm launcher behind every slurm/<model>.sh script (sourced, never run alone).
#
# A model script holds only its #SBATCH defaults and the call
#     clip_main <preset> "$@"
# which checks the run config against the allocation (slurm/preflight.py), then runs
# pretrain/run.py --config slurm/presets/<preset>.yaml as ONE srun TASK PER GPU (per node
# for the CPU variant), with the user's --key=value overrides appended, and handles the
# time-limit warning (USR1 -> checkpoint -> requeue) and fail-fast. Design: slurm/README.md.
#
# Environment (set before sbatch; sbatch exports it to the job):
#   CLIP_DATA        data.sources: shard pattern, manifest.json, or a YAML list of them
#   CLIP_RUNS_ROOT   parent of run dirs (default <repo>/runs)
#   CLIP_RUN_NAME    run dir name (default the job name: a requeued or resubmitted job
#                    with the same name finds its checkpoints and resumes)
#   CLIP_PYTHON      interpreter (default <repo>/.venv/bin/python if present, else python3)
#   CLIP_INIT_FROM   weights to start from (vit_l14_336: the finished ViT-L/14 run dir)
#   CLIP_SRUN_ARGS   extra srun arguments, word-split (e.g. "--cpu-bind=none")
#   CLIP_SRUN_WAIT   seconds srun waits for the other tasks once one has exited (300)
#   CLIP_PREFLIGHT=0 skip the one-process config check before srun (slurm/preflight.py)
#   CLIP_DRY_RUN=1   check the config and print the srun command; launch nothing

# The repository this file belongs to (the model script sourced it by its real path).
CLIP_REPO="${CLIP_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

clip__log() { printf '[clip-slurm %(%F %T)T] %s\n' -1 "$*"; }
clip__die() { clip__log "error: $*" >&2; exit 2; }

# Repository root, python, run dir and logs; cd to the repo (tasks inherit the cwd).
clip_setup_paths() {
    cd "$CLIP_REPO" || clip__die "cannot cd to CLIP_REPO=$CLIP_REPO"
    if [[ -z "${CLIP_PYTHON:-}" ]]; then
        if [[ -x "$CLIP_REPO/.venv/bin/python" ]]; then CLIP_PYTHON="$CLIP_REPO/.venv/bin/python"; else CLIP_PYTHON=python3; fi
    fi
    export PYTHONPATH="$CLIP_REPO${PYTHONPATH:+:$PYTHONPATH}"
    CLIP_RUN_NAME="${CLIP_RUN_NAME:-${SLURM_JOB_NAME:?not inside a Slurm job: submit with sbatch (or set CLIP_DRY_RUN=1 and SLURM_* to test)}}"
    CLIP_RUN_DIR="${CLIP_RUNS_ROOT:-$CLIP_REPO/runs}/$CLIP_RUN_NAME"
    CLIP_LOG_DIR="$CLIP_RUN_DIR/logs"
    mkdir -p "$CLIP_LOG_DIR"
    # Slurm counts requeues of this job id; per-rank logs of each attempt stay apart.
    CLIP_ATTEMPT="${SLURM_RESTART_COUNT:-0}"
}

# Rendezvous and communication settings shared by every task. A value the user exported
# before sbatch wins over these defaults (`: "${X:=default}"`).
clip_setup_dist_env() {
    if [[ "${CLIP_DRY_RUN:-0}" == 1 ]]; then
        MASTER_ADDR="${MASTER_ADDR:-dry-run-host}"
    else
        # The first node of the allocation hosts the rendezvous (TCPStore) on rank 0.
        local -a hosts
        mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
        MASTER_ADDR="${hosts[0]:?could not expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST}"
    fi
    # Derived from the job id: two jobs sharing a node do not collide, and a requeued
    # attempt (same id) uses the same port again.
    MASTER_PORT="$((20000 + ${SLURM_JOB_ID:-0} % 20000))"
    export MASTER_ADDR MASTER_PORT
    # Rank, local rank and world size come from each task's SLURM_PROCID / SLURM_LOCALID /
    # SLURM_NTASKS; stale torchrun-style values from the submitting shell would override them.
    unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE
    # A rank whose NCCL collective fails or times out tears its process down instead of
    # hanging, so srun --kill-on-bad-exit ends the whole step.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    # The collective timeout itself is the run config's train.dist_timeout_s (the presets
    # set it): a rank stuck in a collective with a dead or hung peer fails after it.
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_DISABLE ... are cluster-specific: export them
    # before sbatch when NCCL picks the wrong interface (slurm/README.md, "NCCL").
    # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch.
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}"
    fi
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
}

# CLIP_ARGS: the trainer's command-line overrides (launcher-owned ones first, so the
# user's own --key=value arguments, given after the script name, win).
clip_build_args() {
    CLIP_ARGS=("--output_dir=$CLIP_RUN_DIR")
    if [[ -n "${CLIP_DATA:-}" ]]; then CLIP_ARGS+=("--data.sources=$CLIP_DATA"); fi
    if [[ -n "${CLIP_INIT_FROM:-}" ]]; then CLIP_ARGS+=("--model.init_from=$CLIP_INIT_FROM"); fi
    CLIP_ARGS+=("$@")
}

clip__forward() {  # deliver signal $1 to every task: srun relays it to all of them
    if [[ -n "${CLIP_SRUN_PID:-}" ]] && kill -0 "$CLIP_SRUN_PID" 2>/dev/null; then
        kill -s "$1" "$CLIP_SRUN_PID" || true
    fi
}

clip__on_usr1() {
    CLIP_WARNED=1
    clip__log "USR1 (time limit or preemption ahead): asking the trainer to checkpoint and exit"
    clip__forward USR1
}

clip__on_term() {
    # scancel, Slurm's own preemption (which requeues a --requeue job by itself) or the time
    # limit: the tasks checkpoint at their next step boundary if KillWait/GraceTime allow and
    # exit 143 (pretrain/run.py); never requeue from here: a cancelled job stays cancelled.
    clip__log "TERM: forwarding to the tasks (they checkpoint and exit 143)"
    if [[ -z "${CLIP_SRUN_PID:-}" ]]; then exit 143; fi
    clip__forward TERM
}

clip__requeue() {
    clip__log "$1: requeueing job $SLURM_JOB_ID (the next attempt resumes from the newest complete checkpoint)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}

# Installed before the preflight check: an unhandled USR1 would kill the batch shell.
clip_install_traps() {
    CLIP_WARNED=0
    CLIP_SRUN_PID=""
    trap clip__on_usr1 USR1
    trap clip__on_term TERM
}

# Run the srun step in the background and wait for it: bash runs a trap only between
# commands, so a foreground srun would delay the warning until the step had ended.
clip_launch() {
    local preset="$1" job="${SLURM_JOB_ID:-dry-run}"
    local rank0_log="$CLIP_LOG_DIR/$job.$CLIP_ATTEMPT-0.log"
    local -a srun_cmd=(srun --kill-on-bad-exit=1 "--wait=${CLIP_SRUN_WAIT:-300}" --open-mode=append
        "--output=$CLIP_LOG_DIR/%j.$CLIP_ATTEMPT-%t.log")
    if [[ -n "${CLIP_SRUN_ARGS:-}" ]]; then
        # shellcheck disable=SC2206  # CLIP_SRUN_ARGS is a word list on purpose
        srun_cmd+=($CLIP_SRUN_ARGS)
    fi
    srun_cmd+=("$CLIP_PYTHON" -u "$CLIP_REPO/pretrain/run.py" --config "$preset" "${CLIP_ARGS[@]}")
    if [[ "${CLIP_DRY_RUN:-0}" == 1 ]]; then
        printf 'dry run:'; printf ' %q' "${srun_cmd[@]}"; printf '\n'
        return 0
    fi
    # The warning came while this attempt was still starting: nothing new to save.
    if (( CLIP_WARNED )); then clip__requeue "warned before launch"; fi
    clip__log "job $job attempt $CLIP_ATTEMPT: $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST," \
        "rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $CLIP_RUN_DIR, rank logs $CLIP_LOG_DIR/$job.$CLIP_ATTEMPT-*.log"
    "${srun_cmd[@]}" &
    CLIP_SRUN_PID=$!
    local rc
    while true; do
        rc=0
        wait "$CLIP_SRUN_PID" || rc=$?
        # > 128 with srun still alive: `wait` was interrupted by a trapped signal; keep waiting.
        if (( rc > 128 )) && kill -0 "$CLIP_SRUN_PID" 2>/dev/null; then continue; fi
        break
    done
    trap - USR1 TERM
    clip__log "srun exited with status $rc"
    # Requeue only when the warning came AND the trainer confirmed its checkpoint: a run
    # that finished its last step anyway, or failed, is not started again. A SIGTERM that
    # reached the tasks makes them exit 143 (checkpoint saved, not finished): Slurm owns
    # what happens next (requeue on preemption, cancel, time limit), so no requeue here.
    if (( CLIP_WARNED )) && (( rc == 0 )) && grep -q "preempted: checkpoint saved at step" "$rank0_log" 2>/dev/null; then
        clip__requeue "checkpoint saved"
    fi
    exit "$rc"
}

# Entry point of every model script: clip_main <preset name or .yaml path> [--key=value ...]
clip_main() {
    local preset="$1"
    shift
    [[ "$preset" == *.yaml ]] || preset="$CLIP_REPO/slurm/presets/$preset.yaml"
    [[ -f "$preset" ]] || clip__die "preset $preset not found"
    clip_setup_paths
    clip_setup_dist_env
    clip_build_args "$@"
    if [[ "${CLIP_DRY_RUN:-0}" != 1 ]]; then clip_install_traps; fi
    # One python process checks the config against this allocation before any task
    # starts: a wrong batch split fails here with one message, not on every rank.
    if [[ "${CLIP_PREFLIGHT:-1}" != 0 ]]; then
        "$CLIP_PYTHON" "$CLIP_REPO/slurm/preflight.py" --world-size "${SLURM_NTASKS:?SLURM_NTASKS unset}" \
            --config "$preset" -- "${CLIP_ARGS[@]}" || clip__die "preflight check failed (see above); nothing launched"
    fi
    clip_launch "$preset"
}
