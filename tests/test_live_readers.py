"""Reading a tree while its job writes it: no false alarms, nothing real missed.

A job saving and pruning an epoch at every save, every read-only command in a loop
beside it (tests/live_readers.py), and the race each soak finds by chance set up
deterministically: an epoch moved into trash/ in the middle of its read.
"""

import os
import subprocess
import sys

import pytest
from conftest import file_writer, flip_byte
from live_readers import soak

from candle_ckpt.core.format.layout import CheckpointLayout
from candle_ckpt.core.restore import verify
from candle_ckpt.operator import inventory
from candle_ckpt.operator.cli import main

CLI = [sys.executable, "-m", "candle_ckpt"]


def assert_clean(outcome, corrupted_runs_expected=True):
    print({k: v for k, v in outcome.items() if k != "failures"})  # the counts, with -s
    assert outcome["failures"] == [] and outcome["false_alarms"] == outcome["missed"] == 0
    if corrupted_runs_expected:
        assert outcome["after_corruption"] > 0
        assert outcome["detections"] == outcome["after_corruption"]


@pytest.mark.slow
def test_keras_job_pruning_at_every_save_no_false_alarm_and_a_flipped_byte_found(tmp_path):
    outcome = soak(str(tmp_path / "save"), str(tmp_path), "keras", 16, corrupt="model")
    assert_clean(outcome)


def test_async_plain_job_no_false_alarm_and_a_flipped_info_byte_found(tmp_path):
    outcome = soak(str(tmp_path / "save"), str(tmp_path), "plain", 10, True, corrupt="info")
    assert_clean(outcome)


# -- the race, set up: an epoch pruned in the middle of its read --------------------


def tree_of(ckpt_dir, make_checkpointer, epochs=3):
    checkpointer = make_checkpointer(epochs=epochs, ckpt_save_best=False)
    for epoch in range(1, epochs + 1):
        checkpointer.epoch_end(epoch, {"loss": 1.0}, file_writer(b"epoch %d" % epoch))
    checkpointer.finish()
    return CheckpointLayout(ckpt_dir)


def prune_during_crc(monkeypatch, layout, epoch, then=None):
    """Make the CRC32 of epoch `epoch`'s model file move the epoch into trash/ first,
    as the job's keep policy does (once); `then()` runs after the move."""
    real = verify.crc32_file

    def pruned_first(path, **kwargs):
        directory = layout.epoch_dir(epoch)
        if path.startswith(directory + os.sep) and os.path.isdir(directory):
            os.makedirs(layout.trash, exist_ok=True)
            os.rename(directory, os.path.join(layout.trash, f"{epoch:03d}.pruned"))
            if then is not None:
                then()
        return real(path, **kwargs)

    monkeypatch.setattr(verify, "crc32_file", pruned_first)


def test_a_named_epoch_pruned_while_verified_is_one_line_and_status_3(
    ckpt_dir, make_checkpointer, monkeypatch, capsys
):
    layout = tree_of(ckpt_dir, make_checkpointer)
    prune_during_crc(monkeypatch, layout, 2)
    assert main(["verify", ckpt_dir, "2"]) == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "epoch 2: " in err and "pruned or moved away" in err


def test_verify_all_and_list_verify_say_pruned_meanwhile_and_exit_0(
    ckpt_dir, make_checkpointer, monkeypatch, capsys
):
    layout = tree_of(ckpt_dir, make_checkpointer)
    prune_during_crc(monkeypatch, layout, 2)
    assert main(["verify", ckpt_dir, "--all"]) == 0
    out = capsys.readouterr().out
    assert "epoch 2: pruned meanwhile" in out and "CORRUPT" not in out
    assert out.count(": ok (") == 2
    prune_during_crc(monkeypatch, layout, 3)
    assert main(["list", ckpt_dir, "--verify"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[0] for row in rows if "pruned meanwhile" in row] == ["3"]
    assert not any("BAD" in row for row in rows)


def test_a_corrupt_epoch_that_stays_is_still_bad(ckpt_dir, make_checkpointer, capsys):
    layout = tree_of(ckpt_dir, make_checkpointer)
    flip_byte(os.path.join(layout.epoch_dir(2), "model.h5"))
    flip_byte(os.path.join(layout.epoch_dir(3), "ckpt-info.json"), offset=5)
    assert main(["verify", ckpt_dir, "--all"]) == 1
    out = capsys.readouterr().out
    assert "epoch 2: CORRUPT (1 of 1 file)" in out and "epoch 3: CORRUPT: " in out
    assert main(["list", ckpt_dir, "--verify"]) == 1
    rows = {row.split()[0]: row for row in capsys.readouterr().out.splitlines()[3:]}
    assert "BAD: crc32" in rows["2"] and "BAD: invalid ckpt-info.json" in rows["3"]


def test_an_epoch_replaced_while_read_is_not_a_mix(
    ckpt_dir, make_checkpointer, monkeypatch, capsys
):
    """A rollback re-run replaces epochs/002 between the read of its ckpt-info.json and
    of its model file: the CRC32s differ, but it is a replaced directory, not damage."""
    layout = tree_of(ckpt_dir, make_checkpointer)
    other = layout.epoch_dir(2) + ".new"
    os.mkdir(other)
    with open(os.path.join(other, "model.h5"), "wb") as stream:
        stream.write(b"epoch 2, trained again")
    prune_during_crc(monkeypatch, layout, 2, then=lambda: os.rename(other, layout.epoch_dir(2)))
    assert main(["verify", ckpt_dir, "2"]) == 3
    assert "was replaced by another directory" in capsys.readouterr().err


def test_verify_and_export_of_best_read_again_the_epoch_best_names_now(
    ckpt_dir, make_checkpointer, monkeypatch, capsys
):
    layout = tree_of(ckpt_dir, make_checkpointer)
    os.symlink("epochs/002", layout.link("best"))

    def repoint_best():
        os.symlink("epochs/003", layout.link("best") + ".tmp")
        os.replace(layout.link("best") + ".tmp", layout.link("best"))

    prune_during_crc(monkeypatch, layout, 2, then=repoint_best)
    assert main(["verify", ckpt_dir, "best"]) == 0
    assert capsys.readouterr().out == "epoch 3: ok (1 file CRC32-verified)\n"


def test_a_link_repointed_while_read_is_read_again(ckpt_dir, make_checkpointer, monkeypatch):
    """best -> 002 is read, then the job repoints it to 003 and prunes 002 before it is
    resolved: not dangling, best -> epochs/003."""
    layout = tree_of(ckpt_dir, make_checkpointer)
    os.symlink("epochs/002", layout.link("best"))
    real = CheckpointLayout.resolve_link
    moved = []

    def repointed_first(self, name):
        if name == "best" and not moved:
            moved.append(True)
            os.symlink("epochs/003", layout.link("best") + ".tmp")
            os.replace(layout.link("best") + ".tmp", layout.link("best"))
            os.rename(layout.epoch_dir(2), os.path.join(ckpt_dir, "gone"))
            return None  # what resolving the old target found: nothing
        return real(self, name)

    monkeypatch.setattr(CheckpointLayout, "resolve_link", repointed_first)
    state = inventory.link_state(layout, "best")
    assert (state.target, state.epoch, state.problem) == ("epochs/003", 3, None)


def test_a_dangling_link_that_stays_is_still_reported(ckpt_dir, make_checkpointer):
    layout = tree_of(ckpt_dir, make_checkpointer)
    os.symlink("epochs/007", layout.link("best"))
    result = subprocess.run([*CLI, "list", ckpt_dir, "--verify"], capture_output=True, text=True)
    assert result.returncode == 0 and "best: '" in result.stdout
    assert "-> 'epochs/007' is dangling" in result.stdout
    result = subprocess.run([*CLI, "verify", ckpt_dir, "best"], capture_output=True, text=True)
    assert result.returncode == 2 and "is dangling" in result.stderr
