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
import re
import shutil
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
from conftest import file_writer
from keras_helpers import seeded_state

from candle_ckpt.core.errors import SAVE_FAILED_EXIT_STATUS, CheckpointWriteError, exit_status
from candle_ckpt.core.format.layout import CheckpointLayout
from candle_ckpt.core.logs import silent_logger
from candle_ckpt.core.params import validate_params
from candle_ckpt.core.restore.resume import find_checkpoint

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


THROUGH_FD = "/proc/self/fd/"  # how the model writer reaches work/ (tree_fs.through_descriptor)


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
                    (
                        a
                        for a in args[:2]
                        if isinstance(a, int) or str(a).startswith((self.root, THROUGH_FD))
                    ),
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
                    # the model writer's files, reached through work/'s descriptor
                    else "work/" + target.split("/", 5)[5]
                    if target.startswith(THROUGH_FD)
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
        "open(work/model.h5)",
        "open(index.jsonl)",
        "fsync(fd)",
        "rename(work)",
        "symlink(.last.tmp",
        "replace(.best.tmp",
        "rename(002)",
    ):
        assert any(seen.startswith(step) for seen in steps_seen), step


@pytest.mark.parametrize("error_number", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_out_of_space_and_over_quota_say_what_to_do(
    make_checkpointer, ckpt_dir, monkeypatch, caplog, error_number
):
    """The remedy differs: a full file system is freed or left, a quota freed or raised."""
    injector = Injector(monkeypatch, ckpt_dir, error_number)
    checkpointer = make_checkpointer()
    checkpointer.epoch_end(1, {"loss": 1.0}, file_writer(os.urandom(5000)))
    injector.arm(10**6)  # counts the calls of a save, failing none
    checkpointer.epoch_end(2, {"loss": 0.5}, file_writer(os.urandom(5000)))
    n = injector.calls.index("open(work/model.h5)") + 1
    injector.arm(n)
    with pytest.raises(CheckpointWriteError) as raised:
        checkpointer.epoch_end(3, {"loss": 0.25}, file_writer(os.urandom(5000)))
    injector.disarm()
    message = str(raised.value)
    assert injector.calls[n - 1] == "open(work/model.h5)"
    assert exit_status(raised.value) == SAVE_FAILED_EXIT_STATUS
    free = os.statvfs(ckpt_dir).f_bavail * os.statvfs(ckpt_dir).f_frsize
    found = re.search(r"([\d.]+) MB free; the last save wrote ([\d.]+) MB\)", message)
    assert abs(float(found.group(1)) * 1e6 - free) < 50e6  # others write to this disk too
    assert float(found.group(2)) * 1e6 >= 5000
    if error_number == errno.EDQUOT:
        assert "Disk quota exceeded" in message and "The disk quota is exceeded" in message
        assert "ask for a larger one" in message and "file system is full" not in message
    else:
        assert "No space left on device" in message and "The file system is full" in message
        assert "quota" not in message
    assert message.endswith("then rerun: the job resumes from 'last'")
    assert f"SAVE FAILED: {message.split('] ', 1)[1]}" in caplog.text


@pytest.mark.parametrize("short_writes", [False, True], ids=["whole", "short"])
def test_a_file_laid_out_in_memory_is_the_file_hdf5_wrote(tmp_path, monkeypatch, short_writes):
    """HDF5 writes into a `FileImage` (rewriting some of its bytes, as it does its
    superblock); `write_file` puts those bytes and the large arrays at their offsets,
    continuing short writes (a file system filling up writes part of what it is given)."""
    import h5py

    if short_writes:
        monkeypatch.setattr(
            os, "pwritev", lambda fd, buffers, at: os.pwrite(fd, buffers[0][:7], at)
        )

    from candle_ckpt.hdf5 import FileImage, create_array, create_file, write_file

    arrays = {str(k): np.random.default_rng(k).random(size) for k, size in enumerate((3, 9000, 50))}
    image, direct = FileImage(), []
    with create_file(image) as f:
        f.attrs["note"] = "x" * 100
        for name, array in arrays.items():
            create_array(f.create_group(f"g{name}"), name, array, direct)
    assert len(direct) == 1  # the 72 000-byte array, left for write_at
    path = str(tmp_path / "model.h5")
    written = write_file(path, image, direct)
    with open(path, "rb") as stream:
        contents = stream.read()
    assert len(contents) == image.size and written.crc32 == zlib.crc32(contents)
    image.seek(0)
    assert (
        image.read(image.size)
        == contents[: direct[0][0]]
        + bytes(direct[0][1].nbytes)
        + contents[direct[0][0] + direct[0][1].nbytes :]
    )
    with h5py.File(path, "r") as f:
        assert f.attrs["note"] == "x" * 100
        for name, array in arrays.items():
            assert np.array_equal(f[f"g{name}/{name}"][()], array)


def mount_tmpfs(path, size):
    """Mount a tmpfs of `size` (e.g. "256k", or mount options "size=64m,nr_inodes=20")."""
    os.makedirs(path)
    options = size if "=" in size else f"size={size}"
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", path],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        reason = result.stderr.strip()
        pytest.skip(f"cannot mount a tmpfs here (a real full disk needs one): {reason}")


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
    from candle_ckpt.core.storage import trash

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


# The issue 33 job: about 0.6 MB a model file, every epoch kept, so a small tmpfs fills
# within a few epochs.
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SCRIPTS = {"keras": "benchmark.py", "torch": "benchmark_pytorch.py"}
FULL_DISK_JOB = [
    *("--n_samples", "256", "--n_features", "64", "--dense", "[200,200]"),
    *("--ckpt_keep_mode", "all"),
]
PAGE = 4096  # tmpfs counts its size in pages


def run_example(framework, root, epochs, mode, expect):
    """Run the framework's example benchmark on the tree `root`; return its stderr lines
    that are not the library's log records (what the job itself printed)."""
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(EXAMPLES, SCRIPTS[framework]),
            *FULL_DISK_JOB,
            *("--epochs", str(epochs), "--ckpt_directory", str(root)),
            *("--ckpt_async", "true" if mode == "async" else "false"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == expect, result.stderr[-3000:]
    return [
        line
        for line in result.stderr.splitlines()
        if line and not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ candle_ckpt", line)
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """{framework: the tree of an uninterrupted 4-epoch run of its example}, made once."""
    made = {}

    def tree(framework):
        if framework not in made:
            made[framework] = tmp_path_factory.mktemp(framework) / "save"
            run_example(framework, made[framework], 4, "sync", expect=0)
        return made[framework]

    return tree


def fill(mount, leave_pages):
    """Fill the file system at `mount` with a file, leaving `leave_pages` pages free."""
    found = os.statvfs(mount)
    free_pages = found.f_bavail * found.f_frsize // PAGE
    with open(os.path.join(mount, "filler"), "wb") as filler:
        filler.write(b"\0" * (free_pages - leave_pages) * PAGE)


def check_full_disk_run(framework, mode, root, lines):
    """One line, status 5 (asserted by `run_example`); `last` verifies and is the epoch
    the line names; ckpt.log has the error if it could be written. Returns the line."""
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"{SCRIPTS[framework]}: CheckpointWriteError: [Errno 28] saving ")
    assert "No space left on device" in line and "The file system is full (" in line
    assert "'last' names epoch None" not in line  # the job saved before the disk filled
    assert "h5py" not in line and "HDF5" not in line
    last = last_verified(str(root))
    assert f"'last' names epoch {last}" in line
    verified = subprocess.run(
        [sys.executable, "-m", "candle_ckpt", "verify", str(root)], capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    with open(os.path.join(root, "ckpt.log"), errors="replace") as log:
        text = log.read()
    assert "SAVE FAILED: saving epoch" in text or not text.endswith("\n")
    return line


@pytest.mark.slow
@pytest.mark.parametrize(
    "framework, mode, leave",
    [
        ("keras", "sync", -1),  # in model.h5
        ("keras", "async", 0),  # model.h5 fits, what follows does not
        ("torch", "sync", 0),
        ("torch", "async", -1),
    ],
)
def test_a_full_file_system_stops_the_job_with_status_5_and_one_line(
    tmp_path, uninterrupted, framework, mode, leave
):
    """A real tmpfs, filled so that epoch 3's save finds `leave` pages more than its model
    file needs: the job exits 5 with one line, `last` verifies, and once space is freed
    the rerun resumes from `last` and ends as an uninterrupted run does, bit for bit."""
    pytest.importorskip(framework)
    reference = uninterrupted(framework)
    mount = str(tmp_path / "small")
    mount_tmpfs(mount, "4m")
    root = os.path.join(mount, "save")
    try:
        run_example(framework, root, 2, mode, expect=0)
        model_file = os.path.join(root, "ckpts", "last", "model.h5")
        fill(mount, -(-os.path.getsize(model_file) // PAGE) + leave)
        lines = run_example(framework, root, 4, mode, expect=5)
        print(check_full_disk_run(framework, mode, root, lines))
        os.unlink(os.path.join(mount, "filler"))
        assert run_example(framework, root, 4, mode, expect=0) == []
        assert last_verified(root) == 4
        ours = seeded_state(os.path.join(root, "ckpts", "epochs", "004", "model.h5"), framework)
        theirs = seeded_state(reference / "ckpts" / "epochs" / "004" / "model.h5", framework)
        assert sorted(ours) == sorted(theirs)
        for name in ours:
            assert ours[name].tobytes() == theirs[name].tobytes(), name
    finally:
        subprocess.run(["umount", mount], check=True)


@pytest.mark.soak
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("framework", ["keras", "torch"])
def test_a_sweep_of_full_file_systems_never_crashes_a_job(tmp_path, framework, mode):
    """Issue 33's sweep: tmpfs of 3 to 9 MB (where HDF5 used to crash the process), and
    of a few inodes too many or too few for the next epoch (so that creating a
    directory, a file or a link fails): every run exits 5 with one line and `last`
    verifies (about 20 runs, a few minutes)."""
    pytest.importorskip(framework)
    limits = [f"size={megabytes}m" for megabytes in range(3, 10)]
    limits += [f"size=64m,nr_inodes={count}" for count in range(18, 30)]
    for limit in limits:
        mount = str(tmp_path / limit.replace(",", "-").replace("=", ""))
        mount_tmpfs(mount, limit)
        root = os.path.join(mount, "save")
        try:
            lines = run_example(framework, root, 30, mode, expect=5)
            print(limit, check_full_disk_run(framework, mode, root, lines))
        finally:
            subprocess.run(["umount", mount], check=True)
