# shellcheck shell=bash disable=SC2034  # sets variables for the script that sources it
# Shared by train.sbatch and train_multinode.sbatch (sourced from the job's working directory, which
# must be the repository root). Not a job script itself.
#
# Knobs (environment variables; sbatch passes the submitting shell's environment to the job):
#   DCGAN_ENV_SETUP      shell code run before launching; default: `source .venv/bin/activate` when
#                        the repo has a .venv. E.g. 'module load cuda/12.4 && conda activate dcgan'.
#   DCGAN_LAUNCH_PREFIX  a wrapper put in front of `accelerate launch`, e.g. a container:
#                        "apptainer exec --nv --bind $PWD dcgan.sif" (or singularity exec ...); split on spaces.
#   DCGAN_PROCS_PER_NODE training processes per node; default: the node's GPUs, else (CPU-only nodes,
#                        gloo) --ntasks-per-node for the one-node script, else 1.
#   DCGAN_MASTER_PORT    rendezvous port; default derived from the job id so jobs sharing a node differ.
#   DCGAN_TRAIN_SCRIPT   the script handed to accelerate; default launch/train.py.
#   DCGAN_MAX_REQUEUES   how many times a preempted job requeues itself (default 20); past that it stops and
#                        says how to continue (a job preempted in a loop would otherwise requeue forever).
#   DCGAN_MAX_RESTARTS   in-job restarts (default 0): when a training process fails or is killed, the launchers
#                        restart every node's processes in place (torchrun's elastic agent), up to this many
#                        times; they resume from checkpoints/latest. Requeueing on
#                        preemption is unaffected: the two combine.
#   DCGAN_STAGE_DIR      node-local directory (e.g. /local/scratch/$USER): before training, each node copies the
#                        config's store (data.name=store) there with `dcgan-prepare --stage`, verifies the copy
#                        (sha256) and trains from it; a verified copy left by an earlier job is reused.

die() { echo "error: $*" >&2; exit 2; }

[ $# -ge 1 ] || die "usage: sbatch $DCGAN_SBATCH_NAME CONFIG [section.key=value ...]"
CONFIG=$1; shift
TRAIN_SCRIPT=${DCGAN_TRAIN_SCRIPT:-launch/train.py}
[ -f "$TRAIN_SCRIPT" ] || die "$TRAIN_SCRIPT not found in $PWD: submit from the repository root (or sbatch --chdir=REPO)"
[ -f "$CONFIG" ] || die "config $CONFIG not found (relative to $PWD)"

set +u   # activation scripts (conda, lmod) often read unset variables
eval "${DCGAN_ENV_SETUP:-if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi}"
set -u
command -v accelerate >/dev/null || die "accelerate not on PATH: set DCGAN_ENV_SETUP to activate the environment"

# GPUs on each node: what SLURM allocated, else what CUDA_VISIBLE_DEVICES shows, else nvidia-smi (whole-node jobs).
gpus_per_node() {
    local n=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
    n=${n##*:}                                  # "a100:4" -> 4
    if [ -z "$n" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        n=$(tr "," "\n" <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true)
    fi
    if [ -z "$n" ] && command -v nvidia-smi >/dev/null; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    echo "${n:-0}"
}
GPUS=$(gpus_per_node)

# The run directory follows the job id: a requeued job keeps its id, so it finds its own checkpoints.
RUN_ARGS=()
case " $* " in *" run.dir="* | *" run.name="*) ;; *) RUN_ARGS+=("run.dir=runs/slurm-$SLURM_JOB_ID") ;; esac
# Resume: continue from checkpoints/latest when the job is requeued (a fresh run starts from step 0).
RUN_ARGS+=("train.resume=auto")

MASTER_PORT=${DCGAN_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
MAX_REQUEUES=${DCGAN_MAX_REQUEUES:-20}
case "$MAX_REQUEUES" in '' | *[!0-9]*) die "DCGAN_MAX_REQUEUES=$MAX_REQUEUES: use a whole number (0 = never requeue)" ;; esac
MAX_RESTARTS=${DCGAN_MAX_RESTARTS:-0}
case "$MAX_RESTARTS" in '' | *[!0-9]*) die "DCGAN_MAX_RESTARTS=$MAX_RESTARTS: use a whole number (0 = no in-job restarts)" ;; esac
RESTART_ARGS=
[ "$MAX_RESTARTS" = 0 ] || RESTART_ARGS="--max_restarts $MAX_RESTARTS --monitor_interval 1"
# An array task is requeued by <array id>_<task id>: `scontrol requeue` of the array's own id requeues every task.
REQUEUE_ID=$SLURM_JOB_ID
[ -z "${SLURM_ARRAY_JOB_ID:-}" ] || REQUEUE_ID=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
DCGAN_LAUNCH_PREFIX=${DCGAN_LAUNCH_PREFIX:-}

# Preemption. SLURM sends SIGUSR1 to this shell (--signal=B:USR1@grace) before the time limit;
# torchrun forwards SIGTERM to its workers but not SIGUSR1, so the launcher gets SIGTERM. The trainer
# then writes a checkpoint and exits 75; the job requeues itself (same id, same run dir, resume=auto).
# torchrun allows workers 30 s after SIGTERM before SIGKILL. A SIGTERM to this shell (scancel, or
# SLURM's own preemption, which requeues by itself) is passed on too, but never requeues here.
GOT_USR1=0; GOT_TERM=0; LAUNCHER_PID=
stop_training() { kill -TERM "$LAUNCHER_PID" 2>/dev/null || true; }   # train_multinode.sbatch redefines it
on_usr1() { GOT_USR1=1; echo "[slurm] SIGUSR1: time limit near; SIGTERM to the trainer"; [ -z "$LAUNCHER_PID" ] || stop_training; }
on_term() { GOT_TERM=1; echo "[slurm] SIGTERM: stopping the trainer"; [ -z "$LAUNCHER_PID" ] || stop_training; }
trap on_usr1 USR1
trap on_term TERM

# run_launcher CMD...: run CMD in the background (so the traps above fire at once), wait for it,
# requeue when it was preempted, and exit with its status.
run_launcher() {
    local status=143                                  # signalled while the environment was loading
    if [ "$GOT_USR1$GOT_TERM" = 00 ]; then
        "$@" &
        LAUNCHER_PID=$!
        status=0; wait "$LAUNCHER_PID" || status=$?
        while kill -0 "$LAUNCHER_PID" 2>/dev/null; do   # wait returns early when a trapped signal arrives
            status=0; wait "$LAUNCHER_PID" || status=$?
        done
    fi
    # accelerate/torchrun report any worker failure as 1, so after our SIGTERM any failure means
    # "not finished"; 75 itself only reaches us from a launcher that passes statuses through.
    if [ "$GOT_TERM" = 0 ] && { [ "$status" = 75 ] || { [ "$GOT_USR1" = 1 ] && [ "$status" != 0 ]; }; }; then
        if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
            echo "[slurm] training interrupted (status $status); job $REQUEUE_ID was requeued ${SLURM_RESTART_COUNT:-0}" \
                "time(s), the cap (DCGAN_MAX_REQUEUES=$MAX_REQUEUES): not requeueing. Its checkpoint is kept:" \
                "submit again with the same run.dir to continue (train.resume=auto)"
        else
            echo "[slurm] training interrupted (status $status): requeueing job $REQUEUE_ID"
            scontrol requeue "$REQUEUE_ID"
        fi
    fi
    echo "[slurm] launcher exited with status $status"
    exit "$status"
}

# Staging (DCGAN_STAGE_DIR): one copy per node, verified, before any training process starts; the training
# arguments then end with data.root=<the copy> (after the user's, so it wins).
STAGE_ARGS=()
if [ -n "${DCGAN_STAGE_DIR:-}" ]; then
    STAGE_SRC=$($DCGAN_LAUNCH_PREFIX python -c '
import sys
from dcgan_dist.recipe import load_config
from dcgan_dist.errors import UserError
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except UserError as e:
    sys.exit(f"error: {e}")
print(cfg.data.root if cfg.data.name == "store" else "")' "$CONFIG" "$@") || exit 2
    [ -n "$STAGE_SRC" ] || die "DCGAN_STAGE_DIR is set but the config does not train from a store (data.name=store)"
    STAGE_DEST=$DCGAN_STAGE_DIR/$(basename "$STAGE_SRC")
    echo "[slurm] staging $STAGE_SRC to $STAGE_DEST on each of ${SLURM_NNODES:-1} node(s)"
    # shellcheck disable=SC2086  # the prefix splits on spaces, by design
    srun --nodes="${SLURM_NNODES:-1}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        $DCGAN_LAUNCH_PREFIX dcgan-prepare --stage "$STAGE_SRC" "$STAGE_DEST" || die "staging $STAGE_SRC failed (above)"
    STAGE_ARGS=("data.root=$STAGE_DEST")
fi

echo "[slurm] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
    "$TRAIN_SCRIPT --config $CONFIG ${RUN_ARGS[*]} $* ${STAGE_ARGS[*]}"
