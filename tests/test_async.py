"""ckpt_async: saves run in the background, one at a time, and never lose an error."""

import os
import threading
import time

import pytest
from conftest import file_writer

from candle_ckpt.core.errors import CheckpointError
from candle_ckpt.core.format.info import read_info
from candle_ckpt.core.format.layout import CheckpointLayout
from candle_ckpt.core.storage.background import check_snapshot_fits


def test_async_run_produces_the_same_tree(make_checkpointer, ckpt_dir, tmp_path):
    synchronous = make_checkpointer(
        epochs=5, ckpt_keep_limit=2, ckpt_directory=str(tmp_path / "sync")
    )
    asynchronous = make_checkpointer(epochs=5, ckpt_keep_limit=2, ckpt_async=True)
    for epoch, loss in enumerate([3.0, 1.0, 2.0, 2.5, 2.7], 1):
        for checkpointer in (synchronous, asynchronous):
            checkpointer.epoch_end(epoch, {"loss": loss}, file_writer(b"%d" % epoch))
    asynchronous.finish()
    a, b = CheckpointLayout(tmp_path / "sync"), CheckpointLayout(ckpt_dir)
    assert a.list_epochs() == b.list_epochs() == [2, 4, 5]
    assert (b.resolve_link("last"), b.resolve_link("best")) == (5, 2)
    for epoch in (2, 4, 5):
        info_a, info_b = read_info(a.epoch_dir(epoch)), read_info(b.epoch_dir(epoch))
        for key in ("epoch_best", "best_metric_last", "metrics", "checksum"):
            assert info_a[key] == info_b[key], (epoch, key)


def test_training_thread_only_captures_and_one_save_is_in_flight(make_checkpointer):
    checkpointer = make_checkpointer(epochs=3, ckpt_async=True, ckpt_save_best=False)
    running, overlaps = [], []

    def slow_writer(directory):
        if running:
            overlaps.append(directory)
        running.append(threading.get_ident())
        time.sleep(0.3)
        running.pop()
        return file_writer()(directory)

    started = time.perf_counter()
    checkpointer.epoch_end(1, {}, slow_writer)
    assert time.perf_counter() - started < 0.2  # returned before the write
    checkpointer.epoch_end(2, {}, slow_writer)  # waits for epoch 1's save
    checkpointer.epoch_end(3, {}, slow_writer)
    checkpointer.finish()
    assert overlaps == [] and checkpointer.layout.list_epochs() == [1, 2, 3]


def failing_writer(directory):
    raise OSError(5, "Input/output error")


def test_background_error_is_raised_at_the_next_save(make_checkpointer):
    checkpointer = make_checkpointer(epochs=3, ckpt_async=True, ckpt_save_best=False)
    checkpointer.epoch_end(1, {}, file_writer())
    checkpointer.epoch_end(2, {}, failing_writer)
    with pytest.raises(OSError, match="Input/output error"):
        checkpointer.epoch_end(3, {}, file_writer())
    assert checkpointer.layout.resolve_link("last") == 1
    assert not os.path.exists(checkpointer.layout.work)


def test_background_error_is_raised_at_the_end_of_training(make_checkpointer):
    checkpointer = make_checkpointer(epochs=1, ckpt_async=True, ckpt_save_best=False)
    checkpointer.epoch_end(1, {}, failing_writer)
    with pytest.raises(OSError, match="Input/output error"):
        checkpointer.finish()


def test_a_snapshot_that_does_not_fit_is_refused():
    with pytest.raises(
        CheckpointError,
        match=r"^ckpt_async=true needs a host-memory "
        r"snapshot of the training state, \d+ MB, but only \d+ MB are "
        r"available \(MemAvailable\); .* set ckpt_async=false$",
    ):
        check_snapshot_fits(1 << 60, "ckpt_async=true", "ckpt_async=false")
    check_snapshot_fits(1 << 20, "ckpt_async=true", "ckpt_async=false")


def test_a_save_training_waits_for_runs_at_trainings_priority_not_the_background_one():
    from candle_ckpt.core.storage.background import BACKGROUND_NICE, BackgroundWriter

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    started, release, seen = threading.Event(), threading.Event(), {}

    def save():
        me = threading.get_native_id()
        seen["before"] = os.getpriority(os.PRIO_PROCESS, me)
        started.set()
        release.wait(10)
        time.sleep(0.1)  # wait() boosts before blocking; give it the time to
        seen["after"] = os.getpriority(os.PRIO_PROCESS, me)

    writer = BackgroundWriter()
    writer.submit(save)
    assert started.wait(10)
    if seen["before"] == mine:
        pytest.skip("this system does not let a thread lower its own priority")
    assert seen["before"] == max(mine, BACKGROUND_NICE)
    if os.geteuid() != 0:
        pytest.skip("raising a lowered priority back needs CAP_SYS_NICE")
    release.set()
    writer.wait()
    assert seen["after"] == mine
    measured = threading.Event()
    writer.submit(
        lambda: (
            seen.update(next_save=os.getpriority(os.PRIO_PROCESS, threading.get_native_id())),
            measured.set(),
        )
    )
    assert measured.wait(10)  # before wait(), which would raise it again
    writer.wait()
    assert seen["next_save"] == max(mine, BACKGROUND_NICE)  # lowered again for the next
