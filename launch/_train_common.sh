# Shared body of the training sbatch scripts (sourced; STAGE_CONFIG is set by the caller).
#
# Environment overrides (all optional except DATA):
#   DATA            latent shard folder(s) / index.json / globs, comma-separated        (required)
#   MODEL           model config (model/2b, model/5b, model/tiny or a YAML path)        [model/5b]
#   RUN_DIR         run dir; resumes automatically from its checkpoints/latest          [runs/<stage>]
#   NODES           nodes                                                               [$SLURM_JOB_NUM_NODES]
#   GPUS_PER_NODE   processes per node                                                  [$SLURM_GPUS_ON_NODE or 8]
#   LAUNCHER        torchrun (srun starts one torchrun per node, c10d rendezvous),
#                   srun (one task per GPU), or deepspeed (generated hostfile)          [torchrun]
#   EXTRA_ARGS      more key=value overrides, e.g. "parallel.sequence_parallel=2 train.lr=5e-5"
#   PYTHON          python interpreter                                                  [python]
#   MASTER_PORT     rendezvous port                                                     [derived from the job id]
# Preemption: slurm sends SIGUSR1 to this script (--signal=B:USR1@300); the trap asks the trainer (via the
# run dir's STOP file) to checkpoint and stop at the end of its current step; when it leaves REQUEUE behind,
# the job is requeued with scontrol and resumes from the checkpoint.
set -uo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO" || exit 1
: "${STAGE_CONFIG:?the sbatch script must set STAGE_CONFIG}"
: "${DATA:?set DATA to the latent shard folder(s), e.g. DATA=/data/latents/lq}"
MODEL=${MODEL:-model/5b}
STAGE=$(basename "$STAGE_CONFIG" .yaml)
RUN_DIR=${RUN_DIR:-runs/$STAGE}
NODES=${NODES:-${SLURM_JOB_NUM_NODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
LAUNCHER=${LAUNCHER:-torchrun}
PYTHON=${PYTHON:-python}
JOB_ID=${SLURM_JOB_ID:-$$}
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((10000 + JOB_ID % 20000))}  # below Linux's ephemeral ports (32768-60999)
WORLD=$((NODES * GPUS_PER_NODE))
export MASTER_ADDR MASTER_PORT OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
mkdir -p "$RUN_DIR" logs

read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
# One run dir per job: the preemption trap writes STOP into $RUN_DIR, and array tasks would share it.
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    echo "the training scripts are not array jobs (every task would train into $RUN_DIR); submit one job per run" >&2
    exit 2
fi
for arg in ${EXTRA[@]+"${EXTRA[@]}"}; do
    case "$arg" in
      train.run_dir=*) echo "set RUN_DIR instead of $arg in EXTRA_ARGS (the preemption trap writes RUN_DIR/STOP)" >&2
                       exit 2 ;;
    esac
done
# ${A[@]+"${A[@]}"}: an empty array under `set -u` is an error in bash <= 4.3 (RHEL/CentOS 7)
TRAIN_ARGS=(--config "$MODEL" --config "$STAGE_CONFIG" "train.run_dir=$RUN_DIR" "data.shards=[$DATA]" ${EXTRA[@]+"${EXTRA[@]}"})
echo "[$(date -Is)] job $JOB_ID stage $STAGE: $NODES node(s) x $GPUS_PER_NODE = $WORLD processes, launcher $LAUNCHER," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"

# The markers belong to this job: one left by an earlier job would stop this one at once (STOP) or requeue it
# after a failure that happened before the trainer got to clear it (REQUEUE), again and again.
rm -f "$RUN_DIR/STOP" "$RUN_DIR/REQUEUE"
# the trainer keeps markers written after this (by the trap below while it starts up) and removes older ones
export COGVX_JOB_START=$(date +%s)
# From here on a preemption signal is a request to checkpoint and stop (the trainer keeps a STOP written while it
# starts up, and stops at its first step).
trap 'echo "[$(date -Is)] preemption signal: asking the trainer to checkpoint and stop"; touch "$RUN_DIR/STOP"' USR1

# A bad config fails here, before any GPU process starts.
if ! WORLD_SIZE=$WORLD "$PYTHON" -m cogvx_ds.train "${TRAIN_ARGS[@]}" --print-config > "$RUN_DIR/resolved_config.yaml"; then
    echo "config check failed (see above); nothing was launched" >&2
    exit 2
fi

case "$LAUNCHER" in
  torchrun)
    # Since Slurm 22.05 srun no longer inherits the job's --cpus-per-task: one agent per node gets them all.
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run \
        --nnodes="$NODES" --nproc_per_node="$GPUS_PER_NODE" --rdzv_backend=c10d \
        --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$JOB_ID" -m cogvx_ds.train "${TRAIN_ARGS[@]}" &
    ;;
  srun)  # one task per GPU; cogvx_ds reads RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/NTASKS/LOCALID
    # --ntasks too: the job's own SLURM_NTASKS (one per node) would otherwise override --ntasks-per-node; each
    # task gets its share of the node's CPUs (the job's --cpus-per-task is per node here: one task per node)
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$(( SLURM_CPUS_PER_TASK / GPUS_PER_NODE > 0 ? SLURM_CPUS_PER_TASK / GPUS_PER_NODE : 1 ))
    srun --nodes="$NODES" --ntasks="$WORLD" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 "$PYTHON" \
        -m cogvx_ds.train "${TRAIN_ARGS[@]}" &
    ;;
  deepspeed)
    scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | sed "s/\$/ slots=$GPUS_PER_NODE/" > "$RUN_DIR/hostfile"
    # deepspeed starts the other nodes' ranks over ssh/pdsh, which pass on only the variables of its env file:
    # the user's (~/.deepspeed_env and ./.deepspeed_env, or DS_ENV_FILE), plus COGVX_JOB_START (the trainer keeps
    # a STOP written by the trap above while it started up only if it knows when the job started)
    # The merged file goes to a private temporary folder (the user's file may hold secrets), by absolute path
    # (deepspeed looks a relative DS_ENV_FILE up under ~ first), removed when this script exits.
    user_env=${DS_ENV_FILE:-.deepspeed_env}
    case "$user_env" in /*) env_sources=("$user_env") ;; *) env_sources=("$HOME/$user_env" "./$user_env") ;; esac
    DS_ENV_TMP=$(umask 077 && mktemp -d)
    trap 'rm -rf "$DS_ENV_TMP"' EXIT
    {
      for f in "${env_sources[@]}"; do [ -f "$f" ] && sed -e '$a\' "$f" | grep -v '^[[:space:]]*$'; done
      echo "COGVX_JOB_START=$COGVX_JOB_START"
    } > "$DS_ENV_TMP/deepspeed_env"
    DS_ENV_FILE="$DS_ENV_TMP/deepspeed_env" deepspeed --hostfile "$RUN_DIR/hostfile" --master_addr "$MASTER_ADDR" \
        --master_port "$MASTER_PORT" --module cogvx_ds.train "${TRAIN_ARGS[@]}" &
    ;;
  *)
    echo "LAUNCHER must be torchrun, srun or deepspeed, got '$LAUNCHER'" >&2
    exit 2
    ;;
esac
PID=$!
# `wait` returns early when a trapped signal arrives; keep waiting until the launcher itself has exited.
while true; do
    wait "$PID"
    RC=$?
    if ! kill -0 "$PID" 2>/dev/null; then
        # a wait cut short by the trap returns 128+signal; the launcher's own status is still there to collect
        if [ "$RC" -gt 128 ]; then wait "$PID"; RC2=$?; [ "$RC2" -ne 127 ] && RC=$RC2; fi
        break
    fi
done

if [ -f "$RUN_DIR/REQUEUE" ]; then
    echo "[$(date -Is)] checkpoint written ($(cat "$RUN_DIR/REQUEUE")); requeueing job $JOB_ID"
    if ! scontrol requeue "$JOB_ID"; then
        # not 0: an `afterok` dependency would start the next stage on a run without final_model/
        echo "[$(date -Is)] scontrol requeue failed: resubmit this script to resume from the checkpoint" >&2
        exit 75
    fi
    exit 0
fi
echo "[$(date -Is)] launcher exited with $RC"
exit "$RC"
