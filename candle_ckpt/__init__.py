"""candle_ckpt: crash-consistent checkpoint and restart of Keras training jobs on HPC.

Usage in a CANDLE-style benchmark::

    parser = argparse.ArgumentParser(); candle_ckpt.ckpt_parser(parser)
    params = vars(parser.parse_args())
    model = build_and_compile_model(params)
    J = candle_ckpt.restart(params, model)       # None, or the ckpt-info.json dict
    initial_epoch = J["epoch"] if J else 0
    ckpt = candle_ckpt.CandleCheckpointCallback(params)
    model.fit(..., epochs=params["epochs"], initial_epoch=initial_epoch, callbacks=[ckpt])

In a PyTorch benchmark, `CandleCkptPyTorch(params)` (see `candle_ckpt.pytorch.ckpt`).
A benchmark written for upstream CANDLE (candle_lib) switches by its import:
`CandleCkptKeras` and `CandleCkptPyTorch` have candle_lib's API and find its trees.

`import candle_ckpt` imports neither TensorFlow nor torch: the Keras names (`restart`,
`CandleCheckpointCallback`, `CandleCkptKeras`), `CandleCkptPyTorch` and the parameter
functions (`ckpt_parser`, ...) are loaded on first access. `import_tensorflow_quietly()`
imports TensorFlow and Keras without their start-up lines on stderr.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .core.errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointWriteError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    LinkError,
    NoCheckpointError,
    ParameterTypeError,
    ParameterValueError,
    UnsafePathError,
    WriterLockedError,
    exit_status,
)

TYPE_CHECKING = False  # typing's, without importing typing: see core/format/info_keys.py
if TYPE_CHECKING:
    from typing import Any

    from .core.params import (
        ParamRequired,
        ParamType,
        ckpt_defs,
        ckpt_parser,
        param,
        str2bool,
        validate_params,
    )
    from .tensorflow_startup import import_tensorflow_quietly

_LAZY = {
    "CandleCheckpointCallback": "candle_ckpt.keras.callback",
    "CandleCkptKeras": "candle_ckpt.keras.ckpt",
    "CandleCkptPyTorch": "candle_ckpt.pytorch.ckpt",
    "restart": "candle_ckpt.keras.restart",
    "import_tensorflow_quietly": "candle_ckpt.tensorflow_startup",
    # the parameter table brings argparse, difflib, logging and subprocess (walltime),
    # which the command line's read-only commands never use
    **dict.fromkeys(
        [
            "ParamRequired",
            "ParamType",
            "ckpt_defs",
            "ckpt_parser",
            "param",
            "str2bool",
            "validate_params",
        ],
        "candle_ckpt.core.params",
    ),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'candle_ckpt' has no attribute {name!r}")


__all__ = [
    "CandleCheckpointCallback",
    "CandleCkptKeras",
    "CandleCkptPyTorch",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointWriteError",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "LinkError",
    "NoCheckpointError",
    "ParamRequired",
    "ParamType",
    "ParameterTypeError",
    "ParameterValueError",
    "UnsafePathError",
    "WriterLockedError",
    "ckpt_defs",
    "ckpt_parser",
    "exit_status",
    "import_tensorflow_quietly",
    "param",
    "restart",
    "str2bool",
    "validate_params",
]
