"""The save protocol and the run's checkpointing state, with a plain-file model writer."""

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import as_format1, file_writer

from candle_ckpt.core.errors import ParameterValueError
from candle_ckpt.core.format.info import read_info, write_info
from candle_ckpt.core.format.layout import CheckpointLayout
from candle_ckpt.core.restore.verify import check_files


def run(checkpointer, losses, start=1):
    for epoch, loss in enumerate(losses, start):
        checkpointer.epoch_end(epoch, {"loss": loss}, file_writer(b"epoch %d" % epoch))


def test_tree_after_a_run(make_checkpointer, ckpt_dir):
    run(make_checkpointer(epochs=4), [3.0, 1.0, 2.0, 2.5])
    layout = CheckpointLayout(ckpt_dir)
    assert layout.list_epochs() == [1, 2, 3, 4]
    assert os.readlink(layout.link("last")) == "epochs/004"
    assert os.readlink(layout.link("best")) == "epochs/002"
    assert not os.path.exists(layout.work)
    info = read_info(layout.epoch_dir(4))
    assert (info["epoch"], info["epoch_best"], info["best_metric_last"]) == (4, 2, 1.0)
    assert all(
        check.problem is None and check.actual_crc32
        for check in check_files(layout.epoch_dir(4), info)
    )
    assert "epoch 4 saved (final)" in open(layout.log_file).read()


def test_writer_failing_midway_leaves_last_on_the_previous_epoch(make_checkpointer, ckpt_dir):
    checkpointer = make_checkpointer(epochs=5)
    run(checkpointer, [3.0, 2.0])

    def half_write(directory):
        file_writer(b"partial")(directory)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        checkpointer.epoch_end(3, {"loss": 1.0}, half_write)
    layout = CheckpointLayout(ckpt_dir)
    assert layout.resolve_link("last") == 2 and layout.list_epochs() == [1, 2]
    checkpointer.trash.wait()
    assert not os.path.exists(layout.work) and os.listdir(layout.trash) == []
    assert read_info(layout.epoch_dir(2))["epoch"] == 2


def test_leftover_work_of_a_killed_save_is_removed_and_logged(make_checkpointer, ckpt_dir):
    layout = CheckpointLayout(ckpt_dir)
    os.makedirs(layout.work)
    open(os.path.join(layout.work, "model.h5"), "w").close()
    run(make_checkpointer(epochs=1), [1.0])
    assert layout.list_epochs() == [1]
    assert "removed leftover" in open(layout.log_file).read()


def test_rerun_epoch_is_replaced_with_a_log_line(make_checkpointer, ckpt_dir):
    run(make_checkpointer(epochs=3), [3.0, 2.0, 1.0])
    os.unlink(os.path.join(ckpt_dir, "ckpts", "last"))
    run(make_checkpointer(epochs=2), [5.0, 4.0])
    layout = CheckpointLayout(ckpt_dir)
    with open(os.path.join(layout.epoch_dir(2), "model.h5"), "rb") as stream:
        assert stream.read() == b"epoch 2"
    assert layout.resolve_link("last") == 2 and layout.resolve_link("best") == 2
    assert "replaced existing epoch 2" in open(layout.log_file).read()


def test_interval_zero_writes_nothing(make_checkpointer, ckpt_dir):
    run(make_checkpointer(epochs=3, ckpt_save_interval=0), [3.0, 2.0, 1.0])
    assert not os.path.exists(os.path.join(ckpt_dir, "ckpts"))


def test_skip_epochs_and_interval(make_checkpointer, ckpt_dir):
    run(
        make_checkpointer(epochs=9, ckpt_skip_epochs=4, ckpt_save_interval=3, ckpt_save_best=False),
        [1.0] * 9,
    )
    assert CheckpointLayout(ckpt_dir).list_epochs() == [6, 9]
    assert not os.path.lexists(os.path.join(ckpt_dir, "ckpts", "best"))


def test_keep_policy_spares_last_best_and_earlier_runs(make_checkpointer, ckpt_dir):
    run(make_checkpointer(epochs=3, ckpt_save_best=False), [1.0, 1.0, 1.0])
    os.unlink(os.path.join(ckpt_dir, "ckpts", "last"))
    # A new run from scratch into the same tree; epochs 1-3 are rewritten by it,
    # and it saves 10 epochs with a limit of 2 plus a best at epoch 1.
    run(make_checkpointer(epochs=10, ckpt_keep_limit=2), [0.1] + [1.0] * 9)
    layout = CheckpointLayout(ckpt_dir)
    assert layout.list_epochs() == [1, 9, 10]
    assert layout.resolve_link("best") == 1 and layout.resolve_link("last") == 10


def test_epochs_of_an_earlier_run_are_never_deleted(make_checkpointer, ckpt_dir):
    run(make_checkpointer(epochs=20, ckpt_save_best=False), [1.0] * 20)  # epochs 1..20
    checkpointer = make_checkpointer(epochs=3, ckpt_keep_limit=1, ckpt_save_best=False)
    run(checkpointer, [1.0, 1.0, 1.0])
    assert CheckpointLayout(ckpt_dir).list_epochs() == [3] + list(range(4, 21))


def test_missing_metric_lists_the_metrics_there(make_checkpointer):
    checkpointer = make_checkpointer(ckpt_save_best_metric="val_loss")
    with pytest.raises(ParameterValueError, match=r"'val_loss'.*\['acc', 'loss'\]"):
        checkpointer.epoch_end(1, {"loss": 1.0, "acc": 0.5}, file_writer())


def test_accuracy_like_metric_produces_a_best_link(make_checkpointer, ckpt_dir):
    checkpointer = make_checkpointer(epochs=4, ckpt_save_best_metric="val_accuracy")
    for epoch, acc in enumerate([0.2, 0.7, 0.5, 0.6], 1):
        checkpointer.epoch_end(epoch, {"val_accuracy": acc}, file_writer())
    assert CheckpointLayout(ckpt_dir).resolve_link("best") == 2


def test_resume_continues_best_and_repairs_best_after_rollback(make_checkpointer, ckpt_dir):
    run(make_checkpointer(epochs=6), [5.0, 4.0, 3.0, 2.0, 1.0, 1.5])
    layout = CheckpointLayout(ckpt_dir)
    assert layout.resolve_link("best") == 5
    os.unlink(layout.link("last"))
    os.symlink("epochs/003", layout.link("last"))  # operator rolls back
    checkpointer = make_checkpointer(epochs=6)
    checkpointer.resume(read_info(layout.epoch_dir(3)))
    assert (checkpointer.best.value, checkpointer.best.epoch) == (3.0, 3)
    assert checkpointer.run_epochs == [1, 2, 3]
    run(checkpointer, [3.5], start=4)  # worse than 3.0
    assert layout.resolve_link("best") == 3 and layout.resolve_link("last") == 4
    info = read_info(layout.epoch_dir(4))
    assert checkpointer.run_epochs == [1, 2, 3, 4] and info["epoch_best"] == 3
    assert info["format_version"] == 2 and "epochs_saved" not in info
    assert isinstance(info["time_elapsed"], float)


def test_logger_none_is_silent_and_custom_logger_is_used(ckpt_dir, caplog):
    from candle_ckpt.core.save.checkpointer import Checkpointer

    Checkpointer(
        {"epochs": 1, "ckpt_directory": ckpt_dir, "ckpt_save_best": False}, logger=None
    ).epoch_end(1, {}, file_writer())
    assert not os.path.exists(os.path.join(ckpt_dir, "ckpt.log"))
    mine = logging.getLogger("my.benchmark")
    with caplog.at_level(logging.INFO, logger="my.benchmark"):
        Checkpointer(
            {"epochs": 1, "ckpt_directory": ckpt_dir, "ckpt_save_best": False}, logger=mine
        ).epoch_end(1, {}, file_writer())
    assert any("epoch 1 saved" in record.getMessage() for record in caplog.records)


def test_the_core_and_the_operator_side_import_no_framework():
    """Every module of candle_ckpt.core and candle_ckpt.operator, and the package itself,
    load without TensorFlow, Keras, torch or h5py."""
    import pkgutil

    import candle_ckpt.core
    import candle_ckpt.operator

    # walk_packages, not iter_modules: the core's modules are in its subpackages.
    modules = ["candle_ckpt"] + [
        info.name
        for package in (candle_ckpt.core, candle_ckpt.operator)
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
    ]
    code = (
        f"import importlib, json, sys; [importlib.import_module(m) for m in {modules!r}]; "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('tensorflow', 'keras', 'torch', 'h5py'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert len(modules) > 20 and json.loads(out) == []


def test_deleted_epochs_leave_the_training_thread_at_once(make_checkpointer, ckpt_dir):
    """Keep-policy deletions are renames into trash/; a background thread removes them."""
    checkpointer = make_checkpointer(epochs=5, ckpt_keep_limit=1, ckpt_save_best=False)
    run(checkpointer, [1.0] * 5)
    layout = CheckpointLayout(ckpt_dir)
    assert layout.list_epochs() == [5]
    checkpointer.trash.wait()
    assert os.listdir(layout.trash) == []


def test_trash_left_by_a_crash_is_emptied_by_the_next_run(make_checkpointer, ckpt_dir):
    layout = CheckpointLayout(ckpt_dir)
    os.makedirs(os.path.join(layout.trash, "007.0123456789ab"))
    checkpointer = make_checkpointer(epochs=1)
    run(checkpointer, [1.0])
    checkpointer.trash.wait()
    assert os.listdir(layout.trash) == []


def test_saves_reuse_one_fsync_thread_rather_than_one_per_file(make_checkpointer, monkeypatch):
    started = []
    real_start = threading.Thread.start

    def counting_start(thread):
        started.append(thread.name)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", counting_start)

    def three_files(directory):
        for name in ("a.bin", "b.bin", "model.h5"):
            with open(os.path.join(directory, name), "wb") as stream:
                stream.write(name.encode())
        return "model.h5"

    checkpointer = make_checkpointer(epochs=3)
    for epoch in (1, 2, 3):
        checkpointer.epoch_end(epoch, {"loss": 1.0 / epoch}, three_files)
    fsync_threads = [name for name in started if "fsync" in name or "ThreadPool" in name]
    assert len(fsync_threads) <= 1, started  # 9 files, at most one new thread


def test_a_shared_thread_runs_tasks_at_the_submitters_nice_value_and_after_fork():
    code = textwrap.dedent("""
        import os, threading
        from candle_ckpt.core.storage.background import SharedThread, lower_thread_priority
        shared = SharedThread("test-shared")
        nice = lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        before = shared.submit(nice).result()
        lower_thread_priority()
        after = shared.submit(nice).result()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if shared.submit(lambda: 7).result(timeout=10) == 7 else 1)
        _, status = os.waitpid(pid, 0)
        print(before, after, os.waitstatus_to_exitcode(status))
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    before, after, child = map(int, result.stdout.split())
    assert after >= 10 and after > before and child == 0


def test_a_format1_run_continues_in_format2_with_its_keep_policy(make_checkpointer, ckpt_dir):
    """Epochs 1-4 written by candle_ckpt 0.2 (format 1), next to epoch 2 of an earlier,
    unrelated run's that the format 1 lineage never listed; restarts continue in format 2."""
    run(make_checkpointer(epochs=4, ckpt_save_best=False), [1.0] * 4)
    layout = CheckpointLayout(ckpt_dir)
    saved = {1: [1], 2: [2], 3: [1, 3], 4: [1, 3, 4]}  # each file's epochs_saved
    for epoch, epochs_saved in saved.items():
        write_info(
            layout.epoch_dir(epoch), as_format1(read_info(layout.epoch_dir(epoch)), epochs_saved)
        )
    resumed = make_checkpointer(epochs=8, ckpt_save_best=False, ckpt_keep_limit=10)
    resumed.resume(read_info(layout.epoch_dir(4)))
    assert resumed.run_epochs == [1, 3, 4] and resumed.lineage_format1_epoch == 4
    run(resumed, [1.0, 1.0], start=5)
    info = read_info(layout.epoch_dir(6))
    assert info["format_version"] == 2 and info["lineage_format1_epoch"] == 4
    again = make_checkpointer(epochs=8, ckpt_save_best=False, ckpt_keep_limit=2)
    again.resume(info)
    assert again.run_epochs == [1, 3, 4, 5, 6]
    run(again, [1.0], start=7)
    assert layout.list_epochs() == [2, 6, 7]  # epoch 2 was never this lineage's


def test_a_crc_the_writer_computed_is_recorded_and_only_other_files_are_read_back(
    make_checkpointer, ckpt_dir, monkeypatch
):
    """A writer that returns a `ModelFile` with the model file's CRC32 (computed from
    memory as it wrote) spares reading it back; any other file is still read back."""
    import zlib

    from candle_ckpt.core.save import protocol

    read_back = []
    real = protocol.crc32_file
    monkeypatch.setattr(
        protocol, "crc32_file", lambda path: read_back.append(os.path.basename(path)) or real(path)
    )

    def write_files(directory):
        for name, payload in (("model.h5", b"weights"), ("extra.bin", b"more")):
            with open(os.path.join(directory, name), "wb") as stream:
                stream.write(payload)
        return protocol.ModelFile("model.h5", zlib.crc32(b"weights"))

    make_checkpointer(epochs=1).epoch_end(1, {"loss": 1.0}, write_files)
    layout = CheckpointLayout(ckpt_dir)
    info = read_info(layout.epoch_dir(1))
    assert read_back == ["extra.bin"]
    assert info["checksum"] == info["files"]["model.h5"]["crc32"] == str(zlib.crc32(b"weights"))
    assert info["files"]["extra.bin"]["crc32"] == str(zlib.crc32(b"more"))
    assert all(check.problem is None for check in check_files(layout.epoch_dir(1), info))
