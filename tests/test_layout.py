"""Resolving last/best: relative or absolute links inside epochs/ only."""

import os

import pytest

from candle_ckpt.core.errors import LinkError, ParameterValueError
from candle_ckpt.core.format.layout import CheckpointLayout, epoch_dirname, parse_epoch_dirname
from candle_ckpt.core.save.checkpointer import Checkpointer


@pytest.fixture
def layout(tmp_path):
    layout = CheckpointLayout(tmp_path / "save")
    for epoch in (1, 2, 3, 999, 1000):
        os.makedirs(layout.epoch_dir(epoch))
    return layout


def test_epoch_names_are_zero_padded_and_ordered_numerically(layout):
    assert epoch_dirname(7) == "007" and epoch_dirname(1000) == "1000"
    os.makedirs(os.path.join(layout.epochs, ".004.tmp.abc"))
    os.makedirs(os.path.join(layout.epochs, "7"))  # not canonical: ignored
    assert layout.list_epochs() == [1, 2, 3, 999, 1000]
    assert parse_epoch_dirname("0005") is None and parse_epoch_dirname("000") is None


def test_paths_derive_from_ckpt_directory_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = CheckpointLayout("relative/dir")
    assert layout.root == str(tmp_path / "relative" / "dir")
    assert layout.link("last") == str(tmp_path / "relative/dir/ckpts/last")
    assert layout.log_file == str(tmp_path / "relative/dir/ckpt.log")


def test_missing_link_is_no_checkpoint(layout):
    assert layout.resolve_link("last") is None


def test_relative_link(layout):
    os.symlink("epochs/002", layout.link("last"))
    assert layout.resolve_link("last") == 2


def test_absolute_link_written_by_hand(layout):
    os.symlink(layout.epoch_dir(1000), layout.link("last"))
    assert layout.resolve_link("last") == 1000


def test_dangling_link_is_no_checkpoint(layout):
    os.symlink("epochs/042", layout.link("last"))
    assert layout.resolve_link("last") is None


def test_link_outside_epochs_is_refused(layout, tmp_path):
    os.makedirs(tmp_path / "elsewhere" / "001")
    os.symlink(str(tmp_path / "elsewhere" / "001"), layout.link("last"))
    with pytest.raises(LinkError, match="outside"):
        layout.resolve_link("last")


def test_link_to_ckpts_itself_is_refused(layout):
    os.symlink("..", layout.link("best"))
    with pytest.raises(LinkError, match="outside"):
        layout.resolve_link("best")


def test_link_to_a_file_is_refused(layout):
    with open(os.path.join(layout.epochs, "004"), "w") as stream:
        stream.write("not a directory")
    os.symlink("epochs/004", layout.link("last"))
    with pytest.raises(LinkError, match="not an epoch directory"):
        layout.resolve_link("last")


def test_link_loop_is_refused(layout):
    os.symlink("best", layout.link("last"))
    os.symlink("last", layout.link("best"))
    with pytest.raises(LinkError, match="cannot be resolved"):
        layout.resolve_link("last")


def test_a_directory_instead_of_a_link_is_refused(layout):
    os.makedirs(layout.link("last"))
    with pytest.raises(LinkError, match="not a symlink"):
        layout.resolve_link("last")


def test_moved_tree_keeps_relative_links_valid(layout, tmp_path):
    os.symlink(layout.relative_epoch_target(3), layout.link("last"))
    os.rename(layout.root, tmp_path / "moved")
    assert CheckpointLayout(tmp_path / "moved").resolve_link("last") == 3


@pytest.mark.parametrize(
    "make, directory, culprit",
    [
        (lambda top: (top / "save").write_text(""), "save", "save"),
        (lambda top: (top / "save").write_text(""), "save/sub", "save"),
        (lambda top: (top / "save").symlink_to(top / "gone"), "save", "save"),
        (
            lambda top: ((top / "save").mkdir(), (top / "save/ckpts").write_text("")),
            "save",
            "save/ckpts",
        ),
    ],
    ids=["a file", "under a file", "a dangling symlink", "ckpts a file"],
)
def test_a_ckpt_directory_no_tree_can_live_in_is_a_bad_parameter(
    tmp_path, make, directory, culprit
):
    make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ParameterValueError, match="parameter 'ckpt_directory'") as refused:
        CheckpointLayout(tmp_path / directory).check_can_hold_a_tree()
    assert f"'{tmp_path / culprit}' is a " in str(refused.value)
    assert sorted(os.listdir(tmp_path)) == before


def test_a_new_or_existing_directory_can_hold_a_tree(tmp_path):
    CheckpointLayout(tmp_path / "new" / "save").check_can_hold_a_tree()
    os.makedirs(tmp_path / "old" / "ckpts")
    CheckpointLayout(tmp_path / "old").check_can_hold_a_tree()
    assert not os.path.exists(tmp_path / "new")


def test_the_checkpointer_refuses_a_file_before_writing(tmp_path):
    """The path a run with --ckpt_restart_mode off takes: no restart checked it first."""
    (tmp_path / "save").write_text("")
    with pytest.raises(ParameterValueError, match="'ckpt_directory'"):
        Checkpointer({"epochs": 1, "ckpt_directory": str(tmp_path / "save")}, verbose=False)
    assert (tmp_path / "save").read_text() == "" and os.listdir(tmp_path) == ["save"]
