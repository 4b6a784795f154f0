"""The rules the restart path owns: an epoch's check, and the best epoch of a legacy tree."""

import json
import os

import pytest
from conftest import file_writer

from candle_ckpt.core.errors import NoCheckpointError
from candle_ckpt.core.format.layout import CheckpointLayout
from candle_ckpt.core.restore.resume import legacy_best_epoch, read_epoch_info
from candle_ckpt.core.restore.verify import check_epoch
from candle_ckpt.core.save.checkpointer import Checkpointer
from candle_ckpt.operator.admin import best_epoch_at


def write_legacy_epoch(root, epoch, best_value):
    directory = root / "ckpts" / "epochs" / f"{epoch:03d}"
    directory.mkdir(parents=True)
    (directory / "model.h5").write_bytes(b"weights")
    (directory / "ckpt-info.json").write_text(
        json.dumps(
            {
                "epoch": epoch,
                "save_best_metric": "val_loss",
                "best_metric_last": best_value,
                "model_file": "model.h5",
                "checksum": "__DISABLED__",
                "timestamp": "2021-05-03 10:00:00",
                "time_elapsed": 1.0,
                "metadata": None,
            }
        )
    )


@pytest.fixture
def legacy_tree(tmp_path):
    """Upstream CANDLE saved epochs 1-4; val_loss last improved at epoch 2."""
    root = tmp_path / "save"
    for epoch, best in ((1, 0.9), (2, 0.5), (3, 0.5), (4, 0.5)):
        write_legacy_epoch(root, epoch, best)
    os.symlink("epochs/004", root / "ckpts" / "best")  # a later timeline's best
    return CheckpointLayout(str(root))


def test_the_best_epoch_of_a_legacy_run_is_the_first_recording_its_best_value(legacy_tree):
    info = read_epoch_info(legacy_tree, 3)
    assert legacy_best_epoch(legacy_tree, info) == 2
    assert legacy_best_epoch(legacy_tree, read_epoch_info(legacy_tree, 1)) == 1


def test_rollback_and_resume_agree_on_the_legacy_best_epoch(legacy_tree, make_checkpointer):
    info = read_epoch_info(legacy_tree, 3)
    assert best_epoch_at(legacy_tree, info)[0] == 2
    checkpointer = Checkpointer({"ckpt_directory": legacy_tree.root, "epochs": 5}, logger=None)
    checkpointer.resume(info)
    assert checkpointer.best.epoch == 2 and checkpointer.best.value == 0.5


def test_a_pruned_legacy_best_epoch_gives_the_first_left_with_its_value(legacy_tree):
    os.rename(legacy_tree.epoch_dir(2), legacy_tree.epoch_dir(2) + ".gone")
    assert legacy_best_epoch(legacy_tree, read_epoch_info(legacy_tree, 4)) == 3


def test_no_legacy_best_epoch_without_a_best_value(tmp_path):
    write_legacy_epoch(tmp_path / "save", 1, float("inf"))  # CANDLE's initial Infinity
    layout = CheckpointLayout(str(tmp_path / "save"))
    assert legacy_best_epoch(layout, read_epoch_info(layout, 1)) is None


def test_check_epoch_reports_every_bad_file_without_raising(make_checkpointer, ckpt_dir):
    make_checkpointer(epochs=1).epoch_end(1, {"loss": 1.0}, file_writer(b"x" * 1000))
    layout = CheckpointLayout(ckpt_dir)
    os.truncate(os.path.join(layout.epoch_dir(1), "model.h5"), 10)
    check = check_epoch(layout, 1)
    assert [bad.problem for bad in check.bad] == ["size"]
    assert "model.h5: size 10 bytes, ckpt-info.json records 1000" in check.problems()
    with pytest.raises(NoCheckpointError, match="002"):
        check_epoch(layout, 2)
