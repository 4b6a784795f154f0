"""Disk full and I/O errors at every step of a save: a clear error, `last` still complete.

`Injector` makes the n-th file-system call of a save that touches the tree fail with
ENOSPC or EIO, for n = 1, 2, ... until a save makes fewer calls: every step of the
protocol (mkdir, open, write, fsync, rename, symlink, replace, the keep policy's
deletion) fails once. A real full file system (a small tmpfs, when this process may
mount one) then fails inside h5py while Keras saves.
"""

import builtins
import errno
import os
import shutil
import subprocess
import threading

import numpy as np
import pytest
from conftest import file_writer

from candle_ckpt.core.errors import CheckpointWriteError
from candle_ckpt.core.layout import CheckpointLayout
from candle_ckpt.core.logs import silent_logger
from candle_ckpt.core.params import validate_params
from candle_ckpt.core.resume import find_checkpoint

CALLS = [
    (os, "mkdir"),
    (os, "open"),
    (os, "fsync"),
    (os, "rename"),
    (os, "replace"),
    (os, "symlink"),
    (os, "unlink"),
    (os, "rmdir"),
    (builtins, "open"),
]


class Injector:
    """Fails the `fail_at`-th call of CALLS that touches `root` (or takes a descriptor).

    Calls of the trash collector's thread are not counted: removals run off the save
    path, and a failed one is logged and retried (test_a_failed_removal_is_retried).
    """

    def __init__(self, monkeypatch, root, error_number):
        self.root, self.error_number = root, error_number
        self.calls, self.fail_at = [], None
        for module, name in CALLS:
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name), name))

    def _wrap(self, real, name):
        def call(*args, **kwargs):
            # a descriptor, a name in a directory given by descriptor (every such call of
            # the library is in the tree), or the first path in the tree (symlink's is
            # its second)
            in_directory = kwargs.get("dir_fd", kwargs.get("src_dir_fd")) is not None
            target = (
                args[1 if name == "symlink" else 0]
                if in_directory
                else next(
                    (a for a in args[:2] if isinstance(a, int) or str(a).startswith(self.root)),
                    None,
                )
            )
            background = threading.current_thread().name.startswith("candle_ckpt-trash")
            if self.fail_at is not None and target is not None and not background:
                where = (
                    "fd"
                    if isinstance(target, int)
                    else target
                    if in_directory
                    else os.path.relpath(target, self.root)
                )
                self.calls.append(f"{name}({where})")
                if len(self.calls) == self.fail_at:
                    raise OSError(self.error_number, os.strerror(self.error_number), target)
            return real(*args, **kwargs)

        return call

    def arm(self, fail_at):
        self.calls, self.fail_at = [], fail_at

    def disarm(self):
        self.fail_at = None


def last_verified(root):
    """The epoch `last` names, after checking that it verifies (CRC32s included)."""
    found = find_checkpoint(
        CheckpointLayout(root), validate_params({"ckpt_directory": root}), silent_logger()
    )
    return found.epoch if found else None


def assert_clean(layout):
    assert not os.path.lexists(layout.work)
    assert not os.listdir(layout.trash) if os.path.isdir(layout.trash) else True
    assert not [name for name in os.listdir(layout.ckpts) if ".tmp." in name]


@pytest.mark.parametrize("error_number", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_an_io_error_at_every_step_of_a_save(
    make_checkpointer, ckpt_dir, monkeypatch, error_number
):
    """Epoch 3 of a run (keep_limit 1: its save also deletes epoch 2) fails at step n."""
    injector = Injector(monkeypatch, ckpt_dir, error_number)
    steps_seen, n = [], 0
    while True:
        n += 1
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        checkpointer = make_checkpointer(ckpt_keep_limit=1)
        for epoch in (1, 2):
            checkpointer.epoch_end(epoch, {"loss": 1.0 / epoch}, file_writer(os.urandom(5000)))
        injector.arm(n)
        try:
            checkpointer.epoch_end(3, {"loss": 1 / 3}, file_writer(os.urandom(5000)))
        except CheckpointWriteError as error:
            step = injector.calls[n - 1]
            steps_seen.append(step)
            assert error.errno == error_number
            assert f"saving epoch 3 into '{ckpt_dir}/ckpts' failed" in str(error), step
            assert os.strerror(error_number) in str(error)
            assert f"'last' names epoch {last_verified(ckpt_dir)}" in str(error), step
            assert last_verified(ckpt_dir) in (2, 3), step
            assert not os.path.lexists(checkpointer.layout.work), step
        else:
            if len(injector.calls) < n:
                break
            # a history line (opened per line, reached from the root one directory at a
            # time; its `saved` line fsynced after the save completed) that fails is
            # logged, not raised (docs/FORMAT.md)
            assert injector.calls[n - 1] in (
                "fsync(fd)",
                "open(.)",
                "open(ckpts)",
                "open(history.jsonl)",
            )
            assert last_verified(ckpt_dir) == 3
        finally:
            injector.disarm()
        # the disk is fine again: the next save succeeds and cleans up what was left
        checkpointer.epoch_end(4, {"loss": 0.25}, file_writer(b"x"))
        assert last_verified(ckpt_dir) == 4
        checkpointer.trash.wait()
        assert_clean(checkpointer.layout)
    print(f"{len(steps_seen)} injected {errno.errorcode[error_number]}: {steps_seen}")
    assert len(steps_seen) > 25
    # a name without a directory: a call relative to a directory's descriptor
    for step in (
        "mkdir(work)",
        "open(ckpts/work/model.h5)",
        "open(index.jsonl)",
        "fsync(fd)",
        "rename(work)",
        "symlink(.last.tmp",
        "replace(.best.tmp",
        "rename(002)",
    ):
        assert any(seen.startswith(step) for seen in steps_seen), step


def mount_tmpfs(path, size):
    os.makedirs(path)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


@pytest.mark.slow
def test_keras_save_on_a_full_disk_raises_and_keeps_the_previous_epoch(tmp_path):
    keras = pytest.importorskip("keras")
    from test_keras_restart import fit, params_for, tiny_model

    import candle_ckpt

    mount = str(tmp_path / "small")
    mount_tmpfs(mount, "256k")
    try:
        params = params_for(tmp_path / "small", epochs=2)
        model = tiny_model()
        fit(model, params, 1)
        layout = CheckpointLayout(params["ckpt_directory"])
        saved = [w.copy() for w in model.get_weights()]
        # fill the disk, leaving less than one model.h5
        size = os.path.getsize(os.path.join(layout.epoch_dir(1), "model.h5"))
        with open(os.path.join(mount, "filler"), "wb") as filler:
            free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
            filler.write(b"\0" * (free - size // 2))
        with pytest.raises(CheckpointWriteError) as raised:
            fit(model, params, 2, initial_epoch=1)
        message = str(raised.value)
        assert raised.value.errno == errno.ENOSPC and "saving epoch 2" in message
        assert "No space left on device" in message and "'last' names epoch 1" in message
        del raised
        assert open_files_under(mount) == [layout.log_file]  # no model.h5 left open
        assert last_verified(params["ckpt_directory"]) == 1
        assert not os.path.lexists(layout.work)
        fresh = tiny_model(seed=7)
        assert candle_ckpt.restart(params, fresh, verbose=False)["epoch"] == 1
        for a, b in zip(saved, fresh.get_weights()):
            assert np.array_equal(a, b)
        # space again: the job is rerun and finishes
        os.unlink(os.path.join(mount, "filler"))
        fit(fresh, params, 2, initial_epoch=1)
        assert last_verified(params["ckpt_directory"]) == 2
        assert_clean(layout)
        del keras
    finally:
        candle_ckpt.core.logs.close_tree_log(CheckpointLayout(str(tmp_path / "small" / "save")))
        subprocess.run(["umount", mount], check=True)


def open_files_under(directory):
    """The files this process has open below `directory`."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
        if target.startswith(directory + os.sep):
            found.append(target)
    return found


def test_a_failed_removal_is_retried_by_the_next_deletion(make_checkpointer, monkeypatch, caplog):
    """The trash collector logs a failed removal and empties the trash at the next poke."""
    from candle_ckpt.core import trash

    checkpointer = make_checkpointer(ckpt_keep_limit=1, ckpt_save_best=False)
    real_empty_trash, failures = trash.empty_trash, []

    def failing_once(layout):
        if not failures:
            failures.append(layout)
            raise OSError(errno.EIO, os.strerror(errno.EIO), layout.trash)
        return real_empty_trash(layout)

    monkeypatch.setattr(trash, "empty_trash", failing_once)
    with caplog.at_level("WARNING", logger="candle_ckpt"):
        for epoch in (1, 2):
            checkpointer.epoch_end(epoch, {}, file_writer())
            checkpointer.trash.wait()
    assert "will retry at the next deletion" in caplog.text
    checkpointer.epoch_end(3, {}, file_writer())
    checkpointer.trash.wait()
    assert_clean(checkpointer.layout)
    assert checkpointer.layout.list_epochs() == [3]
