"""What `ckpt_signal` costs: a host snapshot at every epoch end the interval skips.

With `ckpt_signal` on, the callback copies the training state to host memory at each
epoch end it does not save, so that a pre-emption can still save that epoch; every copy
goes into the memory of the one before. This times that copy (`keras_h5.snapshot(model,
into=previous)`) against a full synchronous save by the callback (decision, write,
fsync, CRC32, ckpt-info.json, rename, links, keep policy), interleaved in the same run:

    .venv/bin/python benchmarks/preemption_snapshot.py [--sizes 10MB,100MB] [--repetitions 7]
"""

import argparse
import logging
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (SIZES_MB, build_model, header, interleave,  # noqa: E402
                    quiet_tensorflow, ratio_line, scratch_directory, state_bytes, summary)


def measure(size, repetitions, directory):
    import candle_ckpt
    from candle_ckpt import keras_h5

    model = build_model(SIZES_MB[size])
    params = {"ckpt_directory": os.path.join(directory, size), "epochs": 10 ** 6,
              "ckpt_save_best": False, "ckpt_keep_limit": 2}
    callback = candle_ckpt.CandleCheckpointCallback(params, verbose=False)
    logging.getLogger("candle_ckpt").propagate = False
    callback.set_model(model)
    held = [keras_h5.snapshot(model)]
    epoch = [0]

    def snapshot():
        held[0] = keras_h5.snapshot(model, into=held[0])

    def full_save():
        callback.on_epoch_end(epoch[0], {})
        epoch[0] += 1

    return state_bytes(model), interleave(repetitions, warmup=1, snapshot=snapshot,
                                          full_save=full_save)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10MB,100MB")
    parser.add_argument("--repetitions", type=int, default=7)
    args = parser.parse_args()
    quiet_tensorflow()
    header("ckpt_signal: snapshot at an epoch end that is not saved / full save")
    directory = scratch_directory()
    try:
        for size in args.sizes.split(","):
            nbytes, times = measure(size, args.repetitions, directory)
            print(f"{size} model, {nbytes / 1e6:.0f} MB state")
            for name, seconds in times.items():
                print(f"  {name:10s} {summary(seconds)}")
            print("  " + ratio_line("snapshot / full save", times["snapshot"],
                                    times["full_save"]))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
