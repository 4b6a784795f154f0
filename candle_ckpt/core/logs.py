"""Logging: every checkpoint operation goes to `<ckpt_directory>/ckpt.log` (appended).

Loggers are named under `candle_ckpt` ("candle_ckpt.save", "candle_ckpt.restart", ...).
One process may use several checkpoint trees (tests, ensembles), so each record
carries the tree it is about, and each tree's file handler takes only its own records.
The console gets INFO and up when `verbose`, else WARNING and up. A framework adapter
whose progress bar leaves a line open on stdout (Keras' `verbose=1`) says so with
`set_progress_line_open`; the console handler then ends that line before its record, so
that a record is never spliced into the bar.

The `candle_ckpt` logger does not propagate to the root logger: an application that
configures logging (TensorFlow does) would otherwise print every record a second time,
and INFO even with `verbose=False`. To receive the records elsewhere, add a handler to
`logging.getLogger("candle_ckpt")` or set its `propagate` back to True.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from typing import TypeAlias

from .format.layout import CheckpointLayout
from .storage import tree_fs
from .text import printable

LibraryLogger: TypeAlias = "logging.Logger | logging.LoggerAdapter[logging.Logger]"
"""What the library logs to: a logger, or the adapter `tree_logger` returns."""

_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
_lock = threading.Lock()
_file_handlers: dict[str, logging.Handler] = {}
_console_handler: _ConsoleHandler | None = None
_FILE_ONLY = "ckpt_file_only"  # a record attribute: keep it off the console
logging.getLogger("candle_ckpt").propagate = False  # see the module docstring


class _OneLineFormatter(logging.Formatter):
    """One line per record, whatever strings from a tree its message holds: their
    control characters are escaped (`text.printable`); a traceback follows as usual."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


class _TreeLogHandler(logging.FileHandler):
    """A tree's ckpt.log. A record it cannot write (a full disk) is reported once, in
    one line, instead of logging's traceback per record; saving goes on or fails on its
    own terms."""

    def __init__(self, log_file: str) -> None:
        super().__init__(log_file, encoding="utf-8")
        self.failed = False

    def _open(self) -> io.TextIOWrapper:
        """Open the log file for appending, never through a link (core/storage/tree_fs.py).

        Raises:
            UnsafePathError: ckpt.log is a link or not a regular file.
        """
        root = os.path.dirname(self.baseFilename)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        # 0666 less the umask, as `open` makes it: a team's operators log here too
        descriptor = tree_fs.open_tree_file(root, self.baseFilename, flags, 0o666)
        return open(descriptor, "a", encoding=self.encoding, errors=self.errors)

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            sys.stderr.write(
                f"candle_ckpt: cannot write '{self.baseFilename}' "
                f"({sys.exc_info()[1]}); its records are lost from now on, "
                f"the console still gets them\n"
            )


class _ConsoleHandler(logging.StreamHandler):
    """stderr, starting each record on a fresh line when a progress line is open."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.progress_line = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.progress_line.is_set():
            self.progress_line.clear()
            try:  # the bar is on stdout: end its line there, where it is open
                sys.stdout.write("\n")
                sys.stdout.flush()
            except (OSError, ValueError):  # a closed or full stdout: the record still goes
                pass
        super().emit(record)


def set_progress_line_open(is_open: bool) -> None:
    """Say whether a progress line is open (not ended) on stdout, e.g. True after each
    batch of a Keras `fit(verbose=1)`, False at an epoch's start: the next console record
    first ends an open line. Sets a flag only, so it may be called every batch."""
    handler = _console_handler
    if handler is None:
        return
    if is_open:
        handler.progress_line.set()
    else:
        handler.progress_line.clear()


class _TreeFilter(logging.Filter):
    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = root

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "ckpt_directory", None) == self.root


def _ensure_file_handler(root: str, log_file: str) -> None:
    with _lock:
        if root in _file_handlers:
            return
        os.makedirs(root, exist_ok=True)
        handler = _TreeLogHandler(log_file)
        handler.setFormatter(_OneLineFormatter(_FORMAT))
        handler.addFilter(_TreeFilter(root))
        logging.getLogger("candle_ckpt").addHandler(handler)
        _file_handlers[root] = handler


def _ensure_console_handler(verbose: bool) -> None:
    global _console_handler
    with _lock:
        if _console_handler is None:
            _console_handler = _ConsoleHandler()
            _console_handler.setFormatter(_OneLineFormatter(_FORMAT))
            _console_handler.addFilter(lambda record: not getattr(record, _FILE_ONLY, False))
            logging.getLogger("candle_ckpt").addHandler(_console_handler)
        _console_handler.setLevel(logging.INFO if verbose else logging.WARNING)


def tree_logger(name: str, layout: CheckpointLayout, verbose: bool = True) -> LibraryLogger:
    """A logger for operations on one checkpoint tree.

    Args:
        name: the suffix, e.g. "save" gives the logger "candle_ckpt.save".
        layout: the tree's `CheckpointLayout` (its ckpt.log is created if needed).
        verbose: INFO to the console when True, only warnings when False.

    Returns:
        A `logging.LoggerAdapter` whose records reach this tree's ckpt.log.
    """
    _library_logger()
    _ensure_file_handler(layout.root, layout.log_file)
    _ensure_console_handler(verbose)
    return logging.LoggerAdapter(
        logging.getLogger(f"candle_ckpt.{name}"), {"ckpt_directory": layout.root}
    )


def console_logger(name: str, verbose: bool = True) -> logging.Logger:
    """A logger under `candle_ckpt` that reaches the console only, never a ckpt.log.

    For processes that must write nothing in the checkpoint tree (the non-writer
    workers of a multi-process job).

    Args:
        name: the suffix, e.g. "restart" gives the logger "candle_ckpt.restart".
        verbose: INFO to the console when True, only warnings when False.
    """
    _library_logger()
    _ensure_console_handler(verbose)
    return logging.getLogger(f"candle_ckpt.{name}")


def _library_logger() -> logging.Logger:
    logger = logging.getLogger("candle_ckpt")
    logger.setLevel(logging.DEBUG)
    return logger


def log_to_file_only(logger: LibraryLogger, level: int, message: str, *args: object) -> None:
    """Log to the tree's ckpt.log but not the console, through a `tree_logger`.

    For an error that is also raised: whoever catches it shows it (the example
    benchmarks in one line), so the console would get it twice.
    """
    if isinstance(logger, logging.LoggerAdapter):
        logger.logger.log(level, message, *args, extra={**(logger.extra or {}), _FILE_ONLY: True})
    else:  # a logger of no tree: the record reaches no ckpt.log either
        logger.log(level, message, *args, extra={_FILE_ONLY: True})


def close_tree_log(layout: CheckpointLayout) -> None:
    """Close and detach the file handler of a tree (e.g. before deleting the tree)."""
    with _lock:
        handler = _file_handlers.pop(layout.root, None)
    if handler is not None:
        logging.getLogger("candle_ckpt").removeHandler(handler)
        handler.close()


def silent_logger() -> logging.Logger:
    """The logger used when the caller passes logger=None: it drops every record."""
    logger = logging.getLogger("candle_ckpt.silent")
    logger.disabled = True
    return logger
