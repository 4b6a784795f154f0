"""Benchmark 1: save overhead = full callback save / raw Keras h5 save + fsync.

The candidate is `CandleCheckpointCallback.on_epoch_end` (decision, snapshot, write,
fsync, CRC32, ckpt-info.json, rename, links, keep policy with a limit of 2 so deletions
happen); the baseline is `model.save("x.h5")` (Keras' legacy h5, the same format)
followed by fsync of the file. Both write to the same file system, interleaved.

    .venv/bin/python benchmarks/bench_save.py [--sizes 10MB,100MB,1GB] [--repetitions 7] \\
        [--directory DIR]
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SIZES_MB, build_model, callback_save, compare_by_size, interleave, state_bytes

from candle_ckpt.core.storage.durable import fsync_file


def measure(size, repetitions, directory):
    model = build_model(SIZES_MB[size])
    root = os.path.join(directory, f"save-{size}")
    raw = os.path.join(directory, "raw.h5")

    def keras_save():
        model.save(raw)
        fsync_file(raw)

    times = interleave(
        repetitions, warmup=1, keras=keras_save, candle_ckpt=callback_save(model, root)
    )
    shutil.rmtree(root)
    return state_bytes(model), times


if __name__ == "__main__":
    compare_by_size(
        __doc__.splitlines()[0],
        "save overhead: callback save / (model.save h5 + fsync)",
        measure,
        candidate="candle_ckpt",
        baseline="keras",
    )
