"""Benchmark 3: restart() with verification / raw load of the same file into the same model.

The candidate is `candle_ckpt.restart(params, model)`: resolve `last`, read and validate
ckpt-info.json, verify the CRC32 of every file, load weights, optimizer and RNG state
(from 64 MiB on, the large arrays read straight into the variables once the file
verified). The baseline is `keras_h5.restore(model, path)` on the same model.h5 (the
same bytes loaded, no checks, read into new memory). Keras' own weights-only
`model.load_weights(path)` is shown for reference. The file is in the page cache, as on
a restart right after a save; the `_cold` rows evict every file of the tree first
(`posix_fadvise(DONTNEED)`, untimed), as on a restart in a new job. Three untimed
rounds come first: the first few loads in a process are 2-5x slower for both
(TensorFlow's allocator and the process's memory grow), which would only measure the
warm-up.

    .venv/bin/python benchmarks/bench_restart.py [--sizes 10MB,100MB,1GB] [--repetitions 7] \\
        [--directory DIR]
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    SIZES_MB,
    build_model,
    callback_save,
    compare_by_size,
    evict,
    interleave,
    state_bytes,
    timed,
)


def measure(size, repetitions, directory):
    import candle_ckpt
    from candle_ckpt.keras import h5 as keras_h5

    model = build_model(SIZES_MB[size])
    root = os.path.join(directory, size)
    callback_save(model, root)()
    logging.getLogger("candle_ckpt").propagate = False
    params = {"ckpt_directory": root, "ckpt_restart_mode": "required"}
    path = os.path.join(root, "ckpts", "last", "model.h5")

    def raw_restore():
        keras_h5.restore(model, path)

    def restart():
        candle_ckpt.restart(params, model, verbose=False)

    times = interleave(
        repetitions,
        warmup=3,
        raw_restore=raw_restore,
        restart=restart,
        keras_load_weights=lambda: model.load_weights(path),
    )
    for _ in range(repetitions):
        for name, function in (("raw_restore_cold", raw_restore), ("restart_cold", restart)):
            evict(root)
            times.setdefault(name, []).append(timed(function))
    return state_bytes(model), times


if __name__ == "__main__":
    compare_by_size(
        __doc__.splitlines()[0],
        "restart with verification / raw load of the same file",
        measure,
        candidate="restart",
        baseline="raw_restore",
        also=[("restart_cold", "raw_restore_cold")],
    )
