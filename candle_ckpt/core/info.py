"""ckpt-info.json: build, validate, write and read the record of one checkpoint.

New files follow `schemas/ckpt-info.schema.json` (format_version 1), are validated
before they are written and after they are read, and are always strict JSON (no
Infinity/NaN). Files written by upstream CANDLE (8 keys, `best_metric_last` possibly
`Infinity`) are read through a separate legacy schema; they are never written.
"""

import errno
import functools
import json
import math
import os
import stat
import zlib

from . import durable
from .errors import CheckpointFormatError
from .layout import INFO_FILE

FORMAT = "candle_ckpt"
FORMAT_VERSION = 1
CHECKSUM_DISABLED = "__DISABLED__"
FIRST_SAVE = "__FIRST__"
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"
INFO_CRC_KEY = "info_crc32"

# A ckpt-info.json is a few kB even with 10 000 epochs listed; anything far larger is
# not one, and reading it whole would be a denial of service.
MAX_INFO_BYTES = 16 << 20

SCHEMA_FILE = "ckpt-info.schema.json"
LEGACY_SCHEMA_FILE = "candle-legacy-ckpt-info.schema.json"


jsonschema = None  # bound on first use by _validator


@functools.cache
def _validator(schema_file):
    # Imported here, not at the top: importing jsonschema and importlib.resources takes
    # ~0.1 s, which the command line's `list` (no validation) would pay on every call.
    # validate_info calls this first, then uses the module-level name bound here.
    global jsonschema
    from importlib import resources

    import jsonschema
    text = resources.files("candle_ckpt.schemas").joinpath(schema_file).read_text("utf-8")
    schema = json.loads(text)
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def is_legacy(info):
    """Whether a ckpt-info dict was written by upstream CANDLE rather than candle_ckpt."""
    return "format" not in info


def finite_or_none(value):
    """`value` as a float, or None when it is None, NaN or infinite (JSON has no inf)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _representative(info):
    """`info` with a long `epochs_saved` replaced by its smallest and largest items.

    jsonschema spends about 50 us per item of that list (0.5 s at 10 000 epochs, on
    every save and restart). When the items are distinct integers, which one pass here
    checks, the schema's per-item rule holds for all of them if it holds for the
    extremes; otherwise the whole list goes to the schema, for its error message.
    """
    epochs = info.get("epochs_saved")
    if (not isinstance(epochs, list) or len(epochs) <= 2
            or not all(type(epoch) is int for epoch in epochs)
            or len(set(epochs)) != len(epochs)):
        return info
    return {**info, "epochs_saved": [min(epochs), max(epochs)]}


def validate_info(info, source):
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
            f"(found {found}; schema rule '{'/'.join(map(str, error.schema_path))}')")
    if legacy:
        return
    files = info["files"]
    if info["model_file"] not in files:
        raise CheckpointFormatError(
            f"{source}: key 'model_file' is {info['model_file']!r}, which is not listed in "
            f"'files' ({sorted(files)}); expected one of the files")
    recorded = files[info["model_file"]]["crc32"]
    expected = recorded if recorded is not None else CHECKSUM_DISABLED
    if info["checksum"] != expected:
        raise CheckpointFormatError(
            f"{source}: key 'checksum' is {info['checksum']!r} but "
            f"files/{info['model_file']}/crc32 is {recorded!r}; expected them to agree")
    if INFO_FILE in files:
        raise CheckpointFormatError(f"{source}: key 'files' lists {INFO_FILE!r}, "
                                    f"which cannot checksum itself")


def encode_info(info):
    """The bytes of a ckpt-info.json: strict JSON (raises ValueError on NaN/inf)."""
    return (json.dumps(info, indent=1, allow_nan=False) + "\n").encode("utf-8")


def _content_crc32(info):
    """CRC32 of a ckpt-info dict's content: its encoding without the `info_crc32` key."""
    content = {key: value for key, value in info.items() if key != INFO_CRC_KEY}
    return str(zlib.crc32(encode_info(content)))


def write_info(directory, info):
    """Validate `info` and write it atomically as `<directory>/ckpt-info.json`.

    The file also records `info_crc32`, the CRC32 of its own content, so that a
    corrupted value (a flipped digit in `best_metric_last`, say) is refused on reading.
    """
    path = os.path.join(directory, INFO_FILE)
    validate_info(info, f"{path} (about to be written)")
    durable.write_bytes_atomic(path, encode_info({**info, INFO_CRC_KEY: _content_crc32(info)}))
    return path


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def read_info(directory):
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
        raise CheckpointFormatError(f"{path}: a symbolic link (-> '{os.readlink(path)}'); "
                                    f"expected a regular file") from None
    with open(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointFormatError(f"{path}: not a regular file; expected JSON text")
        data = stream.read(MAX_INFO_BYTES + 1)
    if len(data) > MAX_INFO_BYTES:
        raise CheckpointFormatError(f"{path}: larger than {MAX_INFO_BYTES} bytes; "
                                    f"expected a ckpt-info.json of a few kB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointFormatError(f"{path}: not UTF-8 (byte {data[error.start]:#04x} "
                                    f"at position {error.start}); expected JSON text") from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointFormatError(f"{path}: not valid JSON: {error.msg} at line "
                                    f"{error.lineno} column {error.colno}") from None
    except RecursionError:
        raise CheckpointFormatError(f"{path}: not valid JSON: arrays or objects nested "
                                    f"too deeply; expected a ckpt-info object") from None
    if not isinstance(info, dict):
        raise CheckpointFormatError(f"{path}: the top level is a {type(info).__name__}; "
                                    f"expected a JSON object")
    if not is_legacy(info):
        try:
            json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        except ValueError as error:
            raise CheckpointFormatError(f"{path}: {error}; a format {FORMAT} file must be "
                                        f"strict JSON (null, not Infinity/NaN)") from None
    validate_info(info, path)
    recorded = info.pop(INFO_CRC_KEY, None)
    if recorded is not None and recorded != _content_crc32(info):
        raise CheckpointFormatError(
            f"{path}: key '{INFO_CRC_KEY}' is {recorded!r} but the file's content has CRC32 "
            f"{_content_crc32(info)}; the file is corrupt")
    return info
