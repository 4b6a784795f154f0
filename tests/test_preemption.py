"""Pre-emption (ckpt_signal): the batch system's warning signal arrives mid-epoch; the
job keeps its last completed epoch, exits 75, and the requeued job ends bit-identical."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from keras_helpers import assert_same_state, job_command, run_job

import candle_ckpt
from candle_ckpt.core.run.preemption import PREEMPTED_EXIT_STATUS

keras = pytest.importorskip("keras")

# Saves epochs 2, 4, 6 only: epoch 3 is complete but not on disk when epoch 4 is cut.
SPARSE = (
    "--epochs",
    "6",
    "--ckpt_save_interval",
    "2",
    "--ckpt_save_best",
    "false",
    "--ckpt_signal",
    "USR1",
)


def final_model(ckpt_dir, epoch=6):
    return os.path.join(ckpt_dir, "ckpts", "epochs", "%03d" % epoch, "model.h5")


def usr1_when_paused(command, env=None):
    """Start `command`; when it prints PAUSED (keras_job.py --pause_at), send SIGUSR1
    to the process started; return (exit status, the rest of stdout, stderr)."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for line in process.stdout:
            if line.startswith("PAUSED"):
                os.kill(process.pid, signal.SIGUSR1)
                break
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    return process.returncode, stdout, stderr


@pytest.mark.slow
def test_usr1_mid_epoch_4_saves_epoch_3_exits_75_and_the_requeued_job_is_exact(tmp_path):
    reference, preempted = tmp_path / "reference", tmp_path / "preempted"
    run_job(reference, *SPARSE)
    status, _, stderr = usr1_when_paused(job_command(preempted, *SPARSE, "--pause_at", "4:2"))
    assert status == PREEMPTED_EXIT_STATUS, stderr[-3000:]
    log = open(preempted / "ckpt.log").read()
    assert (
        "PRE-EMPTED by SIGUSR1 at the end of epoch 4, batch 3: training stopped, the "
        "partial epoch will be re-run; epoch 3 saved now; exiting with status 75"
    ) in log
    assert "epoch 3 saved (pre-emption)" in log
    assert os.readlink(preempted / "ckpts" / "last") == "epochs/003"
    assert sorted(os.listdir(preempted / "ckpts" / "epochs")) == ["002", "003"]
    assert not os.path.exists(preempted / "ckpts" / "work")

    resumed = run_job(preempted, *SPARSE)
    assert "restarted from epoch 3" in resumed.stderr
    assert_same_state(final_model(reference), final_model(preempted))


# -- in process: the signal sent by a callback to its own process ----------------------


class SignalAt(keras.callbacks.Callback):
    """Sends `signum` to this process after batch `batch` of 1-based epoch `epoch`."""

    def __init__(self, epoch, batch, signum):
        super().__init__()
        self.point, self.signum = (epoch, batch), signum

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch + 1) == self.point:
            os.kill(os.getpid(), self.signum)


def preempted_fit(tmp_path, at, signum, **extra):
    """Fit 4 epochs of 4 batches, signalled at `at`; return (exit status, ckpt.log)."""
    params = {
        "ckpt_directory": str(tmp_path / "save"),
        "epochs": 4,
        "ckpt_save_best": False,
        "ckpt_signal": signal.Signals(signum).name[3:],
        **extra,
    }
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mean_squared_error")
    x = np.random.default_rng(0).standard_normal((64, 4)).astype("float32")
    ckpt = candle_ckpt.CandleCheckpointCallback(params, verbose=False)
    before = signal.getsignal(signum)
    with pytest.raises(SystemExit) as exited:
        model.fit(
            x,
            x[:, :1],
            batch_size=16,
            epochs=4,
            shuffle=False,
            verbose=0,
            callbacks=[ckpt, SignalAt(*at, signum)],
        )
    assert signal.getsignal(signum) == before, "the previous handler is put back"
    log_file = os.path.join(params["ckpt_directory"], "ckpt.log")
    return exited.value.code, open(log_file).read() if os.path.exists(log_file) else ""


def test_term_when_the_last_epoch_is_already_saved(tmp_path):
    status, log = preempted_fit(tmp_path, (3, 2), signal.SIGTERM)
    assert status == 75
    assert (
        "PRE-EMPTED by SIGTERM at the end of epoch 3, batch 3: training stopped, the "
        "partial epoch will be re-run; epoch 2 is already on disk"
    ) in log
    assert os.readlink(tmp_path / "save" / "ckpts" / "last") == "epochs/002"


def test_signal_in_the_first_epoch_saves_nothing(tmp_path):
    status, log = preempted_fit(tmp_path, (1, 1), signal.SIGUSR2, ckpt_save_interval=3)
    assert status == 75
    assert "no epoch completed in this run" in log
    assert not os.path.exists(tmp_path / "save" / "ckpts" / "last")


def test_saving_disabled_still_stops_and_exits_75(tmp_path):
    status, log = preempted_fit(tmp_path, (2, 4), signal.SIGUSR1, ckpt_save_interval=0)
    assert status == 75
    assert "nothing saved: ckpt_save_interval is 0" in log


def test_signal_in_the_last_batch_stops_at_the_epoch_end_which_is_saved_now(tmp_path):
    status, log = preempted_fit(tmp_path, (2, 4), signal.SIGUSR1, ckpt_save_interval=3)
    assert status == 75
    assert "at the end of epoch 2: training stopped" in log
    assert "epoch 2 saved now" in log
    assert os.readlink(tmp_path / "save" / "ckpts" / "last") == "epochs/002"


SLURM_JOB = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", "slurm_job.sh"
)


@pytest.mark.slow
def test_slurm_job_script_forwards_the_signal_and_requeues_on_75(tmp_path):
    """examples/slurm_job.sh as sbatch runs it: USR1 reaches the batch shell only."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol.args\n')
    scontrol.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "PYTHON": sys.executable,
        "BENCHMARK": job_command(tmp_path)[1],
        "CKPT_DIR": str(tmp_path / "save"),
    }
    status, stdout, stderr = usr1_when_paused(
        ["bash", SLURM_JOB, *SPARSE[:-2], "--pause_at", "4:2"], env=env
    )
    assert status == 0, stderr[-3000:]
    assert "USR1 received: forwarding to" in stdout
    assert "training exited with status 75" in stdout
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert os.readlink(tmp_path / "save" / "ckpts" / "last") == "epochs/003"
