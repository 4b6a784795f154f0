"""Reading the head of a JSON object: the members before a large one, never fooled."""

import json

import pytest

from candle_ckpt.operator import json_head
from candle_ckpt.operator.json_head import read_members

DOCUMENT = {
    "a": 1,
    'key "big": with quotes': 'a value with "big": [1, 2], and a comma, inside',
    "nested": [1, {"big": "}"}, {"x": {"big": 2}}],
    "number": 1.5e3,
    "none": None,
    "legacy": float("inf"),
    "text": "é" * 3000,
    "big": list(range(5000)),
    "after": True,
}
BEFORE_BIG = {key: value for key, value in DOCUMENT.items() if key not in ("big", "after")}


def read(tmp_path, text, keys, stop_key="big"):
    path = tmp_path / "x.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return read_members(str(path), keys, stop_key, 1 << 20)


@pytest.mark.parametrize("indent", [None, 0, 1, 4])
@pytest.mark.parametrize("first_read", [1, 7, 2048])
def test_stops_before_the_stop_key_whatever_the_layout_and_chunking(
    tmp_path, monkeypatch, indent, first_read
):
    monkeypatch.setattr(json_head, "FIRST_READ_BYTES", first_read)
    text = json.dumps(DOCUMENT, indent=indent)
    assert read(tmp_path, text, ["a", "text"]) == BEFORE_BIG


def test_reads_the_whole_object_when_a_wanted_key_is_after_the_stop_key(tmp_path):
    assert read(tmp_path, json.dumps(DOCUMENT), ["after"]) == DOCUMENT
    assert read(tmp_path, '{"big": [1], "a": 2}', ["a"]) == {"big": [1], "a": 2}


def test_reads_the_whole_object_when_there_is_no_stop_key(tmp_path):
    assert read(tmp_path, '{"a": Infinity}', ["a"]) == {"a": float("inf")}
    assert read(tmp_path, "  {  }  ", ["a"]) == {}


def test_the_tail_after_the_cut_is_not_read(tmp_path):
    assert read(tmp_path, '{"a": 1, "big": [1, 2, oops', ["a"]) == {"a": 1}


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "Expecting value"),
        ("[1, 2]", "top level is a list"),
        ('{"a": 1', "Expecting ',' delimiter"),
        ('{"a" 1, "big": 2}', "Expecting ':' delimiter"),
        (b'{"a": "\xff"}', "can't decode byte 0xff"),
        ('{"a": 1, "big"', "Expecting ':' delimiter"),
        ('{"a": 1} {}', "Extra data"),
    ],
)
def test_invalid_heads_are_value_errors_naming_the_position(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read(tmp_path, text, ["a"])


def test_a_file_over_the_limit_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(" " * 5000 + "{}")
    with pytest.raises(ValueError, match="larger than 4096 bytes"):
        read_members(str(path), ["a"], "big", 4096)
