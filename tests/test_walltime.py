"""The wall-clock stop (ckpt_walltime_margin): where the job's end comes from (parameter,
SLURM_JOB_END_TIME, a fake squeue on PATH), the estimator, the agreement of the
processes, and real Keras and PyTorch jobs that stop at the right epoch, exit 75 and
resume exactly."""

import logging
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from keras_helpers import assert_same_state, job_command

from candle_ckpt.core.errors import ParameterValueError
from candle_ckpt.core.run import walltime
from candle_ckpt.core.run.preemption import PREEMPTED_EXIT_STATUS
from candle_ckpt.core.run.session import TrainingSession
from candle_ckpt.core.run.walltime import (
    REASK_SECONDS,
    WallClockStop,
    find_job_end,
    parse_duration,
    parse_end_time,
)

HERE = os.path.dirname(os.path.abspath(__file__))
LOGGER = logging.getLogger("candle_ckpt.test_walltime")


# -- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [("90", 90), ("1:30", 90), ("0:05", 5), ("1:00:00", 3600), ("2-03:00:00", 183600)],
)
def test_durations_in_squeue_forms(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "a", "1.5", "-5", "1-2:3", "1:2:3:4", "INVALID"])
def test_what_is_not_a_duration_is_refused(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_end_time_absolute_or_from_the_start():
    assert parse_end_time("+1:00", 1000.0) == 1060.0
    assert parse_end_time("2026-12-03T10:05:00+00:00", 0.0) == 1796292300.0
    with pytest.raises(
        ParameterValueError,
        match=r"'ckpt_end_time': received 'tomorrow'; "
        r"expected an ISO 8601 time .* or a duration from the start",
    ):
        parse_end_time("tomorrow", 0.0)


# -- where the end comes from ------------------------------------------------------------


@pytest.fixture
def fake_squeue(tmp_path, monkeypatch):
    """Put a `squeue` on PATH that prints `output` and exits `status`; each call is
    appended to calls.txt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"

    def install(output, status=0):
        script = bin_dir / "squeue"
        script.write_text(
            f'#!/bin/sh\necho "$@" >> {calls}\necho "{output}"\n'
            f'[ {status} -eq 0 ] || echo "slurm_load_jobs error" >&2\n'
            f"exit {status}\n"
        )
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        return calls

    return install


def test_squeue_time_left_gives_the_end(fake_squeue, monkeypatch):
    calls = fake_squeue("1:02:03")
    monkeypatch.setattr(walltime, "clock", lambda: 1000.0)
    end = find_job_end(None, {"SLURM_JOB_ID": "77"}, 1000.0, LOGGER)
    assert end.time == 1000.0 + 3723 and end.asks_squeue
    assert end.source == "'squeue -h -j 77 -o %L'"
    assert calls.read_text().split() == ["-h", "-j", "77", "-o", "%L"]


def test_an_unlimited_job_has_no_wall_clock_stop(fake_squeue, caplog):
    fake_squeue("UNLIMITED")
    with caplog.at_level(logging.INFO):
        assert find_job_end(None, {"SLURM_JOB_ID": "77"}, 0.0, LOGGER) is None
    assert "job 77 has no time limit; no wall-clock stop" in caplog.text


@pytest.mark.parametrize(
    "output, status, reason",
    [
        ("", 1, r"exited with status 1: 'slurm_load_jobs error'"),
        ("garbage", 0, r"printed 'garbage'; expected a time left such as"),
    ],
)
def test_a_failing_squeue_is_a_warning_naming_everything_tried(
    fake_squeue, caplog, output, status, reason
):
    fake_squeue(output, status)
    assert find_job_end(None, {"SLURM_JOB_ID": "77"}, 0.0, LOGGER) is None
    assert re.search(
        r"the job's end is unknown: tried ckpt_end_time \(not set\); "
        r"SLURM_JOB_END_TIME \(not in the environment\); "
        r"'squeue -h -j 77 -o %L' \(" + reason,
        caplog.text,
    )
    assert "training runs without the wall-clock stop" in caplog.text


def test_no_squeue_on_path_is_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_job_end(None, {"SLURM_JOB_ID": "77"}, 0.0, LOGGER) is None
    assert "'squeue -h -j 77 -o %L' ([Errno 2]" in caplog.text


def test_not_under_slurm_is_a_warning(caplog):
    assert find_job_end(None, {}, 0.0, LOGGER) is None
    assert "squeue (not under Slurm: no SLURM_JOB_ID)" in caplog.text


def test_the_parameter_comes_first_then_the_environment_then_squeue(fake_squeue):
    calls = fake_squeue("5:00")
    slurm = {"SLURM_JOB_ID": "77", "SLURM_JOB_END_TIME": "5000"}
    assert find_job_end("+60", slurm, 100.0, LOGGER).time == 160.0
    exported = find_job_end(None, slurm, 100.0, LOGGER)
    assert (exported.time, exported.source) == (5000.0, "SLURM_JOB_END_TIME")
    assert not calls.exists()


# -- the estimator -----------------------------------------------------------------------


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def run_epochs(stop, clock, epoch_seconds, save_seconds):
    """Epochs of the given durations, each saved; the 1-based epoch at which
    `should_stop` first says stop, or None."""
    for epoch, (train, save) in enumerate(zip(epoch_seconds, save_seconds), start=1):
        clock.now += train
        stop.epoch_ended()
        clock.now += save
        stop.save_ended(saved=save > 0)
        if stop.should_stop() is not None:
            return epoch
    return None


def test_stops_when_the_next_epoch_save_and_margin_would_pass_the_end(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(walltime, "clock", clock)
    stop = WallClockStop(5, "+50", LOGGER, environ={})
    stop.start()
    # ends at 12, 24, 36: 24 + 10 + 2 + 5 = 41 <= 50 goes on, 36 + 17 = 53 > 50 stops
    assert run_epochs(stop, clock, [10] * 5, [2] * 5) == 3
    estimate = stop.should_stop()
    assert (estimate.epoch_seconds, estimate.save_seconds, estimate.margin) == (10, 2, 5)
    assert re.fullmatch(
        r"the next epoch \(10.0 s, the longest of the last 3 measured\) plus "
        r"a save \(2.0 s\) plus ckpt_walltime_margin \(5 s\) would end at "
        r"\S+ \S+, after the job's end \S+ \S+ \(ckpt_end_time=\+50; 14 s "
        r"left\)",
        estimate.describe(),
    )


def test_a_slow_first_epoch_stops_counting_after_three(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(walltime, "clock", clock)
    stop = WallClockStop(1, "+1000", LOGGER, environ={})
    stop.start()
    run_epochs(stop, clock, [300, 10, 10], [1, 1, 1])
    assert max(stop.epoch_seconds) == 300
    run_epochs(stop, clock, [10], [1])
    assert max(stop.epoch_seconds) == 10


def test_before_any_save_is_timed_a_save_counts_as_long_as_an_epoch(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(walltime, "clock", clock)
    stop = WallClockStop(1, "+35", LOGGER, environ={})
    stop.start()
    # unsaved epochs of 10 s: at 10, 10 + 10 + 10 + 1 = 31 goes on; at 20, 41 > 35 stops
    assert run_epochs(stop, clock, [10] * 3, [0] * 3) == 2
    assert stop.should_stop().save_seconds == 10


def test_squeue_is_asked_at_the_start_and_then_rarely(fake_squeue, monkeypatch, caplog):
    calls = fake_squeue("10:00")
    clock = FakeClock()
    monkeypatch.setattr(walltime, "clock", clock)
    stop = WallClockStop(1, None, LOGGER, environ={"SLURM_JOB_ID": "77"})
    stop.start()
    run_epochs(stop, clock, [1] * 20, [0.1] * 20)
    assert len(calls.read_text().splitlines()) == 1
    fake_squeue("1:00:00")  # an operator extended the limit
    clock.now += REASK_SECONDS
    with caplog.at_level(logging.INFO):
        stop.should_stop()
    assert len(calls.read_text().splitlines()) == 2
    assert stop.end.time == clock.now + 3600
    assert "the job's end moved to" in caplog.text


# -- the session: settings and agreement -------------------------------------------------


def session(tmp_path, **params):
    return TrainingSession(
        {"ckpt_directory": str(tmp_path / "save"), "epochs": 5, **params},
        logger=LOGGER,
        verbose=False,
    )


def test_an_end_time_without_a_margin_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(
        ParameterValueError,
        match=r"'ckpt_end_time' is '\+60' but "
        r"'ckpt_walltime_margin' is 0 \(the wall-clock stop is off\); "
        r"expected a margin in seconds > 0",
    ):
        session(tmp_path, ckpt_end_time="+60")
    with pytest.raises(ParameterValueError, match="'ckpt_end_time': received 'soon'"):
        session(tmp_path, ckpt_end_time="soon", ckpt_walltime_margin=60)
    assert not (tmp_path / "save").exists()


def fake_adapter(all_gather):
    return SimpleNamespace(all_gather=lambda: all_gather, adapter_name="fake")


def test_every_process_follows_the_writers_verdict(tmp_path):
    writer_stops = lambda mine: [(1, 1), tuple(mine)]  # noqa: E731 (rank 0 writes)
    writer_goes_on = lambda mine: [(1, 0), tuple(mine)]  # noqa: E731
    worker = session(tmp_path, ckpt_walltime_margin=10)
    worker._writer = False
    worker._adapter = fake_adapter(writer_stops)
    assert worker._all_agree_to_stop(False) is True
    worker._adapter = fake_adapter(writer_goes_on)
    assert worker._all_agree_to_stop(False) is False


def test_a_non_writer_without_a_collective_is_refused(tmp_path):
    worker = session(tmp_path, ckpt_walltime_margin=10)
    worker._writer = False
    worker._adapter = fake_adapter(None)
    with pytest.raises(
        ParameterValueError,
        match=r"'ckpt_walltime_margin' is 10 in a "
        r"process that does not write the checkpoint .* expected 0 here",
    ):
        worker._check_walltime_agreement()


# -- real jobs: a virtual clock of 10 s per batch, 8 batches per epoch -------------------

# The end is 300 s after the start and the margin 20 s: after epoch 2 (160 s) one more
# epoch and a save end at about 260 s, after epoch 3 (240 s) at 340 s, past the end. The
# interval leaves epoch 3 unsaved, so the stop saves it.
WALLTIME = (
    "--epochs",
    "6",
    "--ckpt_save_interval",
    "2",
    "--ckpt_save_best",
    "false",
    "--ckpt_walltime_margin",
    "20",
    "--ckpt_end_time",
    "+300",
    "--virtual_clock",
    "10",
)
UNINTERRUPTED = WALLTIME[:6]
STOP_LOG = (
    r"WALL-CLOCK STOP after epoch 3: the next epoch \(8\d\.\d s, the longest of the "
    r"last 3 measured\) plus a save \(\d+\.\d s\) plus ckpt_walltime_margin \(20 s\) "
    r"would end at .*\(ckpt_end_time=\+300; \d+ s left\); epoch 3 saved now; exiting "
    r"with status 75 so that the job script can requeue"
)


def run(command, env=None):
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def check_stopped_after_epoch_3(root, result):
    assert result.returncode == PREEMPTED_EXIT_STATUS, result.stderr[-3000:]
    assert re.search(STOP_LOG, (root / "ckpt.log").read_text())
    assert os.readlink(root / "ckpts" / "last") == "epochs/003"
    assert sorted(os.listdir(root / "ckpts" / "epochs")) == ["002", "003"]


@pytest.mark.slow
def test_keras_stops_before_the_end_exits_75_and_resumes_exactly(tmp_path):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    assert run(job_command(reference, *UNINTERRUPTED)).returncode == 0
    check_stopped_after_epoch_3(stopped, run(job_command(stopped, *WALLTIME)))
    resumed = run(job_command(stopped, *WALLTIME))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "restarted from epoch 3" in resumed.stderr
    assert_same_state(
        reference / "ckpts" / "epochs" / "006" / "model.h5",
        stopped / "ckpts" / "epochs" / "006" / "model.h5",
    )


@pytest.mark.slow
def test_pytorch_stops_before_the_end_exits_75_and_resumes_exactly(tmp_path):
    pytest.importorskip("torch")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), OMP_NUM_THREADS="1")
    job = [sys.executable, os.path.join(HERE, "torch_job.py"), "--ckpt_directory"]
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    uninterrupted = run([*job, str(reference), *UNINTERRUPTED], env)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    check_stopped_after_epoch_3(stopped, run([*job, str(stopped), *WALLTIME], env))
    resumed = run([*job, str(stopped), *WALLTIME], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    digest = re.compile(r"final digest (\w+)")
    assert digest.search(resumed.stdout).group(1) == digest.search(uninterrupted.stdout).group(1)


# -- in process: what is kept when the stop comes ----------------------------------------


def stopped_fit(tmp_path, monkeypatch, **extra):
    """Fit 4 epochs under a clock that advances 100 s per epoch, ending 350 s after the
    start with a 10 s margin: no save is timed, so a save counts 100 s too, and after
    epoch 1 (100 + 210 <= 350) training goes on, after epoch 2 it stops; return (exit
    status, ckpt.log)."""
    keras = pytest.importorskip("keras")
    import numpy as np

    import candle_ckpt

    clock = FakeClock(1000.0)
    monkeypatch.setattr(walltime, "clock", clock)

    class Advance(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            clock.now += 100

    params = {
        "ckpt_directory": str(tmp_path / "save"),
        "epochs": 4,
        "ckpt_save_best": False,
        "ckpt_walltime_margin": 10,
        "ckpt_end_time": "+350",
        **extra,
    }
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mean_squared_error")
    x = np.random.default_rng(0).standard_normal((64, 4)).astype("float32")
    ckpt = candle_ckpt.CandleCheckpointCallback(params, verbose=False)
    with pytest.raises(SystemExit) as exited:
        model.fit(
            x,
            x[:, :1],
            batch_size=16,
            epochs=4,
            shuffle=False,
            verbose=0,
            callbacks=[Advance(), ckpt],
        )
    log_file = tmp_path / "save" / "ckpt.log"
    return exited.value.code, log_file.read_text() if log_file.exists() else ""


def test_saving_disabled_still_stops_and_exits_75(tmp_path, monkeypatch):
    status, log = stopped_fit(tmp_path, monkeypatch, ckpt_save_interval=0)
    assert status == PREEMPTED_EXIT_STATUS
    assert "WALL-CLOCK STOP after epoch 2: " in log
    assert "; nothing saved: ckpt_save_interval is 0; exiting with status 75" in log


def test_with_ckpt_signal_too_the_unsaved_epoch_is_saved_once(tmp_path, monkeypatch):
    status, log = stopped_fit(tmp_path, monkeypatch, ckpt_save_interval=3, ckpt_signal="USR1")
    assert status == PREEMPTED_EXIT_STATUS
    assert "; epoch 2 saved now; exiting with status 75" in log
    assert log.count("epoch 2 saved (wall-clock)") == 1
    assert os.readlink(tmp_path / "save" / "ckpts" / "last") == "epochs/002"


@pytest.mark.slow
def test_two_ranks_stop_after_the_same_epoch_on_the_writers_verdict(tmp_path):
    pytest.importorskip("torch")
    from test_pytorch_distributed import two_ranks

    root = tmp_path / "save"
    # each rank trains 4 batches per epoch: 20 s each keeps the 80 s epochs
    results = two_ranks([root] * 2, *WALLTIME[2:-1], "20", epochs=6)
    for code, out, err in results:
        assert code == PREEMPTED_EXIT_STATUS, err[-3000:]
        assert "epoch 3:" in out and "epoch 4:" not in out
    assert "WALL-CLOCK STOP after epoch 3: the checkpoint writer says" in results[1][2]
    check_stopped_after_epoch_3(root, SimpleNamespace(returncode=75, stderr=""))


def test_with_ckpt_async_a_save_counts_its_background_write(monkeypatch, make_checkpointer):
    clock = FakeClock()
    monkeypatch.setattr(walltime, "clock", clock)
    stop = WallClockStop(1, "+1000", LOGGER, environ={})
    stop.start()
    clock.now += 10
    stop.epoch_ended()
    clock.now += 0.5
    stop.save_ended(saved=True, background_seconds=7.0)
    assert list(stop.save_seconds) == [7.0]

    from conftest import file_writer

    checkpointer = make_checkpointer()
    assert checkpointer.last_write_seconds is None
    checkpointer.epoch_end(1, {"loss": 1.0}, file_writer())
    assert checkpointer.last_write_seconds > 0
