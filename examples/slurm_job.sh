#!/bin/bash
# A Slurm job that trains examples/benchmark.py, survives pre-emption and time limits,
# and requeues itself until training is done.
#
#   sbatch examples/slurm_job.sh --epochs 100          # extra flags go to the benchmark
#
# Submit from the repository's top directory: sbatch runs a copy of this script, so the
# repository is found as the submit directory (or the script's parent when run without
# sbatch; REPO overrides). Python is $PYTHON if set, else the repository's .venv (the
# README's setup), else python3 if it can import candle_ckpt.
#
# How it works:
# - Slurm sends SIGUSR1 to this batch shell 120 s before the time limit (--signal=B:...).
#   The shell forwards it to Python, whose checkpoint callback (--ckpt_signal USR1)
#   stops at the end of the running batch, makes sure the last completed epoch is on
#   disk (with --ckpt_save_steps N: saves that batch), and exits with status 75.
# - Status 75: the script requeues the job (scontrol requeue; --requeue allows it). The
#   requeued job runs this script again; --ckpt_restart_mode auto resumes from
#   save/ckpts/last and re-runs the interrupted epoch (or, from a step checkpoint, goes
#   on after its batch). Training is bit-identical to an uninterrupted run.
# - Status 0: training is done (a finished run restarted trains nothing more).
# - Anything else: a real failure; the job ends and is not requeued.
# - A node failure or kill -9 gives no warning: the job (requeued by Slurm if the
#   cluster does so, or resubmitted by hand) resumes from the last saved epoch.
# - Without a signal (a cluster that sends none, or a job submitted without --signal),
#   add --ckpt_walltime_margin SECONDS: the job asks squeue for its end and stops at the
#   last epoch end where one more epoch and a save would not fit, with status 75.
# - If the cluster pre-empts with SIGTERM (PreemptMode=REQUEUE plus GraceTime), use
#   --signal=B:TERM@120 and CKPT_SIGNAL=TERM instead.
# - With no --signal at all (delete the #SBATCH --signal line), set CKPT_SIGNAL=TERM and
#   pass --ckpt_save_steps: Slurm's SIGTERM at the time limit then saves the running
#   batch, which must end and save before the SIGKILL that follows after KillWait
#   (30 s by default; `scontrol show config | grep KillWait`).
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

PREEMPTED=75                                   # candle_ckpt.core.run.preemption.PREEMPTED_EXIT_STATUS
if [ -n "${SLURM_SUBMIT_DIR:-}" ]; then
    REPO=${REPO:-$SLURM_SUBMIT_DIR}
else
    REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
fi
CKPT_DIR=${CKPT_DIR:-${SLURM_SUBMIT_DIR:-.}/save}
CKPT_SIGNAL=${CKPT_SIGNAL:-USR1}
MAX_REQUEUES=${MAX_REQUEUES:-50}               # stop requeueing a job that never finishes
BENCHMARK=${BENCHMARK:-$REPO/examples/benchmark.py}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then
        PYTHON=$REPO/.venv/bin/python
    elif python3 -c 'import candle_ckpt' 2>/dev/null; then
        PYTHON=python3
    else
        echo "no Python with candle_ckpt: $REPO/.venv/bin/python does not exist and python3 cannot import candle_ckpt; set PYTHON=/path/to/bin/python (or submit from the repository's top, or set REPO)" >&2
        exit 2
    fi
fi

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
