"""Benchmark 4: save time with 10 000 existing epoch directories / with 10.

Two trees hold 10 and 10 000 epochs of an earlier run (each an epoch directory with a
small model.h5 and ckpt-info.json); a new run then saves a 10 MB model into each tree,
interleaved. Nothing in the save path may scale with the number of epochs on disk.

    .venv/bin/python benchmarks/bench_many_epochs.py [--epochs 10000] [--repetitions 9]
"""

import argparse
import logging
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    build_model,
    header,
    interleave,
    quiet_tensorflow,
    ratio_line,
    scratch_directory,
    summary,
)


def populate(root, count):
    """A tree with `count` epochs of an earlier run, as the callback writes them."""
    from candle_ckpt.core.checkpointer import Checkpointer

    def tiny(directory):
        with open(os.path.join(directory, "model.h5"), "wb") as stream:
            stream.write(b"\0" * 1024)
        return "model.h5"

    checkpointer = Checkpointer({"ckpt_directory": root, "epochs": count,
                                 "ckpt_save_best": False}, logger=None)
    for epoch in range(1, count + 1):
        checkpointer.epoch_end(epoch, {}, tiny)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10000)
    parser.add_argument("--repetitions", type=int, default=9)
    args = parser.parse_args()
    quiet_tensorflow()
    import candle_ckpt

    header(f"save with {args.epochs} existing epochs / with 10")
    directory = scratch_directory()
    try:
        model = build_model(10)
        callbacks = {}
        for count in (10, args.epochs):
            root = os.path.join(directory, str(count))
            populate(root, count)
            params = {"ckpt_directory": root, "epochs": 10 ** 6, "ckpt_save_best": False,
                      "ckpt_keep_limit": 2}
            callback = candle_ckpt.CandleCheckpointCallback(params, verbose=False)
            callback.set_model(model)
            callbacks[count] = [callback, count]
        logging.getLogger("candle_ckpt").propagate = False

        def save(count):
            callback, epoch = callbacks[count]
            callback.on_epoch_end(epoch, {})
            callbacks[count][1] += 1

        save(10), save(args.epochs)
        times = interleave(args.repetitions, few=lambda: save(10),
                           many=lambda: save(args.epochs))
        print(f"  10 epochs:     {summary(times['few'])}")
        print(f"  {args.epochs} epochs: {summary(times['many'])}")
        print("  " + ratio_line(f"{args.epochs} / 10", times["many"], times["few"]))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
