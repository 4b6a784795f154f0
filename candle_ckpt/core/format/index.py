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

import json
import os
import stat
from collections.abc import Mapping

from .info_keys import finite_or_none, is_legacy, recorded_files
from .json_lines import json_line, json_text, parse_lines, read_chunks
from .layout import INDEX_FILE

TYPE_CHECKING = False  # typing's, without importing typing: see core/format/info_keys.py
if TYPE_CHECKING:
    from typing import Any

# A line is about 200 bytes with three metrics. An index much larger than the epochs it can describe
# holds mostly the lines of epochs a keep policy deleted: reading it would cost more
# than reading the heads of the few epochs there are, so readers ignore it.
MAX_INDEX_BYTES_PER_EPOCH = 2048
# The fields of a line, in order (docs/FORMAT.md): a JSON array, so that no key is parsed
# with each value, as it would be in an object. The table of `list` shows one metric of
# an epoch, by default the tracked one: its value has a field of its own, and the
# metrics object is kept as its JSON text, decoded only when another metric or every
# one is shown (`list --metric`, `list --json`). Decoding every number of every epoch's
# metrics was most of the time `list` spent reading the index.
FIELDS = (
    "epoch",
    "inode",
    "timestamp",
    "save_best_metric",
    "best_metric_last",
    "metric_value",
    "size",
    "checksummed",
    "metrics",
    "format_version",
)
# What lines written before `metric_value` and the metrics text hold (still read).
FIELDS_BEFORE_METRIC_VALUE = (
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


def directory_inode(parent: str | int, name: str) -> int:
    """The inode number `readdir` reports for entry `name` of directory `parent` (a path,
    or a descriptor).

    Taken from `scandir`, as a reader sees it, not from `stat`: on some file systems
    (overlayfs) the two differ, and a reader compares against `scandir`'s.

    Raises:
        FileNotFoundError: `parent` has no entry `name`.
    """
    with os.scandir(parent) as entries:
        for entry in entries:
            if entry.name == name:
                return entry.inode()
    raise FileNotFoundError(f"'{name}' does not exist in directory {parent!r}")


def index_line(info: Mapping[str, Any], inode: int) -> bytes:
    """The index line of a format 2 ckpt-info dict `info` whose directory has `inode`."""
    size, checksummed = size_and_checksummed(info)
    metric = info["save_best_metric"]
    metrics = info.get("metrics")
    record = [
        info["epoch"],
        inode,
        info["timestamp"],
        metric,
        finite_or_none(info["best_metric_last"]),
        None if metrics is None or metric is None else metrics.get(metric),
        size,
        checksummed,
        None if metrics is None else json_text(metrics),
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
    return sum([size for size, _ in files]), checksummed  # type: ignore[misc]


def append_index(root: str, ckpts: str, info: Mapping[str, Any], inode: int) -> None:
    """Append the line of the epoch `info` records, whose directory has `inode`, to the
    index in `ckpts`, the tree below the root `root` (fsynced; the file is reached from
    `root` without following a link).

    Raises:
        UnsafePathError: the index or `ckpts/` is a link or of the wrong kind.
        OSError: the line cannot be written (the save fails, as on any step of it).
    """
    # Imported here: `list` reads the index, and durable's imports (ctypes, shutil,
    # uuid) would be a sizeable share of its run.
    from ..storage.durable import append_line

    append_line(root, index_path(ckpts), index_line(info, inode), sync=True)


def read_index(ckpts: str, epochs_on_disk: int) -> dict[int, list[Any]]:
    """{inode: the last well-formed line naming it} of `<ckpts>/index.jsonl`, each with the
    FIELDS (an older line's metrics a dict, not its text); never raises.

    Keyed by inode, not epoch: the last line naming an inode is the one its directory's
    save appended (core/format/index.py), and a caller checks that the line's epoch is the
    directory's. Empty when the file is absent, unreadable, or larger than
    `epochs_on_disk` epochs can explain (MAX_INDEX_BYTES_PER_EPOCH). A line that is not
    well-formed (torn by a kill, damaged) is left out; a torn last line has no newline.
    """
    try:
        # A link is not an index the library wrote: not followed (list then reads heads)
        descriptor = os.open(index_path(ckpts), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return {}
    try:
        status = os.fstat(descriptor)
        size = status.st_size
        if not stat.S_ISREG(status.st_mode) or size > MAX_INDEX_BYTES_PER_EPOCH * (
            epochs_on_disk + 1
        ):
            return {}
        # read and parsed a piece at a time, not read whole: see json_lines
        lines = parse_lines(read_chunks(descriptor))
    except OSError:
        return {}
    finally:
        os.close(descriptor)
    index = {}
    for line in lines:
        if _well_formed(line):
            index[line[1]] = line if len(line) == len(FIELDS) else _with_metric_value(line)
    return index


_NUMBER = (int, float)


def _well_formed(line: Any) -> bool:
    """Whether `line` has the fields and types of a line of FIELDS or of
    FIELDS_BEFORE_METRIC_VALUE (no value checks beyond those a survey makes of a
    ckpt-info.json head; the metrics text of a line of FIELDS is decoded on use)."""
    if type(line) is not list:
        return False
    if len(line) == len(FIELDS):
        epoch, inode, timestamp, metric, best, value, size, checksummed, metrics, version = line
        metrics_type: type = str
    elif len(line) == len(FIELDS_BEFORE_METRIC_VALUE):
        epoch, inode, timestamp, metric, best, size, checksummed, metrics, version = line
        value, metrics_type = None, dict
    else:
        return False
    return (
        type(epoch) is int
        and epoch >= 1
        and type(inode) is int
        and type(timestamp) is str
        and (metric is None or type(metric) is str)
        and (best is None or type(best) in _NUMBER)
        and (value is None or type(value) in _NUMBER)
        and type(size) is int
        and type(checksummed) is bool
        and (metrics is None or type(metrics) is metrics_type)
        and type(version) is int
    )


def decoded_metrics(
    metrics: list[dict[str, Any] | str | None],
) -> list[dict[str, Any] | None]:
    """The metrics of lines read by `read_index`, in order: a dict or None as it is, a
    text decoded (None when it is not the JSON of an object: a damaged line, read as one
    without metrics)."""
    texts = [value for value in metrics if type(value) is str]
    try:
        # One parse of every text, as the elements of one array (as json_lines parses
        # lines), standing only if it found as many values as there are texts.
        decoded = json.loads("[" + ",".join(texts) + "]")
        if len(decoded) != len(texts):
            raise ValueError("a text is not one JSON value")
    except (ValueError, RecursionError):
        decoded = list(map(_decoded_text, texts))
    values = iter(decoded)
    return [_object_or_none(next(values)) if isinstance(value, str) else value for value in metrics]


def _decoded_text(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _object_or_none(value: Any) -> dict[str, Any] | None:
    return value if type(value) is dict else None


def _with_metric_value(line: list[Any]) -> list[Any]:
    """A line of FIELDS_BEFORE_METRIC_VALUE as a line of FIELDS, its metrics decoded
    (a survey takes a dict or the text of one)."""
    epoch, inode, timestamp, metric, best, size, checksummed, metrics, version = line
    value = None if metrics is None or metric is None else metrics.get(metric)
    return [epoch, inode, timestamp, metric, best, value, size, checksummed, metrics, version]
