"""Benchmark 6: what async saves cost training, against synchronous saves; the stall.

A 100 MB model (300 MB of state) trains with model.fit in one run of many short epochs
(about 0.4 s at 100 MB with the default --steps). The epochs go in cycles of four:

    plain, then a synchronous save, then an async save, then plain

so every cost is a difference between neighbouring epochs of the same cycle, which
cancels the drift of a shared machine's speed over minutes (between separate runs per
mode it was larger than a save's cost), and short epochs keep the noise of the steps
that no save touches small. The epoch after the async save is where its background
write runs; if it has not ended by the next cycle, the training thread waits for it
there, and that wait counts too, as it would in a run that saves every epoch. Per cycle:

    sync cost  = (sync-save epoch) - (plain epoch)
    async cost = (async-save epoch) + (epoch after it) + (wait) - 2 x (plain epoch)

and the ratio the target is about, async cost / sync cost (each the mean over cycles,
with its standard error). Epoch times include the save's stall (the timer runs last).
Also reported: the stall of each kind of save (the first async save separately: it
must not be much longer than later ones), and the state copied into aligned snapshot
memory alone (`common.copy_floor`): the least an async save that copies can stall.

    .venv/bin/python benchmarks/bench_async.py [--sizes 100MB] [--cycles 60] \
        [--steps 4] [--quick]

The PyTorch counterpart is in bench_pytorch.py.
"""

import argparse
import logging
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    ASYNC_SAVE,
    EPOCHS_PER_CYCLE,
    PLAIN,
    SIZES_MB,
    SYNC_SAVE,
    build_model,
    copy_floor,
    cycle_epochs,
    header,
    kept_cycles,
    quiet_tensorflow,
    report_cycles,
    scratch_directory,
    summary,
    timed,
)


def run(model, cycles, steps, directory):
    """Train `cycles` + 2 cycles (the first, which traces, and the last, whose wait is
    the end of fit's, left out). Returns per cycle the epoch times by phase and the
    seconds the training thread then waited for the async save; and the stalls of each
    kind of save."""
    import keras
    import numpy as np
    import tensorflow as tf

    import candle_ckpt

    width = model.input_shape[-1]
    x = np.random.default_rng(0).standard_normal((steps * 32, width)).astype("float32")
    # One iterator for the whole run: from numpy arrays, fit makes a new tf.data iterator
    # every epoch, and making it sometimes holds the first step for seconds, with or
    # without checkpointing.
    batches = tf.data.Dataset.from_tensor_slices((x, x)).batch(32).repeat()
    stalls = {SYNC_SAVE: [], ASYNC_SAVE: []}
    epoch_times, waits = [], []

    class SavesInItsPhase(candle_ckpt.CandleCheckpointCallback):
        """Saves only at the end of the epochs of its phase of the cycle, timed."""

        def __init__(self, phase):
            super().__init__(
                {
                    "ckpt_directory": os.path.join(
                        directory, "async" if phase == ASYNC_SAVE else "sync"
                    ),
                    "epochs": cycle_epochs(cycles),
                    "ckpt_save_best": False,
                    "ckpt_keep_limit": 2,
                    "ckpt_async": phase == ASYNC_SAVE,
                },
                verbose=False,
            )
            self.phase = phase

        def on_epoch_end(self, epoch, logs=None):
            if epoch % EPOCHS_PER_CYCLE == self.phase:
                started = time.perf_counter()
                super().on_epoch_end(epoch, logs)
                stalls[self.phase].append(time.perf_counter() - started)

    saving = [SavesInItsPhase(SYNC_SAVE), SavesInItsPhase(ASYNC_SAVE)]
    background = saving[1].checkpointer.background
    logging.getLogger("candle_ckpt").propagate = False

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch % EPOCHS_PER_CYCLE == PLAIN:
                waits.append(timed(background.wait))
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_times.append(time.perf_counter() - self.started)

    # the timer runs last, so an epoch's time includes the checkpoint stall
    model.fit(
        batches,
        steps_per_epoch=steps,
        epochs=cycle_epochs(cycles),
        verbose=0,
        callbacks=saving + [EpochTimer()],
    )
    for callback in saving:
        shutil.rmtree(callback.session.settings["ckpt_directory"])
    return (*kept_cycles(epoch_times, waits, cycles), stalls)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100MB")
    parser.add_argument("--cycles", type=int, default=60, help="cycles of 4 epochs")
    parser.add_argument("--steps", type=int, default=4, help="batches per epoch")
    parser.add_argument("--quick", action="store_true", help="100MB, 20 cycles")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.cycles = "100MB", 20
    quiet_tensorflow()
    header("async save: what it costs training, against synchronous saves")
    directory = scratch_directory()
    try:
        for size in args.sizes.split(","):
            model = build_model(SIZES_MB[size])
            cycles, waits, stalls = run(model, args.cycles, args.steps, directory)
            state = [v.numpy() for v in model.weights + model.optimizer.variables]
            floor = copy_floor(state, len(stalls[ASYNC_SAVE]) - 1)
            print(f"{size} model, {len(cycles)} cycles of 4 epochs of {args.steps} steps")
            report_cycles(cycles, waits)
            sync, first, later = stalls[SYNC_SAVE], stalls[ASYNC_SAVE][0], stalls[ASYNC_SAVE][1:]
            print(f"  sync  save's stall: {summary(sync)}")
            print(f"  async first save's stall: {first:.4f} s")
            print(f"  async later saves' stall: {summary(later)}")
            ratio = statistics.median(later) / statistics.median(sync)
            print(f"  stall async / sync: ratio {ratio:.3f}")
            print(f"  first / later async stall: ratio {first / statistics.median(later):.3f}")
            print(f"  state copied into snapshot memory alone: {summary(floor)}")
            print(
                f"  copy alone / sync stall (the least a copying snapshot stalls): ratio "
                f"{statistics.median(floor) / statistics.median(sync):.3f}"
            )
        os.system("uptime")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
