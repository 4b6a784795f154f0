"""Benchmark 4: save time with 100 000 existing epochs / with 10 (target <= 1.05).

Two trees hold 10 and 100 000 epochs of one keep-all run, built with files directly as
the library writes them (`bench_cli_list.build_tree`: ckpt-info.json format 2 and the
history). A Keras run then resumes each tree from its `last`, so that its lineage (the
epochs its keep policy owns) is the whole tree, and saves a 10 MB model into each,
interleaved. Nothing in the save path may scale with the number of epochs on disk.
The one-time cost that does, the restart reading each epoch's lineage id, is printed
too, against the tree of 10.

    .venv/bin/python benchmarks/bench_many_epochs.py [--epochs 100000] [--repetitions 9]
"""

import argparse
import logging
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cli_list import build_tree
from common import (
    build_model,
    header,
    interleave,
    quiet_tensorflow,
    ratio_line,
    scratch_directory,
    summary,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100000)
    parser.add_argument("--repetitions", type=int, default=9)
    args = parser.parse_args()
    quiet_tensorflow()
    import candle_ckpt

    header(f"save with {args.epochs} existing epochs / with 10")
    directory = scratch_directory()
    try:
        model = build_model(10)
        callbacks, resumed = {}, {}
        for count in (10, args.epochs):
            started = time.perf_counter()
            layout = build_tree(os.path.join(directory, str(count)), count)
            print(f"  tree of {count} epochs built in {time.perf_counter() - started:.1f} s")
            params = {
                "ckpt_directory": layout.root,
                "epochs": 10**6,
                "ckpt_save_best": False,
                "ckpt_keep_mode": "all",
            }
            callback = candle_ckpt.CandleCheckpointCallback(params, verbose=False)
            callback.set_model(model)
            callback.on_train_begin()
            started = time.perf_counter()
            callback.on_epoch_begin(count)  # resumes after epoch `count`, as fit does
            resumed[count] = time.perf_counter() - started
            assert len(callback.checkpointer.run_epochs) == count
            callbacks[count] = [callback, count]
        logging.getLogger("candle_ckpt").propagate = False
        print(
            f"  restart bookkeeping (lineage read from disk, once): 10 epochs "
            f"{resumed[10]:.3f} s, {args.epochs} epochs {resumed[args.epochs]:.3f} s"
        )

        def save(count):
            callback, epoch = callbacks[count]
            callback.on_epoch_end(epoch, {"loss": 1.0})
            callbacks[count][1] += 1

        save(10), save(args.epochs)
        times = interleave(args.repetitions, few=lambda: save(10), many=lambda: save(args.epochs))
        for callback, _ in callbacks.values():
            callback.on_train_end()
        print(f"  10 epochs:     {summary(times['few'])}")
        print(f"  {args.epochs} epochs: {summary(times['many'])}")
        print("  " + ratio_line(f"{args.epochs} / 10", times["many"], times["few"]))
        print(
            f"  load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}"
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
