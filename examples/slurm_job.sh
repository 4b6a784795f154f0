#!/bin/bash
# A Slurm job that trains examples/benchmark.py, survives pre-emption and time limits,
# and requeues itself until training is done.
#
#   sbatch examples/slurm_job.sh --epochs 100          # extra flags go to the benchmark
#
# How it works:
# - Slurm sends SIGUSR1 to this batch shell 120 s before the time limit (--signal=B:...).
#   The shell forwards it to Python, whose checkpoint callback (--ckpt_signal USR1)
#   stops at the end of the running batch, makes sure the last completed epoch is on
#   disk, and exits with status 75.
# - Status 75: the script requeues the job (scontrol requeue; --requeue allows it). The
#   requeued job runs this script again; --ckpt_restart_mode auto resumes from
#   save/ckpts/last and re-runs the interrupted epoch. Training is bit-identical to an
#   uninterrupted run.
# - Status 0: training is done (a finished run restarted trains nothing more).
# - Anything else: a real failure; the job ends and is not requeued.
# - A node failure or kill -9 gives no warning: the job (requeued by Slurm if the
#   cluster does so, or resubmitted by hand) resumes from the last saved epoch.
# - If the cluster pre-empts with SIGTERM (PreemptMode=REQUEUE plus GraceTime), use
#   --signal=B:TERM@120 and CKPT_SIGNAL=TERM instead.
#
#SBATCH --job-name=candle-benchmark
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=candle-benchmark-%j.out

set -u

PREEMPTED=75                                   # candle_ckpt.core.preemption.PREEMPTED_EXIT_STATUS
PYTHON=${PYTHON:-python3}
CKPT_DIR=${CKPT_DIR:-${SLURM_SUBMIT_DIR:-.}/save}
CKPT_SIGNAL=${CKPT_SIGNAL:-USR1}
MAX_REQUEUES=${MAX_REQUEUES:-50}               # stop requeueing a job that never finishes
BENCHMARK=${BENCHMARK:-${SLURM_SUBMIT_DIR:-.}/examples/benchmark.py}

echo "$(date -u '+%F %T') job ${SLURM_JOB_ID:-none} start (restart count ${SLURM_RESTART_COUNT:-0})"

"$PYTHON" "$BENCHMARK" --ckpt_directory "$CKPT_DIR" --ckpt_restart_mode auto \
    --ckpt_signal "$CKPT_SIGNAL" "$@" &
pid=$!
# Bash runs a trap only between commands, so Python runs in the background and the
# shell waits for it; the trap forwards the signal and waiting resumes.
trap 'echo "$(date -u "+%F %T") $CKPT_SIGNAL received: forwarding to $pid"; kill -s "$CKPT_SIGNAL" "$pid"' "$CKPT_SIGNAL"
while true; do
    wait "$pid"
    status=$?
    kill -0 "$pid" 2>/dev/null || break        # wait was only interrupted by the trap
done
echo "$(date -u '+%F %T') training exited with status $status"

if [ "$status" -eq "$PREEMPTED" ]; then
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        echo "pre-empted, not under Slurm: run this script again to continue"
    elif [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
        echo "pre-empted, but requeued ${SLURM_RESTART_COUNT} times already: giving up"
        exit "$status"
    else
        echo "pre-empted: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 0
fi
exit "$status"
