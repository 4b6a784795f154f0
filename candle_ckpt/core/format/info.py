"""ckpt-info.json: build, validate, write and read the record of one checkpoint.

New files follow `schemas/ckpt-info.schema.json` (format_version 2 for an epoch, 3 for a
step checkpoint inside one; version 1 files are still read), are validated before they
are written and after they are read, and are always strict JSON (no Infinity/NaN). Files
written by upstream CANDLE (8 keys, `best_metric_last` possibly `Infinity`) are read
through a separate legacy schema; they are never written. docs/FORMAT.md describes every
key of every version.

`checkpoint_info` turns any of the three into one `CheckpointInfo`, the record the rest
of the library reasons about, so that version differences are settled here once.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import stat
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple, NoReturn

from ..errors import CheckpointFormatError
from .info_keys import CHECKSUM_DISABLED as CHECKSUM_DISABLED
from .info_keys import MAX_INFO_BYTES as MAX_INFO_BYTES
from .info_keys import finite_or_none as finite_or_none
from .info_keys import is_legacy as is_legacy
from .info_keys import recorded_files as recorded_files
from .layout import INFO_FILE

FORMAT = "candle_ckpt"
FORMAT_VERSION = 2
# A step checkpoint's record: version 2 and the batch position. Its own version, so
# that a reader of version 2 (the previous release) refuses it naming the version
# rather than a key (it never reaches one: docs/FORMAT.md, "Step checkpoints").
STEP_FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
FIRST_SAVE = "__FIRST__"
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"
INFO_CRC_KEY = "info_crc32"

SCHEMA_FILE = "ckpt-info.schema.json"
LEGACY_SCHEMA_FILE = "candle-legacy-ckpt-info.schema.json"


jsonschema: Any = None  # bound on first use by _validator


@functools.cache
def _validator(schema_file: str) -> Any:
    # Imported here, not at the top: importing jsonschema and importlib.resources is a
    # large share of a `list` run (no validation; benchmarks/bench_cli_list.py).
    # validate_info calls this first, then uses the module-level name bound here.
    global jsonschema
    from importlib import resources

    import jsonschema

    text = resources.files("candle_ckpt.schemas").joinpath(schema_file).read_text("utf-8")
    schema = json.loads(text)
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def numeric_metrics(logs: Mapping[Any, Any] | None) -> dict[str, float | None]:
    """Every numeric value of an epoch's logs as {name: finite float or None}.

    Numbers, NumPy scalars and one-element tensors count; strings, booleans and
    anything `float()` refuses are left out. NaN and infinity become None (JSON null),
    so that the record stays strict JSON and says that the value was not finite.
    """
    metrics: dict[str, float | None] = {}
    for name, value in (logs or {}).items():
        if isinstance(value, (str, bytes, bool)):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        metrics[str(name)] = number if math.isfinite(number) else None
    return metrics


class CheckpointInfo(NamedTuple):
    """One checkpoint's ckpt-info.json, of any version, normalised (`checkpoint_info`).

    A NamedTuple, immutable, rather than a dataclass: importing `dataclasses` (it
    brings `inspect`) is a sizeable share of a `candle-ckpt list` run, which imports
    this module.

    `format_version` is None for a file upstream CANDLE wrote. `batch` is the batches
    completed in the running epoch, 0 but for a step checkpoint (version 3), whose
    `after_last` names the checkpoint `last` named when it was saved. Keys a version
    does not have are None: `epochs_saved` exists only in version 1; `metrics`, the timings and
    the run and lineage ids only in version 2. `best_metric_last` is a finite float or
    None (upstream's Infinity becomes None). `files` maps each recorded file to
    (size or None, CRC32 string or None); upstream files record only the model file's
    CRC32. `raw` is the dict as read, for callers that print it.
    """

    format_version: int | None
    epoch: int
    model_file: str
    checksum: str
    save_best_metric: str | None
    best_metric_last: float | None
    timestamp: str
    time_elapsed: float | str
    metadata: str | None
    files: Mapping[str, tuple[int | None, str | None]]
    best_metric_mode: str | None
    epoch_best: int | None
    epochs_saved: tuple[int, ...] | None
    metrics: Mapping[str, float | None] | None
    train_seconds: float | None
    save_seconds: float | None
    run_id: str | None
    run_started: str | None
    lineage_id: str | None
    lineage_format1_epoch: int | None
    weights_only: bool | None
    adapter: str | None
    model_format: str | None
    versions: Mapping[str, str | None]
    init_from: Mapping[str, Any] | None
    batch: int
    after_last: Mapping[str, Any] | None
    raw: Mapping[str, Any]

    @property
    def legacy(self) -> bool:
        """Whether upstream CANDLE, not candle_ckpt, wrote the file."""
        return self.format_version is None

    def metric(self, name: str) -> float | None:
        """The epoch's own value of metric `name`, or None (not finite, not recorded,
        or a file older than version 2, which records no per-epoch metrics)."""
        return None if self.metrics is None else self.metrics.get(name)


def checkpoint_info(info: Mapping[str, Any]) -> CheckpointInfo:
    """The `CheckpointInfo` of a validated ckpt-info dict of any version (or of the
    head of one that holds at least the upstream keys, as `candle-ckpt list` reads).

    Raises:
        KeyError: an upstream key is missing.
        TypeError / ValueError: a value of the wrong type (only unvalidated heads).
    """
    legacy = is_legacy(info)
    crc = info["checksum"]
    files = recorded_files(info)
    saved = info.get("epochs_saved")
    metrics = info.get("metrics")
    return CheckpointInfo(
        format_version=None if legacy else info.get("format_version"),
        epoch=info["epoch"],
        model_file=info["model_file"],
        checksum=crc,
        save_best_metric=info["save_best_metric"],
        best_metric_last=finite_or_none(info["best_metric_last"]),
        timestamp=info["timestamp"],
        time_elapsed=info["time_elapsed"],
        metadata=info["metadata"],
        files=files,
        best_metric_mode=info.get("best_metric_mode"),
        epoch_best=info.get("epoch_best"),
        epochs_saved=None if saved is None else tuple(saved),
        metrics=None if metrics is None else dict(metrics),
        train_seconds=info.get("train_seconds"),
        save_seconds=info.get("save_seconds"),
        run_id=info.get("run_id"),
        run_started=info.get("run_started"),
        lineage_id=info.get("lineage_id"),
        lineage_format1_epoch=info.get("lineage_format1_epoch"),
        weights_only=info.get("weights_only"),
        adapter=info.get("adapter"),
        model_format=info.get("model_format"),
        versions=dict(info.get("versions") or {}),
        init_from=info.get("init_from"),
        batch=info.get("batch", 0),
        after_last=info.get("after_last"),
        raw=info,
    )


def _representative(info: Mapping[str, Any]) -> Mapping[str, Any]:
    """`info` with a long `epochs_saved` replaced by its smallest and largest items.

    jsonschema's time grows with the items of that list, which a format 1 file holds
    for every epoch its run kept. When the items are distinct integers, which one pass
    here checks, the schema's per-item rule holds for all of them if it holds for the
    extremes; otherwise the whole list goes to the schema, for its error message.
    """
    epochs = info.get("epochs_saved")
    if (
        not isinstance(epochs, list)
        or len(epochs) <= 2
        or not all(type(epoch) is int for epoch in epochs)
        or len(set(epochs)) != len(epochs)
    ):
        return info
    return {**info, "epochs_saved": [min(epochs), max(epochs)]}


def validate_info(info: Mapping[str, Any], source: str) -> None:
    """Check a ckpt-info dict against its schema and the rules a schema cannot state.

    Args:
        info: the dict.
        source: the path (or a description) named in error messages.

    Raises:
        CheckpointFormatError: naming the key, the value found and what was expected.
    """
    legacy = is_legacy(info)
    validator = _validator(LEGACY_SCHEMA_FILE if legacy else SCHEMA_FILE)
    representative = _representative(info)
    error = jsonschema.exceptions.best_match(validator.iter_errors(representative))
    if error is not None and representative is not info:
        error = jsonschema.exceptions.best_match(validator.iter_errors(info))
    if error is not None:
        key = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        found = repr(error.instance)
        if len(found) > 200:
            found = found[:200] + "..."
        raise CheckpointFormatError(
            f"{source}: key '{key}' is invalid: {error.message.splitlines()[0][:300]} "
            f"(found {found}; schema rule '{'/'.join(map(str, error.schema_path))}')"
        )
    if legacy:
        return
    files = info["files"]
    if info["model_file"] not in files:
        raise CheckpointFormatError(
            f"{source}: key 'model_file' is {info['model_file']!r}, which is not listed in "
            f"'files' ({sorted(files)}); expected one of the files"
        )
    recorded = files[info["model_file"]]["crc32"]
    expected = recorded if recorded is not None else CHECKSUM_DISABLED
    if info["checksum"] != expected:
        raise CheckpointFormatError(
            f"{source}: key 'checksum' is {info['checksum']!r} but "
            f"files/{info['model_file']}/crc32 is {recorded!r}; expected them to agree"
        )
    if INFO_FILE in files:
        raise CheckpointFormatError(
            f"{source}: key 'files' lists {INFO_FILE!r}, which cannot checksum itself"
        )


def encode_info(info: Mapping[str, Any]) -> bytes:
    """The bytes of a ckpt-info.json: strict JSON (raises ValueError on NaN/inf)."""
    return (json.dumps(info, indent=1, allow_nan=False) + "\n").encode("utf-8")


def _content_crc32(info: Mapping[str, Any]) -> str:
    """CRC32 of a ckpt-info dict's content: its encoding without the `info_crc32` key."""
    content = {key: value for key, value in info.items() if key != INFO_CRC_KEY}
    return str(zlib.crc32(encode_info(content)))


def write_info(directory: str, info: Mapping[str, Any], *, dir_fd: int | None = None) -> str:
    """Validate `info` and write it atomically as `<directory>/ckpt-info.json` (through
    `dir_fd`, the descriptor of `directory`, if given: `durable.write_bytes_atomic`).

    The file also records `info_crc32`, the CRC32 of its own content, so that a
    corrupted value (a flipped digit in `best_metric_last`, say) is refused on reading.
    """
    from ..storage import durable  # here: the command line reads ckpt-info.json, never writes it

    path = os.path.join(directory, INFO_FILE)
    validate_info(info, f"{path} (about to be written)")
    durable.write_bytes_atomic(path, info_file_bytes(info), directory=dir_fd)
    return path


def info_file_bytes(info: Mapping[str, Any]) -> bytes:
    """The bytes of the ckpt-info.json of `info` (not validated): its encoding with
    `info_crc32` added."""
    return encode_info({**info, INFO_CRC_KEY: _content_crc32(info)})


class _NotStrict(ValueError):
    """`text` in a ckpt-info.json is not strict JSON with finite numbers."""

    def __init__(self, text: str, problem: str) -> None:
        super().__init__(f"{text} is {problem}")
        self.text = text


def _reject_constant(name: str) -> NoReturn:
    raise _NotStrict(name, "not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999, too large for a float
        raise _NotStrict(text, "not a finite number")
    return value


def _place(text: str, fragment: str) -> str:
    """ "line L column C" of the first `fragment` in `text`, for an error message."""
    position = max(text.find(fragment), 0)
    line = text.count("\n", 0, position) + 1
    column = position - text.rfind("\n", 0, position)
    return f"line {line} column {column}"


def read_info(directory: str) -> dict[str, Any]:
    """Read, parse and validate `<directory>/ckpt-info.json`.

    Returns the dict as written (without `info_crc32`, which is checked here). Legacy
    (upstream CANDLE) files may contain `Infinity`, which parses as a float; new files
    must be strict JSON, with finite numbers. The file must be a regular file, not a link.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointFormatError: a link or not a regular file, too large, not UTF-8, not
            JSON, invalid by the schema, or its content does not match its `info_crc32`.
    """
    path = os.path.join(directory, INFO_FILE)
    try:  # not through a link, and never blocking on a FIFO
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise CheckpointFormatError(
            f"{path}: a symbolic link (-> '{os.readlink(path)}'); expected a regular file"
        ) from None
    with open(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointFormatError(f"{path}: not a regular file; expected JSON text")
        data = stream.read(MAX_INFO_BYTES + 1)
    if len(data) > MAX_INFO_BYTES:
        raise CheckpointFormatError(
            f"{path}: larger than {MAX_INFO_BYTES} bytes; expected a ckpt-info.json of a few kB"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointFormatError(
            f"{path}: not UTF-8 (byte {data[error.start]:#04x} "
            f"at position {error.start}); expected JSON text"
        ) from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointFormatError(
            f"{path}: not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except RecursionError:
        raise CheckpointFormatError(
            f"{path}: not valid JSON: arrays or objects nested "
            f"too deeply; expected a ckpt-info object"
        ) from None
    if not isinstance(info, dict):
        raise CheckpointFormatError(
            f"{path}: the top level is a {type(info).__name__}; expected a JSON object"
        )
    if not is_legacy(info):
        try:
            json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        except ValueError as error:
            where = f" at {_place(text, error.text)}" if isinstance(error, _NotStrict) else ""
            raise CheckpointFormatError(
                f"{path}: {error}{where}; a format {FORMAT} file must be strict JSON "
                f"(null, not Infinity/NaN)"
            ) from None
    validate_info(info, path)
    recorded = info.pop(INFO_CRC_KEY, None)
    if recorded is not None and recorded != _content_crc32(info):
        raise CheckpointFormatError(
            f"{path}: key '{INFO_CRC_KEY}' is {recorded!r} but the file's content has CRC32 "
            f"{_content_crc32(info)}; the file is corrupt"
        )
    return info


def read_lineage(directory: str) -> tuple[int, str | None]:
    """(format_version, lineage_id) of `<directory>/ckpt-info.json`, read cheaply and
    not validated: (0, None) for an upstream, unreadable or missing file, (1, None) for
    version 1. A restart reads this for every epoch up to the one it resumes from."""
    version, info = _read_unvalidated(directory)
    if info is None:
        return version, None
    lineage = info.get("lineage_id")
    return (version, lineage) if isinstance(lineage, str) else (0, None)


def read_run_id(directory: str) -> str | None:
    """The `run_id` of `<directory>/ckpt-info.json` (the run that wrote it), read cheaply
    and not validated; None for a version 1, upstream, unreadable or missing file."""
    _, info = _read_unvalidated(directory)
    run_id = None if info is None else info.get("run_id")
    return run_id if isinstance(run_id, str) else None


def _read_unvalidated(directory: str) -> tuple[int, dict[str, Any] | None]:
    """(format_version, the parsed object) of `<directory>/ckpt-info.json`: (0, None) for
    an unreadable or missing file or one without an integer format_version (upstream),
    (1, None) for version 1 (not parsed: its files can be long, listing `epochs_saved`)."""
    try:
        with open(os.path.join(directory, INFO_FILE), "rb") as stream:
            data = stream.read(MAX_INFO_BYTES + 1)
    except OSError:
        return 0, None
    if b'"format_version": 1,' in data[:256]:
        return 1, None
    try:
        info = json.loads(data)
        version = info["format_version"]
    except (ValueError, KeyError, TypeError):
        return 0, None
    if type(version) is not int:
        return 0, None
    return version, info
