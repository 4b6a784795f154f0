"""Benchmark 5: time the training thread spends pruning, vs deleting inline.

With ckpt_keep_limit=1 every save of a 100 MB model (300 MB epoch) deletes the previous
epoch. The candidate is the keep policy's deletion as the callback runs it on the
training thread (a durable rename into ckpts/trash/; a background thread removes it);
the baseline is `shutil.rmtree` of an epoch of the same size, which is what deleting
inline would cost the training thread. Both are measured in the same run.

    .venv/bin/python benchmarks/bench_prune.py [--size 100MB] [--repetitions 7]
"""

import argparse
import logging
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SIZES_MB, build_model, header, quiet_tensorflow, scratch_directory, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="100MB")
    parser.add_argument("--repetitions", type=int, default=7)
    args = parser.parse_args()
    quiet_tensorflow()
    import candle_ckpt
    from candle_ckpt.core.save import checkpointer as checkpointer_module

    header(f"training-thread time in pruning, {args.size} model, keep_limit 1")
    directory = scratch_directory()
    pruning = []
    original = checkpointer_module.discard_epochs

    def timed_discard(layout, epochs, logger):
        started = time.perf_counter()
        original(layout, epochs, logger)
        if epochs:
            pruning.append(time.perf_counter() - started)

    checkpointer_module.discard_epochs = timed_discard
    try:
        model = build_model(SIZES_MB[args.size])
        params = {
            "ckpt_directory": os.path.join(directory, "tree"),
            "epochs": 10**6,
            "ckpt_save_best": False,
            "ckpt_keep_limit": 1,
        }
        callback = candle_ckpt.CandleCheckpointCallback(params, verbose=False)
        callback.set_model(model)
        logging.getLogger("candle_ckpt").propagate = False
        callback.on_train_begin()  # as fit does: the session takes the writer lock
        inline = []
        for epoch in range(args.repetitions + 1):
            callback.on_epoch_begin(epoch)
            callback.on_epoch_end(epoch, {})
            callback.checkpointer.trash.wait()
            copy = os.path.join(directory, "copy")
            shutil.copytree(os.path.join(params["ckpt_directory"], "ckpts", "last"), copy)
            os.sync()
            started = time.perf_counter()
            shutil.rmtree(copy)
            inline.append(time.perf_counter() - started)
        print(f"  pruning on the training thread: {summary(pruning)}")
        print(f"  rmtree of the same epoch:       {summary(inline)}")
        ratio = sorted(pruning)[len(pruning) // 2] / sorted(inline)[len(inline) // 2]
        print(f"  ratio: {ratio:.4f}")
        callback.on_train_end()
    finally:
        checkpointer_module.discard_epochs = original
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
