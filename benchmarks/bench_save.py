"""Benchmark 1: save overhead = full callback save / raw Keras h5 save + fsync.

The candidate is `CandleCheckpointCallback.on_epoch_end` (decision, snapshot, write,
fsync, CRC32, ckpt-info.json, rename, links, keep policy with a limit of 2 so deletions
happen); the baseline is `model.save("x.h5")` (Keras' legacy h5, the same format)
followed by fsync of the file. Both write to the same file system, interleaved.

    .venv/bin/python benchmarks/bench_save.py [--sizes 10MB,100MB,1GB] [--repetitions 7]
"""

import argparse
import logging
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (SIZES_MB, build_model, header, interleave,  # noqa: E402
                    quiet_tensorflow, ratio_line, scratch_directory, state_bytes, summary)

from candle_ckpt.durable import fsync_file  # noqa: E402


def measure(size, repetitions, directory, asynchronous=False):
    import candle_ckpt

    model = build_model(SIZES_MB[size])
    root = os.path.join(directory, f"save-{size}")
    params = {"ckpt_directory": root, "epochs": 10 ** 6, "ckpt_save_best": False,
              "ckpt_keep_limit": 2}
    callback = candle_ckpt.CandleCheckpointCallback(params, verbose=False)
    logging.getLogger("candle_ckpt").propagate = False
    callback.set_model(model)
    raw = os.path.join(directory, "raw.h5")
    epoch = [0]

    def library_save():
        callback.on_epoch_end(epoch[0], {})
        epoch[0] += 1

    def keras_save():
        model.save(raw)
        fsync_file(raw)

    times = interleave(repetitions, warmup=1, keras=keras_save, candle_ckpt=library_save)
    shutil.rmtree(root)
    return state_bytes(model), times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10MB,100MB")
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--directory", default=None,
                        help="where to write (default: a temporary directory under ./save)")
    args = parser.parse_args()
    quiet_tensorflow()
    header("save overhead: callback save / (model.save h5 + fsync)")
    directory = args.directory or scratch_directory()
    try:
        for size in args.sizes.split(","):
            nbytes, times = measure(size, args.repetitions, directory)
            print(f"{size} model, {nbytes / 1e6:.0f} MB state")
            print(f"  keras save+fsync: {summary(times['keras'])}")
            print(f"  candle_ckpt save: {summary(times['candle_ckpt'])}")
            print("  " + ratio_line("candle_ckpt / keras", times["candle_ckpt"], times["keras"]))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
