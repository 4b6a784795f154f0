"""What `ckpt_signal` costs: a host snapshot at every epoch end the interval skips.

With `ckpt_signal` on, the callback copies the training state to host memory at each
epoch end it does not save, so that a pre-emption can still save that epoch; every copy
goes into the memory of the one before. This times that copy (`keras_h5.snapshot(model,
into=previous)`) against a full synchronous save by the callback (decision, write,
fsync, CRC32, ckpt-info.json, rename, links, keep policy), interleaved in the same run:

    .venv/bin/python benchmarks/preemption_snapshot.py [--sizes 10MB,100MB] [--repetitions 7] \\
        [--directory DIR]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SIZES_MB, build_model, callback_save, compare_by_size, interleave, state_bytes


def measure(size, repetitions, directory):
    from candle_ckpt.keras import h5 as keras_h5

    model = build_model(SIZES_MB[size])
    held = [keras_h5.snapshot(model)]

    def snapshot():
        held[0] = keras_h5.snapshot(model, into=held[0])

    return state_bytes(model), interleave(
        repetitions,
        warmup=1,
        snapshot=snapshot,
        full_save=callback_save(model, os.path.join(directory, size)),
    )


if __name__ == "__main__":
    compare_by_size(
        __doc__.splitlines()[0],
        "ckpt_signal: snapshot at an epoch end that is not saved / full save",
        measure,
        candidate="snapshot",
        baseline="full_save",
    )
