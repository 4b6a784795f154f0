"""Append-only files of JSON lines (`history.jsonl`, `index.jsonl`): a line, and reading
them fast.

Both files are appended one line at a time by `durable.append_line`, so a kill leaves
at most a torn last line, without its newline. Standard library only: `candle-ckpt list`
and `history` import this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator

TYPE_CHECKING = False  # typing's, without importing typing: see core/format/info_keys.py
if TYPE_CHECKING:
    from typing import Any


def json_text(value: Any) -> str:
    """`value` as compact JSON text; NaN and infinity refused (ValueError), as JSON has
    neither."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def json_line(value: Any) -> bytes:
    """`value` as one line of `json_text` with its newline."""
    return (json_text(value) + "\n").encode()


# A file is parsed a piece of about this many bytes at a time (and read so, when it is
# read by `read_chunks`): the copies a parse makes (the lines joined into one array, its
# text decoded) then take the memory the previous piece's freed, where copies of a whole
# file each cost fresh memory, paid page by page.
_PIECE_BYTES = 16384
_NEWLINES_TO_COMMAS = bytes.maketrans(b"\n", b",")


def read_chunks(descriptor: int) -> Iterator[bytes]:
    """The bytes of the file open as `descriptor`, from its offset to its end, a piece at
    a time (for `parse_lines`).

    Raises:
        OSError: a read fails.
    """
    while chunk := os.read(descriptor, _PIECE_BYTES):
        yield chunk


def parse_lines(
    chunks: Iterable[bytes], damaged: Callable[[int, Exception], None] | None = None
) -> list[Any]:
    """The value of each complete line of the bytes `chunks` yields, in order. What
    follows the last newline (a line torn by a kill, or nothing) is left out, as are
    blank lines; a line that is not JSON is skipped after `damaged(line number, error)`
    is called, if given."""
    values: list[Any] = []
    number = 1  # the number of the next line
    rest = b""  # the start of a line that the chunks so far do not end
    for chunk in chunks:
        data = rest + chunk
        end = data.rfind(b"\n")
        start = 0
        while start <= end:
            if start + _PIECE_BYTES >= end:
                stop = end
            else:
                stop = data.rfind(b"\n", start, start + _PIECE_BYTES)
                if stop < start:  # a line longer than a piece
                    stop = data.find(b"\n", start + _PIECE_BYTES)
            piece = data[start:stop]
            values += _parse_piece(piece, number, damaged)
            number += piece.count(b"\n") + 1
            start = stop + 1
        rest = data[start:]
    return values


def _parse_piece(
    piece: bytes, number: int, damaged: Callable[[int, Exception], None] | None
) -> list[Any]:
    """The values of the lines of `piece` (without its last newline), the first line's
    number `number`, as `parse_lines` says."""
    try:
        # One parse of the piece, its lines as the elements of one JSON array, is
        # several times faster than one per line. It stands only if it found as many
        # values as there are lines, so that no damaged line was read with its neighbour.
        values: list[Any] = json.loads(b"".join((b"[", piece.translate(_NEWLINES_TO_COMMAS), b"]")))
        if len(values) == piece.count(b"\n") + 1:
            return values
    except (ValueError, RecursionError):
        pass  # a damaged or blank line: find it line by line
    values = []
    for line_number, line in enumerate(piece.split(b"\n"), number):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except (ValueError, RecursionError) as error:
            if damaged is not None:
                damaged(line_number, error)
    return values
