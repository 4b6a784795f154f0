"""The list index (ckpts/index.jsonl): `list` shows with it exactly what it shows without.

Every test compares a survey that uses the index with one that reads every epoch's
ckpt-info.json head (`survey(use_index=False)`, what `list` did before the index), and
counts the heads the first one read, so that a test fails both when the index makes
`list` wrong and when it is silently not used.
"""

import json
import os
import subprocess
import sys
import textwrap

import jsonschema
import pytest
from conftest import file_writer

from candle_ckpt.core.format.index import MAX_INDEX_BYTES_PER_EPOCH, read_index
from candle_ckpt.core.format.layout import INDEX_FILE, CheckpointLayout
from candle_ckpt.core.restore.resume import read_epoch_info
from candle_ckpt.operator import inventory

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = os.path.join(os.path.dirname(HERE), "schemas", "index-line.schema.json")


def rows(tree):
    return [
        {name: getattr(summary, name) for name in inventory.EpochSummary.__slots__}
        for summary in tree.epochs
    ]


@pytest.fixture
def heads_read(monkeypatch):
    """The epochs whose ckpt-info.json a survey read (the others came from the index)."""
    read = []
    real = inventory._summarise

    def counting(epoch, directory):
        read.append(epoch)
        return real(epoch, directory)

    monkeypatch.setattr(inventory, "_summarise", counting)
    return read


def assert_same_as_without_index(layout, heads_read, expected_heads):
    """Survey with the index: the same rows as without, `expected_heads` read."""
    heads_read.clear()
    with_index = inventory.survey(layout)
    assert sorted(heads_read) == sorted(expected_heads)
    assert rows(with_index) == rows(inventory.survey(layout, use_index=False))
    return with_index


def save(checkpointer, epochs, loss=1.0):
    for epoch in epochs:
        checkpointer.epoch_end(epoch, {"loss": loss / epoch, "acc": 0.5}, file_writer(b"w"))


def index_lines(layout):
    with open(os.path.join(layout.ckpts, INDEX_FILE), "rb") as stream:
        return stream.read().splitlines(keepends=True)


def test_each_save_appends_one_line_naming_its_directory(make_checkpointer, heads_read):
    checkpointer = make_checkpointer(epochs=4)
    save(checkpointer, range(1, 5))
    layout = checkpointer.layout
    lines = [json.loads(line) for line in index_lines(layout)]
    with open(SCHEMA) as stream:
        validator = jsonschema.Draft202012Validator(json.load(stream))
    for line in lines:
        validator.validate(line)
    with os.scandir(layout.epochs) as entries:
        inodes = {int(entry.name): entry.inode() for entry in entries}
    assert [(line[0], line[1]) for line in lines] == sorted(inodes.items())
    tree = assert_same_as_without_index(layout, heads_read, [])
    assert [s.metrics for s in tree.epochs] == [
        {"loss": 1.0 / epoch, "acc": 0.5} for epoch in range(1, 5)
    ]


def test_no_index_a_damaged_one_or_a_torn_line(make_checkpointer, heads_read):
    checkpointer = make_checkpointer(epochs=4)
    save(checkpointer, range(1, 5))
    layout = checkpointer.layout
    path = os.path.join(layout.ckpts, INDEX_FILE)
    lines = index_lines(layout)
    with open(path, "wb") as stream:  # a kill tore the last line
        stream.writelines([*lines[:3], lines[3][:20]])
    assert_same_as_without_index(layout, heads_read, [4])
    with open(path, "wb") as stream:  # damage in a line, a line of another shape
        stream.writelines([lines[0], b'[2,"x"\n', b'{"epoch": 3}\n', lines[3]])
    assert_same_as_without_index(layout, heads_read, [2, 3])
    with open(path, "wb") as stream:
        stream.write(b"\xff\x00 not json\n")
    assert_same_as_without_index(layout, heads_read, [1, 2, 3, 4])
    os.unlink(path)
    assert_same_as_without_index(layout, heads_read, [1, 2, 3, 4])


def test_lines_written_before_metric_value_are_still_read(make_checkpointer, heads_read):
    """Lines of nine fields, the metrics an object and no metric_value (the first release
    of the index), are used as before."""
    checkpointer = make_checkpointer(epochs=3)
    save(checkpointer, range(1, 4))
    layout = checkpointer.layout
    lines = [json.loads(line) for line in index_lines(layout)]
    older = [[*line[:5], *line[6:8], json.loads(line[8]), line[9]] for line in lines]
    with open(os.path.join(layout.ckpts, INDEX_FILE), "w") as stream:
        stream.writelines(json.dumps(line) + "\n" for line in older[:2] + lines[2:])
    tree = assert_same_as_without_index(layout, heads_read, [])
    assert [s.metric_value for s in tree.epochs] == [1.0 / epoch for epoch in range(1, 4)]


def test_metrics_text_that_is_not_an_object_reads_as_no_metrics(make_checkpointer, heads_read):
    checkpointer = make_checkpointer(epochs=2)
    save(checkpointer, range(1, 3))
    layout = checkpointer.layout
    lines = [json.loads(line) for line in index_lines(layout)]
    lines[0][8] = lines[0][8][:-1]  # damage that leaves the line itself well-formed
    lines[1][8] = "[1]"
    with open(os.path.join(layout.ckpts, INDEX_FILE), "w") as stream:
        stream.writelines(json.dumps(line) + "\n" for line in lines)
    heads_read.clear()
    tree = inventory.survey(layout)
    assert heads_read == []
    assert [s.metrics for s in tree.epochs] == [None, None]
    assert [s.metric_value for s in tree.epochs] == [1.0, 0.5]


def test_a_line_naming_another_inode_or_epoch_is_not_used(make_checkpointer, heads_read):
    checkpointer = make_checkpointer(epochs=3)
    save(checkpointer, range(1, 4))
    layout = checkpointer.layout
    lines = [json.loads(line) for line in index_lines(layout)]
    lines[0][1] += 10**9  # a stale line: its directory was replaced
    lines[1][0] = 3  # the line of epoch 2's directory, as if it said epoch 3
    with open(os.path.join(layout.ckpts, INDEX_FILE), "w") as stream:
        stream.writelines(json.dumps(line) + "\n" for line in lines)
    # epoch 3's own line is the last naming its inode, so it is still used
    assert_same_as_without_index(layout, heads_read, [1, 2])


def test_a_directory_renamed_by_hand_is_read_from_its_file(make_checkpointer, heads_read):
    checkpointer = make_checkpointer(epochs=3)
    save(checkpointer, range(1, 4))
    layout = checkpointer.layout
    os.rename(layout.epoch_dir(3), layout.epoch_dir(7))  # keeps its inode
    tree = assert_same_as_without_index(layout, heads_read, [7])
    assert "records epoch 3; expected 7" in tree.epochs[-1].problem


def test_pruned_and_replaced_epochs(make_checkpointer, heads_read):
    """The keep policy deletes, a rollback abandons, the next run replaces epochs."""
    checkpointer = make_checkpointer(epochs=6, ckpt_keep_limit=2, ckpt_save_best=False)
    save(checkpointer, range(1, 6))
    layout = checkpointer.layout
    checkpointer.trash.wait()
    tree = assert_same_as_without_index(layout, heads_read, [])
    assert [s.epoch for s in tree.epochs] == [4, 5]
    # a restart from epoch 4 (as after a rollback): epoch 5 is saved again, differently
    again = make_checkpointer(epochs=6, ckpt_keep_limit=2, ckpt_save_best=False)
    again.resume(read_epoch_info(layout, 4))
    save(again, [5], loss=7.0)
    tree = assert_same_as_without_index(layout, heads_read, [])
    assert tree.epochs[-1].metrics == {"loss": 7.0 / 5, "acc": 0.5}


def test_an_index_of_mostly_deleted_epochs_is_not_read(make_checkpointer, heads_read):
    checkpointer = make_checkpointer(epochs=2)
    save(checkpointer, [1, 2])
    layout = checkpointer.layout
    line = index_lines(layout)[-1]
    with open(os.path.join(layout.ckpts, INDEX_FILE), "ab") as stream:
        stream.write(line * (3 * MAX_INDEX_BYTES_PER_EPOCH // len(line)))
    assert read_index(layout.ckpts, 2) == {}
    assert read_index(layout.ckpts, 10) != {}
    assert_same_as_without_index(layout, heads_read, [1, 2])


# A run saves epochs 1-3, `last` is rolled back to 2, and a second run saves epoch 3
# again with other metrics, killed at FAULT in the middle of that save.
REPLACE_JOB = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from candle_ckpt.core.save.checkpointer import Checkpointer
    from candle_ckpt.core.restore.resume import read_epoch_info
    from candle_ckpt.core.format.layout import CheckpointLayout
    from candle_ckpt.core.save.protocol import point_link
    from conftest import file_writer
    params = {{"epochs": 3, "ckpt_directory": {root!r}, "ckpt_save_best": False}}
    if sys.argv[1] == "first":
        first = Checkpointer(params, verbose=False)
        for epoch in (1, 2, 3):
            first.epoch_end(epoch, {{"loss": 1.0}}, file_writer(b"first"))
        first.finish()
        point_link(CheckpointLayout({root!r}), "last", 2)
    else:
        second = Checkpointer(params, verbose=False)
        second.resume(read_epoch_info(second.layout, 2))
        second.epoch_end(3, {{"loss": 3.0}}, file_writer(b"second"))
""")


@pytest.mark.parametrize("fault", ["after_info", "after_index", "after_rename", "after_last"])
def test_killed_while_replacing_an_epoch(tmp_path, heads_read, fault):
    root = str(tmp_path / "save")
    code = REPLACE_JOB.format(tests=HERE, root=root)
    subprocess.run([sys.executable, "-c", code, "first"], check=True)
    killed = subprocess.run(
        [sys.executable, "-c", code, "second"],
        env={**os.environ, "CANDLE_CKPT_FAULT": fault},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr
    layout = CheckpointLayout(root)
    replaced = fault in ("after_rename", "after_last")
    # before the rename, epoch 3 is the first run's, whose line is not the last
    # naming an epoch 3 but is still the last naming its directory's inode
    tree = assert_same_as_without_index(layout, heads_read, [])
    assert tree.epochs[-1].metrics == {"loss": 3.0 if replaced else 1.0}
