"""Import TensorFlow and Keras without the start-up lines TensorFlow writes to stderr.

While it loads, TensorFlow writes lines that are harmless on a CPU machine (absl's
"All log messages before absl::InitializeLog()", oneDNN's notices, and without a GPU
"failed call to cuInit"); they come before absl's log setup, so TF_CPP_MIN_LOG_LEVEL
does not reach them, and a user reading a job's stderr takes them for errors.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

_STARTUP_NOISE = (
    "WARNING: All log messages before absl::InitializeLog()",
    "I0000 ",
    "To enable the following instructions:",
)
_NO_GPU_NOISE = "failed call to cuInit"


def _is_noise(line: str, has_gpu: bool) -> bool:
    return line.startswith(_STARTUP_NOISE) or (_NO_GPU_NOISE in line and not has_gpu)


def import_tensorflow_quietly() -> tuple[Any, Any]:
    """Import and return `(tensorflow, keras)` with their start-up lines held back.

    Everything written to stderr meanwhile is kept; only the known start-up lines are
    dropped (the cuInit failure only where there is no NVIDIA device to use), the rest
    is written out afterwards, and all of it if the import fails.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's own INFO/WARNING
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            import keras
            import tensorflow

            tensorflow.config.list_physical_devices("GPU")  # where cuInit runs, and complains
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
            has_gpu = os.path.exists("/dev/nvidia0")
            sys.stderr.writelines(line for line in lines if failed or not _is_noise(line, has_gpu))
    return tensorflow, keras
