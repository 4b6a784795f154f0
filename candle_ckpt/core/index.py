"""ckpts/index.jsonl: what `candle-ckpt list` shows of each saved epoch, one line each.

Reading the head of every epoch's ckpt-info.json is what makes `list` slow on a long
keep-all run (one open, read and parse per epoch). The save protocol therefore appends,
for every epoch it saves, one line holding exactly what a survey shows of that epoch,
together with the identity of its directory: the inode number `readdir` reports for it.
`list` reads this file and one `scandir` of `epochs/` (which yields each entry's inode
without a `stat`), and uses a line only for a directory whose inode it names; any other
directory is summarised from its ckpt-info.json as before. The file is a cache, never
the truth (docs/FORMAT.md, "The list index"): a missing, stale, torn or damaged index
only makes `list` slower.

Why the inode identifies a directory the library put in `epochs/`: its line is
appended (and fsynced) before `work/` is renamed to `epochs/NNN`, and the rename keeps
the inode. While the directory exists, no other directory has its inode number, so no
later line names that number: its own line stays the last one naming it. An older line
naming the same number (one the file system freed and gave out again) comes before it.
A reader also checks that the line's epoch is the directory's, which a directory renamed
by hand fails. A directory that a person puts into `epochs/` by other means (copying
one back from a backup) may reuse the number of one the index describes:
docs/FORMAT.md says what to do then.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, cast

from .info import finite_or_none, is_legacy, recorded_files
from .json_lines import json_line, parse_lines

INDEX_FILE = "index.jsonl"
# A line is about 170 bytes with three metrics. An index much larger than the epochs it can describe
# holds mostly the lines of epochs a keep policy deleted: reading it would cost more
# than reading the heads of the few epochs there are, so readers ignore it.
MAX_INDEX_BYTES_PER_EPOCH = 2048
# The fields of a line, in order (docs/FORMAT.md): a JSON array, so that no key is parsed
# with each value, as it would be in an object.
FIELDS = (
    "epoch",
    "inode",
    "timestamp",
    "save_best_metric",
    "best_metric_last",
    "size",
    "checksummed",
    "metrics",
    "format_version",
)


def index_path(ckpts: str) -> str:
    """The index file of the tree whose `ckpts/` directory is `ckpts`."""
    return os.path.join(ckpts, INDEX_FILE)


def directory_inode(parent: str, name: str) -> int:
    """The inode number `readdir` reports for entry `name` of directory `parent`.

    Taken from `scandir`, as a reader sees it, not from `stat`: on some file systems
    (overlayfs) the two differ, and a reader compares against `scandir`'s.

    Raises:
        FileNotFoundError: `parent` has no entry `name`.
    """
    with os.scandir(parent) as entries:
        for entry in entries:
            if entry.name == name:
                return entry.inode()
    raise FileNotFoundError(f"'{os.path.join(parent, name)}' does not exist")


def index_line(info: Mapping[str, Any], inode: int) -> bytes:
    """The index line of a format 2 ckpt-info dict `info` whose directory has `inode`."""
    size, checksummed = size_and_checksummed(info)
    record = [
        info["epoch"],
        inode,
        info["timestamp"],
        info["save_best_metric"],
        finite_or_none(info["best_metric_last"]),
        size,
        checksummed,
        info.get("metrics"),
        info["format_version"],
    ]
    return json_line(record)


def size_and_checksummed(info: Mapping[str, Any]) -> tuple[int | None, bool]:
    """(bytes of the files `info` records, whether any of them has a CRC32).

    The one rule for both a survey of ckpt-info.json heads and the index lines. The
    size is None for an upstream CANDLE file, which records none.

    Raises:
        TypeError: a recorded size is not a number (a damaged file).
    """
    files = recorded_files(info).values()
    checksummed = any([crc is not None for _, crc in files])
    if is_legacy(info):
        return None, checksummed
    # every size is an int in a valid file; a None raises the TypeError
    return sum([cast(int, size) for size, _ in files]), checksummed


def append_index(ckpts: str, info: Mapping[str, Any], inode: int) -> None:
    """Append the line of the epoch `info` records, whose directory has `inode` (fsynced).

    Raises:
        OSError: the line cannot be written (the save fails, as on any step of it).
    """
    # Imported here: `list` reads the index, and durable's imports (ctypes, shutil,
    # uuid) would be a sizeable share of its run.
    from .durable import append_line

    append_line(index_path(ckpts), index_line(info, inode), sync=True)


def read_index(ckpts: str, epochs_on_disk: int) -> dict[int, list[Any]]:
    """{inode: the last well-formed line naming it} of `<ckpts>/index.jsonl`; never raises.

    Keyed by inode, not epoch: the last line naming an inode is the one its directory's
    save appended (core/index.py), and a caller checks that the line's epoch is the
    directory's. Empty when the file is absent, unreadable, or larger than
    `epochs_on_disk` epochs can explain (MAX_INDEX_BYTES_PER_EPOCH). A line that is not
    well-formed (torn by a kill, damaged) is left out; a torn last line has no newline.
    """
    try:
        descriptor = os.open(index_path(ckpts), os.O_RDONLY)
    except OSError:
        return {}
    try:
        size = os.fstat(descriptor).st_size
        if size > MAX_INDEX_BYTES_PER_EPOCH * (epochs_on_disk + 1):
            return {}
        chunks = []
        while True:
            chunk = os.read(descriptor, size + 1)
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
    except OSError:
        return {}
    finally:
        os.close(descriptor)
    lines = parse_lines(data)
    return {line[1]: line for line in lines if _well_formed(line)}


_NUMBER = (int, float)


def _well_formed(line: Any) -> bool:
    """Whether `line` has the fields and types an index line has (no value checks
    beyond those a survey makes of a ckpt-info.json head)."""
    return (
        type(line) is list
        and len(line) == len(FIELDS)
        and type(line[0]) is int
        and line[0] >= 1
        and type(line[1]) is int
        and type(line[2]) is str
        and (line[3] is None or type(line[3]) is str)
        and (line[4] is None or type(line[4]) in _NUMBER)
        and type(line[5]) is int
        and type(line[6]) is bool
        and (line[7] is None or type(line[7]) is dict)
        and type(line[8]) is int
    )
