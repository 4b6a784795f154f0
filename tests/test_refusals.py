"""A refused restart names its remedy and reaches ckpt.log; a locked tree is refused
before anything is read; the restart log counts the bytes on disk; a mistyped
`ckpt_save_best_metric` stops the first epoch before anything is saved (issue 13,
frictions 3, 4, 6, 8 and 10). In-process, with tiny PyTorch models."""

import argparse
import os
import socket
import subprocess
import sys

import pytest
from conftest import flip_byte

torch = pytest.importorskip("torch")

import candle_ckpt  # noqa: E402
from candle_ckpt.core.errors import (  # noqa: E402
    CheckpointError,
    CheckpointWriteError,
    ChecksumMismatchError,
    LinkError,
    NoCheckpointError,
    ParameterValueError,
    WriterLockedError,
    exit_status,
)
from candle_ckpt.core.format.layout import CheckpointLayout  # noqa: E402
from candle_ckpt.core.logs import close_tree_log, silent_logger  # noqa: E402
from candle_ckpt.core.restore import restart as core_restart  # noqa: E402
from candle_ckpt.core.run.lock import WriterLock  # noqa: E402

HOLD = """
import sys, time
from candle_ckpt.core.run.lock import WriterLock
from candle_ckpt.core.logs import silent_logger
lock = WriterLock(sys.argv[1], silent_logger())
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""
TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=TOP)


def train(root, epochs, **flags):
    """Train a tiny model for `epochs` epochs into `root`; return its checkpointer."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    ckpt = candle_ckpt.CandleCkptPyTorch(
        {"ckpt_directory": str(root), "epochs": epochs, **flags}, verbose=False
    )
    ckpt.set_model({"model": net, "optimizer": torch.optim.SGD(net.parameters(), lr=0.1)})
    ckpt.restart(net, verbose=False)
    for epoch in range(epochs):
        ckpt.ckpt_epoch(epoch, {"val_loss": 1.0 / (epoch + 1)})
    return ckpt


def restart(root, **flags):
    net = torch.nn.Linear(4, 1)
    ckpt = candle_ckpt.CandleCkptPyTorch(
        {"ckpt_directory": str(root), "epochs": 9, **flags}, verbose=False
    )
    ckpt.set_model({"model": net, "optimizer": torch.optim.SGD(net.parameters(), lr=0.1)})
    return ckpt.restart(net, verbose=False)


def flip_a_byte(path):
    flip_byte(path, os.path.getsize(path) // 2, 0x01)


def ckpt_log(root):
    close_tree_log(CheckpointLayout(str(root)))  # flushed and closed, as at exit
    with open(os.path.join(root, "ckpt.log")) as stream:
        return stream.read()


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "save"
    train(root, 3)
    yield root
    close_tree_log(CheckpointLayout(str(root)))


def test_a_corrupt_last_names_fallback_rollback_and_list_verify_and_is_logged(tree):
    flip_a_byte(tree / "ckpts" / "epochs" / "003" / "model.h5")
    with pytest.raises(ChecksumMismatchError) as raised:
        restart(tree)
    message = str(raised.value)
    assert "checksum mismatch in '" in message and "epochs/003/model.h5" in message
    assert "rerun with --ckpt_restart_fallback true" in message
    assert f"'candle-ckpt rollback {tree} N'" in message
    assert f"'candle-ckpt list --verify {tree}'" in message
    assert exit_status(raised.value) == 3
    assert f"RESTART REFUSED: {message}" in ckpt_log(tree)


def test_the_same_restart_with_the_named_fallback_resumes(tree):
    flip_a_byte(tree / "ckpts" / "epochs" / "003" / "model.h5")
    assert restart(tree, ckpt_restart_fallback=True)["epoch"] == 2


def test_nothing_to_fall_back_to_names_verify_all(tree):
    for epoch in (1, 2, 3):
        flip_a_byte(tree / "ckpts" / "epochs" / f"{epoch:03d}" / "model.h5")
    with pytest.raises(CheckpointError) as raised:
        restart(tree, ckpt_restart_fallback=True)
    message = str(raised.value)
    assert "no earlier epoch verifies" in message
    assert f"'candle-ckpt verify {tree} --all'" in message
    assert "--ckpt_restart_mode off" in message
    assert "RESTART REFUSED" in ckpt_log(tree)


def test_a_last_link_out_of_the_tree_names_rollback(tree, tmp_path):
    last = tree / "ckpts" / "last"
    os.remove(last)
    os.symlink(tmp_path, last)
    with pytest.raises(LinkError) as raised:
        restart(tree, ckpt_restart_fallback=True)
    assert f"'candle-ckpt rollback {tree} N'" in str(raised.value)
    assert exit_status(raised.value) == 3


def test_required_without_a_checkpoint_names_auto(tmp_path):
    with pytest.raises(NoCheckpointError) as raised:
        restart(tmp_path / "save", ckpt_restart_mode="required")
    assert "--ckpt_restart_mode auto" in str(raised.value)


@pytest.fixture
def holder(tree):
    """Another process writing `tree` (it holds ckpts/.lock)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tree / "ckpts")],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert process.stdout.readline() == "locked\n"
    yield process
    process.kill()
    process.wait()


def test_a_locked_tree_is_refused_before_the_checkpoint_is_read(tree, holder, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the checkpoint was read although the tree is locked")

    monkeypatch.setattr(core_restart, "find_checkpoint", must_not_run)
    with pytest.raises(WriterLockedError) as raised:
        restart(tree)
    message = str(raised.value)
    assert f"pid {holder.pid} on host {socket.gethostname()}" in message
    assert "give this one another ckpt_directory" in message
    assert exit_status(raised.value) == 4
    assert "RESTART REFUSED" in ckpt_log(tree)


def test_the_lock_check_takes_nothing_and_a_reader_still_restarts(tree, holder):
    assert restart(tree, ckpt_save_interval=0)["epoch"] == 3  # will never write
    net = torch.nn.Linear(4, 1)
    reader = candle_ckpt.CandleCkptPyTorch(
        {"ckpt_directory": str(tree), "epochs": 9}, verbose=False, is_writer=False
    )
    reader.set_model({"model": net, "optimizer": torch.optim.SGD(net.parameters(), lr=0.1)})
    assert reader.restart(net, verbose=False)["epoch"] == 3
    holder.kill()
    holder.wait()
    lock = WriterLock(str(tree / "ckpts"), silent_logger())
    lock.check_free()  # free now; checking twice changes nothing
    lock.check_free()
    lock.acquire()
    lock.release()


def test_restart_log_reports_the_bytes_on_disk(tree):
    restart(tree)
    model_file = tree / "ckpts" / "epochs" / "003" / "model.h5"
    size = os.path.getsize(model_file)
    assert f"restarted from epoch 3: read and verified {size} bytes (model.h5)" in ckpt_log(tree)


def test_a_mistyped_metric_stops_the_first_epoch_and_saves_nothing(tmp_path):
    root = tmp_path / "save"
    with pytest.raises(ParameterValueError) as raised:
        train(root, 3, ckpt_save_best_metric="val_losss")
    message = str(raised.value)
    assert "'ckpt_save_best_metric' is 'val_losss'" in message
    assert "['val_loss']" in message and "did you mean 'val_loss'?" in message
    assert exit_status(raised.value) == 2
    layout = CheckpointLayout(str(root))
    assert layout.list_epochs() == [] and not os.path.lexists(layout.link("last"))
    WriterLock(layout.ckpts, silent_logger()).acquire()  # released when it failed
    close_tree_log(layout)


def test_exit_statuses_are_distinct():
    errors = [
        ParameterValueError("p"),
        ChecksumMismatchError("f", "1", "2"),
        WriterLockedError("l"),
        CheckpointWriteError(5, "w"),
    ]
    statuses = [exit_status(error) for error in errors]
    assert statuses == [2, 3, 4, 5]
    assert 75 not in statuses and 1 not in statuses


def test_ckpt_parser_help_shows_the_effective_defaults():
    parser = argparse.ArgumentParser()
    candle_ckpt.ckpt_parser(parser)
    assert "(default: 1000000)" in " ".join(parser.format_help().split())
    parser.set_defaults(ckpt_keep_limit=3)  # a benchmark's parameter file
    text = " ".join(parser.format_help().split())
    assert "(default: 3)" in text and "1000000" not in text
