"""One writer per tree: a second job fails naming the first; a dead job's lock is free."""

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import file_writer
from keras_helpers import JOB, run_job

from candle_ckpt.core.errors import WriterLockedError
from candle_ckpt.core.format.layout import CheckpointLayout
from candle_ckpt.core.logs import silent_logger
from candle_ckpt.core.params import validate_params
from candle_ckpt.core.restore.resume import find_checkpoint
from candle_ckpt.core.run.lock import WriterLock

HOLD = """
import sys, time
from candle_ckpt.core.run.lock import WriterLock
from candle_ckpt.core.logs import silent_logger
lock = WriterLock(sys.argv[1], silent_logger())
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def wait_until(condition, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/save/ckpts, killed -9 on demand."""
    ckpts = str(tmp_path / "save" / "ckpts")
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, ckpts], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "locked\n"
    yield process
    process.kill()
    process.wait()


def test_second_writer_is_refused_naming_pid_host_and_start_time(tmp_path, holder):
    lock = WriterLock(str(tmp_path / "save" / "ckpts"), silent_logger())
    with pytest.raises(WriterLockedError) as raised:
        lock.acquire()
    message = str(raised.value)
    assert f"pid {holder.pid} on host {socket.gethostname()}, writing since 20" in message
    assert lock.path in message and not lock.held


def test_lock_of_a_killed_writer_never_blocks(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = WriterLock(str(tmp_path / "save" / "ckpts"), silent_logger())
    with open(lock.path) as stream:
        assert json.load(stream)["pid"] == holder.pid  # the dead holder's record is still there
    lock.acquire()
    with open(lock.path) as stream:
        assert json.load(stream)["pid"] == os.getpid()
    lock.release()


def test_two_writers_in_one_process_are_caught_and_release_frees_it(tmp_path):
    first = WriterLock(str(tmp_path / "ckpts"), silent_logger())
    second = WriterLock(str(tmp_path / "ckpts"), silent_logger())
    first.acquire()
    first.acquire()  # again: a no-op
    with pytest.raises(WriterLockedError, match=f"held by this process \\(pid {os.getpid()},"):
        second.acquire()
    first.release()
    second.acquire()
    assert second.held and not first.held
    second.release()


def test_a_restart_beside_this_processs_own_writer_says_this_process_holds_it(tmp_path):
    ckpts = str(tmp_path / "ckpts")
    writer = WriterLock(ckpts, silent_logger())
    writer.acquire()
    with pytest.raises(WriterLockedError) as refused:
        WriterLock(ckpts, silent_logger()).check_free()
    message = str(refused.value)
    assert f"'{ckpts}/.lock' is held by this process (pid {os.getpid()}, since 20" in message
    assert "another writer" not in message and "Stop that job" not in message
    assert "CandleCkptPyTorch.finish()" in message and "model.fit returning" in message
    writer.release()
    WriterLock(ckpts, silent_logger()).check_free()


RESTART_TWICE = """
import sys, torch, candle_ckpt
params = {"epochs": 3, "ckpt_directory": sys.argv[1], "ckpt_save_best": False}
ckpt = candle_ckpt.CandleCkptPyTorch(params, verbose=False)
ckpt.set_model({"model": torch.nn.Linear(2, 1)})
ckpt.restart(verbose=False)
ckpt.ckpt_epoch(0, {"loss": 1.0})  # training goes on: the callback holds the lock
try:
    ckpt.restart(verbose=False)
except candle_ckpt.CheckpointError as error:
    print(f"{type(error).__name__}: {error}", file=sys.stderr)
    sys.exit(candle_ckpt.exit_status(error))
"""


@pytest.mark.slow
def test_a_second_restart_during_training_is_status_4_naming_this_process(tmp_path):
    pytest.importorskip("torch")
    refused = subprocess.run(
        [sys.executable, "-c", RESTART_TWICE, str(tmp_path / "save")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 4, refused.stderr
    lines = [line for line in refused.stderr.splitlines() if " candle_ckpt." not in line]
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith("WriterLockedError: '")
    assert "is held by this process (pid " in lines[0] and "another writer" not in lines[0]
    assert "call restart() once, before training" in lines[0]


def test_readers_do_not_need_the_lock(make_checkpointer, ckpt_dir, tmp_path, holder):
    checkpointer = make_checkpointer(epochs=1, ckpt_directory=str(tmp_path / "save"))
    checkpointer.epoch_end(1, {"loss": 1.0}, file_writer())
    settings = validate_params({"ckpt_directory": str(tmp_path / "save")})
    layout = CheckpointLayout(settings["ckpt_directory"])
    assert find_checkpoint(layout, settings, silent_logger()).epoch == 1


def test_a_file_system_without_locks_logs_and_goes_on(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = WriterLock(str(tmp_path / "ckpts"), logging.getLogger("candle_ckpt.test"))
    with caplog.at_level(logging.WARNING, logger="candle_ckpt"):
        lock.acquire()
    assert "does not support locks" in caplog.text and lock.path in caplog.text
    assert not lock.held


@pytest.mark.slow
def test_second_training_job_fails_at_restart_until_the_first_is_killed(tmp_path):
    pytest.importorskip("keras")
    ckpt_dir = tmp_path / "save"
    first = subprocess.Popen(
        [sys.executable, JOB, "--ckpt_directory", str(ckpt_dir), "--epochs", "1000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    layout = CheckpointLayout(ckpt_dir)
    try:
        wait_until(lambda: layout.resolve_link("last") is not None)
        second = subprocess.run(
            [sys.executable, JOB, "--ckpt_directory", str(ckpt_dir), "--epochs", "1000"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 1
        assert "restarted from epoch" not in second.stderr  # refused before reading it
        assert (
            f"WriterLockedError: '{layout.ckpts}/.lock' is held by another writer of "
            f"this checkpoint tree: pid {first.pid} on host {socket.gethostname()}" in second.stderr
        )
        assert "Epoch 1/" not in second.stdout  # refused before any training
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    last = layout.resolve_link("last")
    resumed = run_job(ckpt_dir, "--epochs", str(last + 1))
    assert f"restarted from epoch {last}" in resumed.stderr
    assert layout.resolve_link("last") == last + 1
