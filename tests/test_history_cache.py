"""ckpts/history.cache: a read with the cache finds exactly what a read of every line finds."""

import json
import os

import pytest

from candle_ckpt.core.format import history_cache
from candle_ckpt.core.format.history import history_line, read_history

RUN_A, RUN_B, RUN_C = "a" * 32, "b" * 32, "c" * 32


def start(run_id, resumed_from):
    return {"kind": "start", "run_id": run_id, "run_started": "2026-12-04T10:00:00Z",
            "lineage_id": RUN_A, "resumed_from": resumed_from}  # fmt: skip


def epoch(run_id, number, metrics, train_seconds=1.5):
    return {"kind": "epoch", "run_id": run_id, "epoch": number, "time": "2026-12-04T10:01:00Z",
            "metrics": metrics, "train_seconds": train_seconds}  # fmt: skip


def saved(run_id, number):
    return {"kind": "saved", "run_id": run_id, "epoch": number, "reason": "interval",
            "save_seconds": 0.25}  # fmt: skip


def append(ckpts, *lines):
    with open(os.path.join(ckpts, "history.jsonl"), "ab") as stream:
        for line in lines:
            stream.write(line if isinstance(line, bytes) else history_line(line))


def first_run(ckpts):
    """A run of 6 epochs with damage, mixed metric sets and values no double holds."""
    append(ckpts, start(RUN_A, None))
    for number in range(1, 7):
        metrics = {"loss": 1.0 / number, "val_loss": None if number == 2 else 2.0 / number}
        if number == 3:
            metrics = {"val_loss": 0.5, "loss": 0.25, "lr": 1}  # an int, another order
        append(ckpts, epoch(RUN_A, number, metrics, None if number == 4 else 1.5))
        if number % 2 == 0:
            append(ckpts, saved(RUN_A, number))
    append(ckpts, b"not json\n", b'{"kind":"epoch","epoch":"x"}\n', b"\n")
    append(ckpts, b'{"kind":"epoch","run_id":"aa')  # torn by a kill


def second_run(ckpts):
    """A restart from epoch 4 that ends the torn line, re-trains 5 and 6, saves 5."""
    append(ckpts, b"\n", start(RUN_B, 4), epoch(RUN_B, 5, {"loss": 0.1, "val_loss": 0.2}))
    nan = (json.dumps(epoch(RUN_B, 6, {"loss": float("nan")})) + "\n").encode()  # by hand
    append(ckpts, saved(RUN_B, 5), saved(RUN_A, 2), nan)


def state(history):
    return (
        [tuple(getattr(record, name) for name in record.__slots__) for record in history.epochs],
        history.runs,
        history.warnings,
        history.rewinds,
        history.path,
    )


def same_nan(value):
    return "nan" if value != value else value


def comparable(history):
    epochs, *rest = state(history)
    fixed = [tuple(same_nan(v) if not isinstance(v, dict) else
                   {k: same_nan(x) for k, x in v.items()} for v in record)
             for record in epochs]  # fmt: skip
    return [fixed, *rest]


@pytest.fixture
def every_read_writes_the_cache(monkeypatch):
    monkeypatch.setattr(history_cache, "REWRITE_AFTER_BYTES", 1)


def test_a_read_with_the_cache_equals_a_read_of_every_line(tmp_path, every_read_writes_the_cache):
    ckpts = str(tmp_path)
    first_run(ckpts)
    expected = read_history(ckpts, last=4)
    assert len(expected.warnings) == 2 and [e.after_last for e in expected.epochs][-2:] == [1, 1]
    assert state(read_history(ckpts, last=4, cache=True)) == state(expected)
    assert os.path.exists(history_cache.cache_path(ckpts))
    assert state(read_history(ckpts, last=4, cache=True)) == state(expected)  # from the cache
    second_run(ckpts)  # the lines after the cache: it goes on from its state
    expected = read_history(ckpts)
    assert "line 14" in expected.warnings[1] and expected.rewinds == [4]
    assert expected.epochs[1].saved and expected.epochs[5].abandoned
    assert comparable(read_history(ckpts, cache=True)) == comparable(expected)
    assert comparable(read_history(ckpts, cache=True)) == comparable(expected)


def test_many_damaged_lines_are_reported_as_without_the_cache(tmp_path, monkeypatch):
    ckpts = str(tmp_path)
    first_run(ckpts)
    append(ckpts, b"\n", *[b"not json\n", b"[1]\n"] * 15)
    monkeypatch.setattr(history_cache, "REWRITE_AFTER_BYTES", 1)
    read_history(ckpts, cache=True)
    append(ckpts, *[b"[2]\n", b"{\n"] * 15, epoch(RUN_C, 7, {"loss": 0.0}))
    expected = read_history(ckpts)
    assert len(expected.warnings) == 42 and expected.epochs[-1].run_id == RUN_C
    assert state(read_history(ckpts, cache=True)) == state(expected)


def test_below_the_rewrite_size_the_cache_is_kept_and_the_rest_parsed(tmp_path, monkeypatch):
    ckpts = str(tmp_path)
    first_run(ckpts)
    monkeypatch.setattr(history_cache, "REWRITE_AFTER_BYTES", 1)
    read_history(ckpts, cache=True)
    written = os.stat(history_cache.cache_path(ckpts)).st_mtime_ns
    monkeypatch.setattr(history_cache, "REWRITE_AFTER_BYTES", 1 << 20)
    second_run(ckpts)
    assert comparable(read_history(ckpts, cache=True)) == comparable(read_history(ckpts))
    assert os.stat(history_cache.cache_path(ckpts)).st_mtime_ns == written


def test_the_cache_of_another_file_is_not_used(tmp_path, every_read_writes_the_cache):
    ckpts = str(tmp_path)
    first_run(ckpts)
    second_run(ckpts)
    read_history(ckpts, cache=True)
    path = os.path.join(ckpts, "history.jsonl")
    with open(path, "rb") as stream:
        data = stream.read()
    with open(path, "wb") as stream:  # the same length, one value changed
        stream.write(data.replace(b'"loss":0.1,', b'"loss":0.9,'))
    assert read_history(ckpts, cache=True).epochs[6].metrics["loss"] == 0.9
    with open(path, "wb") as stream:  # shorter than what the cache covers
        stream.write(data[:300])
    assert state(read_history(ckpts, cache=True)) == state(read_history(ckpts))


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:-1],
        lambda data: data[:-9] + bytes([data[-9] ^ 1]) + data[-8:],
        lambda data: data.replace(b'"byteorder":"', b'"byteorder":"x'),
        lambda data: b"",
    ],
    ids=["truncated", "a flipped bit", "another machine", "empty"],
)
def test_a_damaged_cache_is_ignored_and_replaced(tmp_path, every_read_writes_the_cache, damage):
    ckpts = str(tmp_path)
    first_run(ckpts)
    expected = state(read_history(ckpts))
    read_history(ckpts, cache=True)
    path = history_cache.cache_path(ckpts)
    with open(path, "rb") as stream:
        data = stream.read()
    with open(path, "wb") as stream:
        stream.write(damage(data))
    assert state(read_history(ckpts, cache=True)) == expected
    with open(path, "rb") as stream:
        assert stream.read() == data


def test_a_cache_that_cannot_be_written_leaves_nothing(tmp_path, monkeypatch):
    ckpts = str(tmp_path)
    first_run(ckpts)
    monkeypatch.setattr(history_cache, "REWRITE_AFTER_BYTES", 1)

    def refuse(source, destination, **dir_fds):
        raise PermissionError(13, "Permission denied", destination)

    monkeypatch.setattr(history_cache.os, "replace", refuse)
    assert state(read_history(ckpts, cache=True)) == state(read_history(ckpts))
    assert sorted(os.listdir(ckpts)) == ["history.jsonl"]


def test_a_short_history_writes_no_cache(tmp_path):
    ckpts = str(tmp_path)
    first_run(ckpts)
    read_history(ckpts, cache=True)
    assert sorted(os.listdir(ckpts)) == ["history.jsonl"]
