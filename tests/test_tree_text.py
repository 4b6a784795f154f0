"""Strings from a tree reach terminals and logs escaped: a file name is a plain name,
and what `list`, `history` and ckpt.log show of a timestamp, a metric name or a
message holds no control character of its own (no escape sequence, no extra line)."""

import json
import os

import pytest
from conftest import file_writer
from test_cli import cli, drop_index_lines, run

from candle_ckpt.core.errors import CheckpointFormatError
from candle_ckpt.core.format.info import info_file_bytes, read_info, validate_info
from candle_ckpt.core.format.layout import CheckpointLayout
from candle_ckpt.core.logs import close_tree_log, tree_logger
from candle_ckpt.core.text import printable

HOSTILE = "2026-12-07\x1b]0;owned\x07\x1b[2J\nINJECTED LINE\r\x9b31m"


@pytest.fixture
def tree(make_checkpointer, ckpt_dir):
    run(make_checkpointer(epochs=3), [3.0, 2.0, 1.0])
    return CheckpointLayout(ckpt_dir)


def rewrite_info(layout, epoch, change):
    """Change epoch `epoch`'s ckpt-info.json as someone who can write the tree would
    (`info_crc32` recomputed), and drop its index line so that `list` reads it."""
    info = read_info(layout.epoch_dir(epoch))
    change(info)
    with open(os.path.join(layout.epoch_dir(epoch), "ckpt-info.json"), "wb") as stream:
        stream.write(info_file_bytes(info))
    drop_index_lines(layout, [epoch])


def test_printable_escapes_every_control_character_and_keeps_the_rest():
    assert printable("a\x1b[31mb\nc\x7f\x9b\u00e9") == "a\\x1b[31mb\\x0ac\\x7f\\x9b\u00e9"
    assert printable("a\nb\tc\rd\x1b", keep_layout=True) == "a\nb\tc\rd\\x1b"


@pytest.mark.parametrize("name", ["model.h5\n", "model\nINJECTED.h5", "m\x1b[2J.h5", "m\x85.h5"])
def test_a_file_name_with_a_control_character_is_invalid(tree, name):
    info = read_info(tree.epoch_dir(3))
    entry = info["files"].pop(info["model_file"])
    bad = dict(info, model_file=name, files={**info["files"], name: entry})
    with pytest.raises(CheckpointFormatError, match="model_file|files"):
        validate_info(bad, "ckpt-info.json")


def test_list_shows_a_hostile_timestamp_escaped_on_its_own_row(tree):
    rewrite_info(tree, 2, lambda info: info.__setitem__("timestamp", HOSTILE))
    out = cli("list", tree.root).stdout
    assert not set(out) & {"\x1b", "\x07", "\r", "\x9b"}
    assert "INJECTED LINE" in out and "\nINJECTED" not in out
    assert len(out.splitlines()) == 2 + 1 + 3  # root, links, header, one row per epoch


def test_list_of_an_info_nested_100000_deep_refuses_that_epoch_only(tree):
    path = os.path.join(tree.epoch_dir(2), "ckpt-info.json")
    with open(path, "w") as stream:
        stream.write('{"epoch": 2, "timestamp": ' + "[" * 100_000 + "]" * 100_000 + "}")
    drop_index_lines(tree, [2])
    result = cli("list", tree.root)
    assert "internal error" not in result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines()[3:]]
    assert rows == ["1", "2", "3"]
    assert "nested too deeply" in result.stdout


def test_history_shows_a_hostile_metric_name_escaped(make_checkpointer, ckpt_dir):
    checkpointer = make_checkpointer(epochs=2)
    for epoch in (1, 2):
        logs = {"loss": 1.0 / epoch, "acc\x1b]0;owned\x07\nFAKE": 0.5}
        checkpointer.epoch_end(epoch, logs, file_writer(b"epoch %d" % epoch))
    out = cli("history", ckpt_dir).stdout + cli("history", ckpt_dir, "--csv").stdout
    assert not set(out) & {"\x1b", "\x07"}
    assert "\nFAKE" not in cli("history", ckpt_dir).stdout


def test_a_tree_string_in_a_log_record_stays_on_its_line(tree):
    logger = tree_logger("restart", tree, verbose=False)
    logger.warning("found %s", HOSTILE)
    close_tree_log(tree)
    with open(os.path.join(tree.root, "ckpt.log")) as stream:
        last = stream.read().splitlines()[-1]
    assert last.endswith("found " + printable(HOSTILE))


def test_an_error_naming_a_hostile_value_is_one_escaped_line(tree):
    rewrite_info(tree, 3, lambda info: info.__setitem__("model_file", "x\x1b[2J\nINJECTED"))
    result = cli("info", tree.root, expect=2)
    assert "\x1b" not in result.stderr and result.stderr.count("\n") == 1
    assert json.dumps(result.stderr)  # printable text
