"""What the keys of a ckpt-info.json mean, for the readers that do not validate it.

A survey (`candle-ckpt list`) reads only the head of each file and the list index;
these rules are the ones it shares with `core/format/info.py`, which builds, validates and
reads whole files. Kept apart so that `list` does not import `info`'s record type,
whose NamedTuple brings the `typing` module, a sizeable share of a `list` run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see above)
if TYPE_CHECKING:
    from typing import Any

CHECKSUM_DISABLED = "__DISABLED__"

# A version 2 ckpt-info.json is about 1 kB, and a version 1 file a few hundred kB even
# with 10 000 epochs listed; anything far larger is not one, and reading it whole would
# be a denial of service.
MAX_INFO_BYTES = 16 << 20


def is_legacy(info: Mapping[str, Any]) -> bool:
    """Whether a ckpt-info dict was written by upstream CANDLE rather than candle_ckpt."""
    return "format" not in info


def finite_or_none(value: Any) -> float | None:
    """`value` as a float, or None when it is None, NaN or infinite (JSON has no inf)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def recorded_files(info: Mapping[str, Any]) -> dict[str, tuple[int | None, str | None]]:
    """{file name: (size or None, CRC32 string or None)} of a ckpt-info dict of any
    version; upstream files record only the model file's CRC32 (or __DISABLED__)."""
    if is_legacy(info):
        crc = info["checksum"]
        return {info["model_file"]: (None, None if crc == CHECKSUM_DISABLED else crc)}
    return {name: (entry["size"], entry["crc32"]) for name, entry in info["files"].items()}
