"""Text from a checkpoint tree made safe to print and to log.

Anyone who can write a tree chooses the strings in it (a timestamp, a metric name, a
name in an HDF5 file). Printed as they are, their control characters would move a
terminal's cursor, recolour or retitle it, or start a line of their own in ckpt.log;
`printable` shows each as an escape instead (ESC as ``\\x1b``), as `repr` does.
"""

from __future__ import annotations

import re

# C0 controls, DEL and the C1 controls (a terminal takes U+009B for ESC [).
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROLS_BUT_LAYOUT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _escape(found: re.Match[str]) -> str:
    return f"\\x{ord(found.group()):02x}"


def printable(text: str, *, keep_layout: bool = False) -> str:
    """`text` with every control character written as its escape (``\\x1b``); with
    `keep_layout`, newline, carriage return and tab are left as they are (for whole
    outputs whose lines are the printer's own)."""
    pattern = _CONTROLS_BUT_LAYOUT if keep_layout else _CONTROLS
    return pattern.sub(_escape, text)
