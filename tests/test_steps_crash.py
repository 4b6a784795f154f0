"""Step checkpoints in real processes: kill -9, the signal, the wall-clock stop, the lock.

Each test runs tests/steps_job.py (a plain PyTorch loop: 3 epochs of 30 batches whose
order comes from a seeded torch.Generator) and checks that the rerun ends with weights
and optimizer state bit-identical to an uninterrupted run, and resumes exactly after
the batch of the checkpoint it loaded: no batch saved is trained again, none skipped.
"""

import os
import random
import re
import signal
import subprocess
import sys

import pytest

from candle_ckpt.core.errors import CheckpointError
from candle_ckpt.core.format.layout import CheckpointLayout
from candle_ckpt.core.logs import silent_logger
from candle_ckpt.core.params import validate_params
from candle_ckpt.core.restore.resume import find_checkpoint
from candle_ckpt.core.restore.verify import check_epoch
from candle_ckpt.core.run.preemption import PREEMPTED_EXIT_STATUS

pytest.importorskip("torch")

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "steps_job.py")
EPOCHS = 3
BATCHES = 30  # per epoch: steps_job.SAMPLES // steps_job.BATCH
STATE = ("--state_mb", "8")  # a few MB: saves long enough to be killed inside
TRAINED = re.compile(r"^trained (\d+):(\d+)$", re.M)


def command(root, *flags):
    return [sys.executable, JOB, str(root), str(EPOCHS), *STATE, *flags]


def environment(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run(root, *flags, status=0, **env):
    done = subprocess.run(
        command(root, *flags), env=environment(**env), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == status, done.stderr[-3000:]
    return done


def trained(stdout):
    return [(int(epoch), int(batch)) for epoch, batch in TRAINED.findall(stdout)]


def final_digest(stdout):
    return re.search(r"^final digest (\w+)$", stdout, re.M).group(1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's digest (no step saves: they must not change training)."""
    done = run(tmp_path_factory.mktemp("reference"))
    assert trained(done.stdout) == [(e, b) for e in range(1, 4) for b in range(BATCHES)]
    return final_digest(done.stdout)


def position_on_disk(root):
    """(epochs, batches) of what a restart would load now, after checking that it does
    not fail and that every step checkpoint in steps/ verifies; (0, 0) for none."""
    layout = CheckpointLayout(root)
    settings = validate_params({"ckpt_directory": str(root), "ckpt_save_steps": 1})
    try:
        found = find_checkpoint(layout, settings, silent_logger())
    except CheckpointError as error:
        raise AssertionError(f"a restart would fail: {error}") from error
    for step in layout.list_steps():
        check = check_epoch(layout, step[0], batch=step[1])
        assert not check.bad, check.problems()
    return (found.epoch, found.batch) if found else (0, 0)


def resumes_at(stdout, position):
    """The run's first trained batch is the one after `position` (no gap, no repeat)."""
    epoch, batch = position
    first = (epoch + 1, batch) if batch < BATCHES else (epoch + 2, 0)
    if first[0] > EPOCHS:  # saved at the run's last batch: only the epoch end is left
        assert trained(stdout) == [], position
    else:
        assert trained(stdout)[0] == first, (trained(stdout)[:3], position)


def kill_after(root, flags, delay):
    """Start the job, SIGKILL it `delay` s after its first trained batch; return
    (whether it was killed rather than ended first, its stdout)."""
    process = subprocess.Popen(
        command(root, *flags),
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        first = process.stdout.readline()
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
        stdout = first + process.communicate(timeout=120)[0]
    finally:
        process.kill()
    return process.returncode == -signal.SIGKILL, stdout


FAULTS = (
    "during_direct_write:2",
    "after_write:2",
    "after_fsync:2",
    "after_info:2",
    "after_rename:2",
    "after_step_link:2",
    "after_trash_rename:1",
)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_during_step_saves_then_the_rerun_is_exact(tmp_path, reference, mode):
    """Killed at each step of the save protocol a step save reaches
    (CANDLE_CKPT_FAULT; the second save of a run is a step save, with the first one's
    directory still there), then at random instants; after each kill a restart finds
    a verified checkpoint no older than before, and the next run starts right after
    it."""
    flags = ("--ckpt_save_steps", "2", "--ckpt_async", str(mode == "async"))
    rng = random.Random(29)
    before = (0, 0)
    # the fault points first: each run reaches its second save within a few batches
    # of a fresh start, and a random kill late in the run could leave fewer than that
    kills = [(fault, None) for fault in (FAULTS if mode == "sync" else FAULTS[-3:-1])]
    kills += [("random", rng.uniform(0.05, 0.5)) for _ in range(3)]
    for how, delay in kills:
        if delay is not None:
            killed, stdout = kill_after(tmp_path, flags, delay)
        else:
            done = subprocess.run(
                command(tmp_path, *flags),
                env=environment(CANDLE_CKPT_FAULT=how),
                capture_output=True,
                text=True,
                timeout=300,
            )
            killed, stdout = done.returncode == -signal.SIGKILL, done.stdout
            assert killed, (how, done.returncode, done.stderr[-2000:])
        if before != (0, 0) and trained(stdout):  # (killed before its first batch: none)
            resumes_at(stdout, before)
        if not killed:  # the run ended before the kill
            assert final_digest(stdout) == reference
            return
        after = position_on_disk(tmp_path)
        assert after >= before, (how, before, after)  # never back
        before = after
    done = run(tmp_path, *flags)
    resumes_at(done.stdout, before)
    assert final_digest(done.stdout) == reference


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_signal_mid_epoch_saves_that_batch_and_the_requeued_run_is_exact(tmp_path, reference, mode):
    asynchronous = str(mode == "async")
    saving = ("--ckpt_save_steps", "7", "--ckpt_signal", "USR1", "--ckpt_async", asynchronous)
    flags = (*saving, "--pause_at", "2:10")
    process = subprocess.Popen(
        command(tmp_path, *flags),
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in process.stdout:
            if line.startswith("PAUSED"):
                os.kill(process.pid, signal.SIGUSR1)
                break
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == PREEMPTED_EXIT_STATUS, stderr[-3000:]
    log = open(tmp_path / "ckpt.log").read()
    assert (
        "PRE-EMPTED by SIGUSR1 at the end of epoch 2, batch 11: training stopped, the "
        "epoch resumes after this batch; epoch 2, batch 11 saved now"
    ) in log
    assert os.readlink(tmp_path / "ckpts" / "last_step") == "steps/001.000011"
    done = run(tmp_path, *saving)
    assert trained(done.stdout)[0] == (2, 11)
    assert final_digest(done.stdout) == reference


@pytest.mark.slow
def test_wall_clock_margin_stops_mid_epoch_after_a_step_save(tmp_path, reference):
    # 10 virtual seconds per batch: the job's end, 700 s after the start, comes
    # inside the third epoch, which no epoch-end stop could use
    flags = (
        "--ckpt_save_steps",
        "50",
        "--ckpt_walltime_margin",
        "60",
        "--ckpt_end_time",
        "+700",
        "--virtual_clock",
        "10",
    )
    stopped = run(tmp_path, *flags, status=PREEMPTED_EXIT_STATUS)
    last = trained(stopped.stdout)[-1]
    assert last[0] == 3 and 0 < last[1] < BATCHES - 1, last
    log = open(tmp_path / "ckpt.log").read()
    assert f"WALL-CLOCK STOP after epoch 3, batch {last[1] + 1}: the next 1 batch" in log
    assert position_on_disk(tmp_path) == (2, last[1] + 1)
    done = run(tmp_path, *flags)
    resumes_at(done.stdout, (2, last[1] + 1))
    assert final_digest(done.stdout) == reference


@pytest.mark.slow
def test_a_second_job_is_refused_while_the_first_writes_steps(tmp_path):
    flags = ("--ckpt_save_steps", "4", "--pause_at", "2:10")
    first = subprocess.Popen(
        command(tmp_path, *flags),
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in first.stdout:
            if line.startswith("PAUSED"):
                break
        step = os.readlink(tmp_path / "ckpts" / "last_step")
        second = run(tmp_path, "--ckpt_save_steps", "4", status=1)
        assert "WriterLockedError" in second.stderr and f"pid {first.pid}" in second.stderr
        assert second.stdout == ""  # refused before training
        assert os.readlink(tmp_path / "ckpts" / "last_step") == step == "steps/001.000008"
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_two_ranks_stop_at_the_same_batch_at_the_wall_clock_margin(tmp_path):
    """Every 16th batch the writer's verdict is shared (a collective): both ranks stop
    after the same batch, exit 75, and rank 0 has saved that batch."""
    from test_pytorch_distributed import two_ranks

    results = two_ranks(
        [tmp_path] * 2,
        "--n_samples",
        "4096",  # 32 batches of 64 per rank and epoch
        "--ckpt_save_steps",
        "1000",
        "--ckpt_walltime_margin",
        "60",
        "--ckpt_end_time",
        "+900",
        "--virtual_clock",
        "10",
        epochs=3,
    )
    assert [code for code, _, _ in results] == [PREEMPTED_EXIT_STATUS] * 2, results[1][2][-2000:]
    stop = re.search(r"WALL-CLOCK STOP after epoch (\d+), batch (\d+)", results[0][2])
    assert stop is not None, results[0][2][-2000:]
    epoch, batch = int(stop.group(1)), int(stop.group(2))
    assert batch % 16 == 0 and f"after epoch {epoch}, batch {batch}" in results[1][2]
    step = os.readlink(tmp_path / "ckpts" / "last_step")
    assert step == f"steps/{epoch - 1:03d}.{batch:06d}"
