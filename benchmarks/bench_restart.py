"""Benchmark 3: restart() with verification / raw load of the same file into the same model.

The candidate is `candle_ckpt.restart(params, model)`: resolve `last`, read and validate
ckpt-info.json, verify the CRC32 of every file, load weights, optimizer and RNG state.
The baseline is `keras_h5.restore(model, path)` on the same model.h5 (the same bytes
loaded, no checks). Keras' own weights-only `model.load_weights(path)` is shown for
reference. The file is in the page cache, as on a restart right after a save. Three untimed rounds
come first: the first few loads in a process are 2-5x slower for both (TensorFlow's
allocator and the process's memory grow), which would only measure the warm-up.

    .venv/bin/python benchmarks/bench_restart.py [--sizes 10MB,100MB] [--repetitions 7]
"""

import argparse
import logging
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (SIZES_MB, build_model, header, interleave, quiet_tensorflow,  # noqa: E402
                    ratio_line, state_bytes, summary, scratch_directory)


def measure(size, repetitions, directory):
    import candle_ckpt
    from candle_ckpt import keras_h5

    model = build_model(SIZES_MB[size])
    params = {"ckpt_directory": os.path.join(directory, size), "epochs": 1,
              "ckpt_save_best": False, "ckpt_restart_mode": "required"}
    callback = candle_ckpt.CandleCheckpointCallback(params, verbose=False)
    callback.set_model(model)
    callback.on_epoch_end(0, {})
    logging.getLogger("candle_ckpt").propagate = False
    path = os.path.join(params["ckpt_directory"], "ckpts", "last", "model.h5")
    times = interleave(
        repetitions, warmup=3,
        raw_restore=lambda: keras_h5.restore(model, path),
        restart=lambda: candle_ckpt.restart(params, model, verbose=False),
        keras_load_weights=lambda: model.load_weights(path))
    return state_bytes(model), times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10MB,100MB")
    parser.add_argument("--repetitions", type=int, default=7)
    args = parser.parse_args()
    quiet_tensorflow()
    header("restart with verification / raw load of the same file")
    directory = scratch_directory()
    try:
        for size in args.sizes.split(","):
            nbytes, times = measure(size, args.repetitions, directory)
            print(f"{size} model, {nbytes / 1e6:.0f} MB state")
            for name, seconds in times.items():
                print(f"  {name:18s} {summary(seconds)}")
            print("  " + ratio_line("restart / raw_restore", times["restart"],
                                    times["raw_restore"]))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
