"""Read the head of a JSON object file: the members before a stop member.

A format 1 ckpt-info.json lists `epochs_saved`, every epoch its run has written, so
with the default keep policy (keep everything) the file of epoch 10 000 is about 80 kB
and a 10 000-epoch tree holds about 400 MB of JSON. Format 2 files are about 1 kB, but
`candle-ckpt list` reads 10 000 or 100 000 of them, and parsing costs in proportion to
the bytes parsed. What `list` shows comes before `epochs_saved` (format 1) and before
`run_id` (format 2) in the files the library writes (docs/FORMAT.md). `read_members`
reads a file in growing chunks until it finds a stop key, and parses only what precedes
it, with `json.loads` itself.

Why a cut found by a text search is safe: a cut just before `"epochs_saved"` is taken
only if the text before it, with its trailing comma replaced by `}`, parses as a JSON
object. That succeeds only when the cut is outside every string (a cut inside a string
leaves it unterminated) and at the top level (a cut inside a nested value leaves a
bracket unclosed), so the key found is a top-level member's, and everything before it
has been parsed and checked by `json.loads`. What lies after the cut is not read, so
not checked either: `info.read_info` reads and validates a whole file.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable

TYPE_CHECKING = False  # typing's, without importing typing: see core/format/info_keys.py
if TYPE_CHECKING:
    from typing import Any

# The first read, doubled until the stop key is found: the head of a ckpt-info.json
# as the library writes it, up to `epochs_saved` or `run_id`, is about 500 bytes.
FIRST_READ_BYTES = 2048
_WHITESPACE = b" \t\n\r"
_DECODER = json.JSONDecoder()


def _parse_object(data: bytes) -> dict[str, Any]:
    # What json.loads does, minus its encoding detection (a ckpt-info.json is UTF-8)
    # and its two whitespace regexes: this runs once per epoch of a `list`.
    text = data.strip(_WHITESPACE).decode("utf-8")
    value, end = _DECODER.raw_decode(text)
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    if not isinstance(value, dict):
        raise ValueError(f"the top level is a {type(value).__name__}; expected a JSON object")
    return value


def _cut_before(data: bytes, quoted_key: bytes) -> dict[str, Any] | None:
    """The members before the first top-level member `quoted_key` in `data`, or None."""
    start = data.find(quoted_key)
    while start >= 0:
        end = start + len(quoted_key)
        # 64 bytes: more whitespace than that before the colon only costs a whole parse.
        after = data[end : end + 64].lstrip(_WHITESPACE)
        before = data[:start].rstrip(_WHITESPACE)
        if after[:1] == b":" and before[-1:] in (b",", b"{"):
            try:
                return _parse_object((before[:-1] if before[-1:] == b"," else before) + b"}")
            except ValueError:
                pass  # the text inside a string or a nested value: look further
        start = data.find(quoted_key, start + 1)
    return None


@functools.cache
def _quoted(key: str) -> bytes:
    return json.dumps(key).encode("utf-8")


def read_members(
    path: str, keys: Iterable[str], stop_key: str | tuple[str, ...], limit: int
) -> dict[str, Any]:
    """The members of the top-level JSON object in file `path`, read only as far as needed.

    Args:
        path: the file.
        keys: the keys wanted.
        stop_key: the key of a member written after the wanted ones, or a tuple of such
            keys, tried in order (each file has at most one of them).
        limit: the most bytes read; a longer file is an error.

    Returns:
        The members before the stop key when they include every one of `keys` (the rest
        of the file is not read); otherwise every member (the whole file is read). So
        each of `keys` that the object has is in the dict. Values are parsed as by
        `json.loads` (`Infinity` and `NaN` included).

    Raises:
        OSError: the file cannot be opened or read.
        ValueError: larger than `limit`, not UTF-8, not JSON, or not an object (a
            `json.JSONDecodeError` names the line and column).
    """
    return HeadReader(keys, stop_key, limit).read(path)


class HeadReader:
    """`read_members` with its arguments prepared once, for reading many files alike."""

    __slots__ = ("keys", "limit", "quoted_stop_keys")

    def __init__(self, keys: Iterable[str], stop_key: str | tuple[str, ...], limit: int) -> None:
        self.keys = frozenset(keys)
        stop_keys = (stop_key,) if isinstance(stop_key, str) else stop_key
        self.quoted_stop_keys = tuple(_quoted(key) for key in stop_keys)
        self.limit = limit

    def read(self, path: str) -> dict[str, Any]:
        """The members of the object in `path`, as `read_members` (same errors)."""
        # os.open/os.read rather than open(): a survey reads 10 000 heads, and a Python
        # file object costs more than the read itself.
        descriptor = os.open(path, os.O_RDONLY)
        try:
            limit = self.limit
            data, chunk, looking = b"", FIRST_READ_BYTES, True
            while True:
                block = os.read(descriptor, min(chunk, limit + 1 - len(data)))
                data += block
                if len(data) > limit:
                    raise ValueError(f"larger than {limit} bytes")
                if not block:
                    return _parse_object(data)
                if looking:
                    # Rescan from the start, in case the key straddled the last chunk's end.
                    for quoted_key in self.quoted_stop_keys:
                        members = _cut_before(data, quoted_key)
                        if members is not None:
                            if members.keys() >= self.keys:
                                return members
                            looking = False  # a wanted key follows the stop key: read all
                            break
                chunk *= 2
        finally:
            os.close(descriptor)
