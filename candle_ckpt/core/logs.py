"""Logging: every checkpoint operation goes to `<ckpt_directory>/ckpt.log` (appended).

Loggers are named under `candle_ckpt` ("candle_ckpt.save", "candle_ckpt.restart", ...).
One process may use several checkpoint trees (tests, ensembles), so each record
carries the tree it is about, and each tree's file handler takes only its own records.
The console gets INFO and up when `verbose`, else WARNING and up.
"""

import logging
import os
import sys
import threading

_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
_lock = threading.Lock()
_file_handlers: dict[str, logging.Handler] = {}
_console_handler: logging.Handler | None = None


class _TreeFilter(logging.Filter):
    def __init__(self, root):
        super().__init__()
        self.root = root

    def filter(self, record):
        return getattr(record, "ckpt_directory", None) == self.root


def _ensure_file_handler(root, log_file):
    with _lock:
        if root in _file_handlers:
            return
        os.makedirs(root, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(_TreeFilter(root))
        logging.getLogger("candle_ckpt").addHandler(handler)
        _file_handlers[root] = handler


def _ensure_console_handler(verbose):
    global _console_handler
    with _lock:
        if _console_handler is None:
            _console_handler = logging.StreamHandler(sys.stderr)
            _console_handler.setFormatter(logging.Formatter(_FORMAT))
            logging.getLogger("candle_ckpt").addHandler(_console_handler)
        _console_handler.setLevel(logging.INFO if verbose else logging.WARNING)


def tree_logger(name, layout, verbose=True):
    """A logger for operations on one checkpoint tree.

    Args:
        name: the suffix, e.g. "save" gives the logger "candle_ckpt.save".
        layout: the tree's `CheckpointLayout` (its ckpt.log is created if needed).
        verbose: INFO to the console when True, only warnings when False.

    Returns:
        A `logging.LoggerAdapter` whose records reach this tree's ckpt.log.
    """
    base = logging.getLogger("candle_ckpt")
    base.setLevel(logging.DEBUG)
    _ensure_file_handler(layout.root, layout.log_file)
    _ensure_console_handler(verbose)
    return logging.LoggerAdapter(logging.getLogger(f"candle_ckpt.{name}"),
                                 {"ckpt_directory": layout.root})


def console_logger(name, verbose=True):
    """A logger under `candle_ckpt` that reaches the console only, never a ckpt.log.

    For processes that must write nothing in the checkpoint tree (the non-writer
    workers of a multi-process job).

    Args:
        name: the suffix, e.g. "restart" gives the logger "candle_ckpt.restart".
        verbose: INFO to the console when True, only warnings when False.
    """
    logging.getLogger("candle_ckpt").setLevel(logging.DEBUG)
    _ensure_console_handler(verbose)
    return logging.getLogger(f"candle_ckpt.{name}")


def close_tree_log(layout):
    """Close and detach the file handler of a tree (e.g. before deleting the tree)."""
    with _lock:
        handler = _file_handlers.pop(layout.root, None)
    if handler is not None:
        logging.getLogger("candle_ckpt").removeHandler(handler)
        handler.close()


def silent_logger():
    """The logger used when the caller passes logger=None: it drops every record."""
    logger = logging.getLogger("candle_ckpt.silent")
    logger.disabled = True
    return logger
