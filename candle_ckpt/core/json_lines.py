"""Append-only files of JSON lines (`history.jsonl`, `index.jsonl`): a line, and reading
them fast.

Both files are appended one line at a time by `durable.append_line`, so a kill leaves
at most a torn last line, without its newline. Standard library only: `candle-ckpt list`
and `history` import this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def json_text(value: Any) -> str:
    """`value` as compact JSON text; NaN and infinity refused (ValueError), as JSON has
    neither."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def json_line(value: Any) -> bytes:
    """`value` as one line of `json_text` with its newline."""
    return (json_text(value) + "\n").encode()


_NEWLINES_TO_COMMAS = bytes.maketrans(b"\n", b",")


def parse_lines(data: bytes, damaged: Callable[[int, Exception], None] | None = None) -> list[Any]:
    """The value of each complete line of `data`, in order. What follows the last newline
    (a line torn by a kill, or nothing) is left out, as are blank lines; a line that is
    not JSON is skipped after `damaged(line number, error)` is called, if given."""
    end = data.rfind(b"\n")
    if end < 0:
        return []
    try:
        # One parse of the whole file, its lines as the elements of one JSON array, is
        # several times faster than one per line. It stands only if it found as many
        # values as there are lines, so that no damaged line was read with its neighbour.
        # Each copy of the file is paid in fresh memory, page by page: the newlines are
        # translated in one copy, joined to the brackets from a view of it (not sliced,
        # replaced and added, a copy each), and that copy is freed before the parse
        # decodes the array into another.
        array = b"".join((b"[", memoryview(data.translate(_NEWLINES_TO_COMMAS))[:end], b"]"))
        values: list[Any] = json.loads(array)
        if len(values) == data.count(b"\n", 0, end) + 1:
            return values
    except (ValueError, RecursionError):
        pass  # a damaged or blank line: find it line by line
    values = []
    for number, line in enumerate(data[:end].split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except (ValueError, RecursionError) as error:
            if damaged is not None:
                damaged(number, error)
    return values
