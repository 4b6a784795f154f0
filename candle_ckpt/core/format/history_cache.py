"""ckpts/history.cache: the timelines of a long history.jsonl, so that the next read
parses only the lines appended since.

Parsing every JSON line of a history of 100 000 epochs and rebuilding its timelines is
most of what `candle-ckpt history` and `plot` wait for. This file holds the result for
the first bytes of the history file in columns: numbers as arrays of machine integers
and doubles, which load without parsing each value, anything else as JSON. It is a
cache (docs/FORMAT.md, "The history cache"): derived from history.jsonl alone, written
by the commands that read the history (never by the training job), never read by a
restart, safe to delete. A reader uses it only when its own CRC32 matches and it
describes the history file as it is: the file is at least as long as the bytes the
cache covers and their CRC32 is the one recorded; otherwise the reader parses the
whole file, as it would without a cache.

Loading it never executes anything from it: a text header (JSON), then `array` bytes.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import stat
import sys
from array import array
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

from ..errors import UnsafePathError
from ..storage import tree_fs
from ..storage.checksum import crc32
from ..storage.durable import write_bytes_atomic
from ..storage.tree_fs import open_file
from .layout import CACHE_FILE
from .timelines import EpochRecord, RunStart, Timelines

MAGIC = b"candle_ckpt history cache 1\n"
# A read that parsed at least this many bytes the cache did not cover writes a new one;
# below it, parsing the rest costs less than rewriting the cache each time.
REWRITE_AFTER_BYTES = 1 << 20

Buffer = bytes | mmap.mmap
"""The history file's contents: read, or mapped."""

_DAMAGE = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    AttributeError,
    RecursionError,
)


def cache_path(ckpts: str) -> str:
    """The history cache of the tree whose `ckpts/` directory is `ckpts`."""
    return os.path.join(ckpts, CACHE_FILE)


class Cached(NamedTuple):
    """The state a cache holds: the timelines after the first `covered_bytes` bytes of the
    history file, which end with a newline and have the CRC32 `covered_crc32`."""

    timelines: Timelines
    covered_bytes: int
    covered_crc32: int


def load(ckpts: str, history_path: str, history: Buffer) -> Cached | None:
    """The state the cache holds, or None when there is no cache, or it is damaged, of
    another version or machine, or does not describe the first bytes of `history` (the
    history file's contents, mapped or read). A link is not read."""
    path = cache_path(ckpts)
    try:
        with open(path, "rb", opener=partial(open_file, None, path)) as stream:
            data = stream.read()
    except (OSError, UnsafePathError):
        return None
    try:
        return _decode(data, history_path, history)
    except _DAMAGE:
        return None


def store(ckpts: str, state: Cached) -> None:
    """Write the cache of `state`. Best effort: a tree the reader may not write to, or a
    full disk, leaves the old cache or none; so does a cache path that is a link or not
    a regular file (left as it is: `candle-ckpt history` reports it, core/storage/tree_fs.py)."""
    path = cache_path(ckpts)
    try:
        with tree_fs.directory(os.path.dirname(ckpts), ckpts) as directory:
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISREG(
                    os.stat(CACHE_FILE, dir_fd=directory, follow_symlinks=False).st_mode
                ):
                    return
            # Not fsynced: a cache torn by a crash fails its CRC32 and is rebuilt.
            write_bytes_atomic(path, _encode(state), directory=directory, sync=False)
    except (OSError, UnsafePathError):
        return


# -- the file: MAGIC, one line of JSON (the header), then the columns' bytes ----------


def _encode(state: Cached) -> bytes:
    timelines = state.timelines
    records = timelines.epochs
    run_ids = list(dict.fromkeys(record.run_id for record in records))
    run_index = {run_id: index for index, run_id in enumerate(run_ids)}
    key_sets = list(dict.fromkeys(tuple(record.metrics) for record in records))
    key_set_index = {keys: index for index, keys in enumerate(key_sets)}
    names = list(dict.fromkeys(name for keys in key_sets for name in keys))
    columns: list[tuple[str, bytes]] = [
        ("i8", array("q", [record.epoch for record in records]).tobytes()),
        ("i8", array("q", [run_index[record.run_id] for record in records]).tobytes()),
        _values([record.time for record in records]),
        _values([record.train_seconds for record in records]),
        ("u1", bytes(record.saved for record in records)),
        _values([record.save_seconds for record in records]),
        ("u1", bytes(record.abandoned for record in records)),
        (
            "i8",
            array("q", [key_set_index[tuple(record.metrics)] for record in records]).tobytes(),
        ),
        *(_values([record.metrics.get(name) for record in records]) for name in names),
    ]
    body = b"".join(data for _, data in columns)
    header = {
        "byteorder": sys.byteorder,
        "history_bytes": state.covered_bytes,
        "history_crc32": state.covered_crc32,
        "body_bytes": len(body),
        "body_crc32": crc32(body),
        "lines": timelines.lines,
        "records": timelines.records,
        "epochs": len(records),
        "run_ids": run_ids,
        "runs": [list(run) for run in timelines.runs],
        "rewinds": timelines.rewinds,
        "line_warnings": timelines.line_warnings,
        "record_warnings": timelines.record_warnings,
        "metrics": names,
        "key_sets": [[names.index(name) for name in keys] for keys in key_sets],
        "columns": [[kind, len(data)] for kind, data in columns],
    }
    return b"".join((MAGIC, json.dumps(header, separators=(",", ":")).encode(), b"\n", body))


def _values(values: list[Any]) -> tuple[str, bytes]:
    """A column of JSON values: doubles when every value is a float or null and none is
    NaN, so that decoding is exact ("f8", NaN for null; "f8-no-null" without nulls, which
    decodes without looking at each value); JSON otherwise."""
    kinds = set(map(type, values))
    if kinds == {float} and not any(map(math.isnan, values)):
        return "f8-no-null", array("d", values).tobytes()
    if kinds == {float, type(None)}:
        doubles = [math.nan if value is None else value for value in values]
        if sum(map(math.isnan, doubles)) == values.count(None):
            return "f8", array("d", doubles).tobytes()
    return "json", json.dumps(values, separators=(",", ":")).encode()


def _decode(data: bytes, history_path: str, history: Buffer) -> Cached | None:
    if not data.startswith(MAGIC):
        return None
    end = data.index(b"\n", len(MAGIC))
    header = json.loads(data[len(MAGIC) : end])
    body = memoryview(data)[end + 1 :]
    covered = header["history_bytes"]
    if (
        header["byteorder"] != sys.byteorder
        or len(body) != header["body_bytes"]
        or crc32(body) != header["body_crc32"]
        or not 0 < covered <= len(history)
        or history[covered - 1 : covered] != b"\n"
    ):
        return None
    with memoryview(history) as view:
        covered_crc32 = crc32(view[:covered])
    if covered_crc32 != header["history_crc32"]:
        return None
    count = header["epochs"]
    columns = []
    offset = 0
    for kind, size in header["columns"]:
        column = _COLUMN_DECODERS[kind](body[offset : offset + size])
        if len(column) != count:
            raise ValueError(f"a column of {len(column)} values; expected {count}")
        columns.append(column)
        offset += size
    epochs, runs, times, train, saved, save, abandoned, key_set, *metric_columns = columns
    run_ids = [str(run_id) for run_id in header["run_ids"]]
    names = [str(name) for name in header["metrics"]]
    key_sets = [[names[index] for index in keys] for keys in header["key_sets"]]
    records = list(
        map(
            EpochRecord,
            epochs,
            [run_ids[index] for index in runs],
            times,
            _metrics(key_sets, key_set, dict(zip(names, metric_columns, strict=True))),
            train,
            saved,
            save,
            abandoned,
        )
    )
    timelines = Timelines(
        history_path,
        records,
        [RunStart(*run) for run in header["runs"]],
        [int(epoch) for epoch in header["rewinds"]],
        [str(warning) for warning in header["line_warnings"]],
        [str(warning) for warning in header["record_warnings"]],
        int(header["lines"]),
        int(header["records"]),
    )
    return Cached(timelines, covered, covered_crc32)


def _metrics(
    key_sets: list[list[str]], key_set: list[int], columns: dict[str, list[Any]]
) -> list[dict[str, Any]]:
    """Each record's metrics dict, its keys in the order the history recorded them."""
    if len(key_sets) == 1:  # every epoch logged the same metrics: the usual run
        keys = key_sets[0]
        return [dict(zip(keys, row)) for row in zip(*(columns[key] for key in keys))] or [
            {} for _ in key_set
        ]
    return [
        {key: columns[key][row] for key in key_sets[index]} for row, index in enumerate(key_set)
    ]


def _numbers(typecode: str, data: memoryview) -> list[Any]:
    column = array(typecode)
    column.frombytes(data)
    return column.tolist()


def _doubles(data: memoryview) -> list[float | None]:
    return [None if value != value else value for value in _numbers("d", data)]


def _flags(data: memoryview) -> list[bool]:
    return list(map(bool, data))


def _json(data: memoryview) -> list[Any]:
    values = json.loads(bytes(data))
    if type(values) is not list:
        raise TypeError(f"a JSON column is {type(values).__name__}; expected a list")
    return values


_COLUMN_DECODERS: dict[str, Callable[[memoryview], list[Any]]] = {
    "i8": partial(_numbers, "q"),
    "f8": _doubles,
    "f8-no-null": partial(_numbers, "d"),
    "u1": _flags,
    "json": _json,
}
