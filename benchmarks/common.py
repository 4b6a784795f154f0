"""Shared pieces of the benchmarks: models of a given size, interleaved timing, reports.

The machine is shared and noisy, so every benchmark measures its baseline in the same
run, interleaving baseline and candidate repetitions, and reports the ratio of medians
with the min-max range of each.
"""

import argparse
import itertools
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

SIZES_MB = {"10MB": 10, "100MB": 100, "1GB": 1000}


def quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")


def build_model(megabytes, seed=0):
    """A compiled 4-layer MLP with about `megabytes` MB of float32 parameters, Adam built.

    One training step has run, so the optimizer's slot variables exist: the state is
    about 3x the parameter bytes, as in MEASUREMENTS.md.
    """
    import keras
    import numpy as np

    keras.utils.set_random_seed(seed)
    width = int((megabytes * 1e6 / 4 / 4) ** 0.5)
    model = keras.Sequential(
        [keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(4)]
    )
    model.compile(optimizer="adam", loss="mean_squared_error")
    x = np.zeros((8, width), "float32")
    model.train_on_batch(x, x)
    return model


def state_bytes(model):
    return sum(v.numpy().nbytes for v in model.weights + model.optimizer.variables)


def scratch_directory(parent=None):
    """A fresh temporary directory under `parent` (default ./save, the checkpoint file
    system); remove it when done."""
    parent = parent or "save"
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix="bench-", dir=parent)


def callback_save(model, root):
    """A function that saves `model` into `root` through the callback's on_epoch_end,
    one epoch further at each call: the full synchronous save (no best link; keep limit
    2, so that saves also delete). Its `end()` ends the session as the end of training
    does, releasing the tree's writer lock for a restart in the same process."""
    import candle_ckpt

    params = {
        "ckpt_directory": root,
        "epochs": 10**6,
        "ckpt_save_best": False,
        "ckpt_keep_limit": 2,
    }
    callback = candle_ckpt.CandleCheckpointCallback(params, verbose=False)
    logging.getLogger("candle_ckpt").propagate = False
    callback.set_model(model)
    callback.on_train_begin()
    epochs = itertools.count()

    def save():
        callback.on_epoch_end(next(epochs), {})

    save.end = callback.on_train_end
    return save


def compare_by_size(description, title, measure, candidate, baseline, also=()):
    """Run a benchmark that compares two timings at each model size, and report.

    `measure(size, repetitions, directory)` returns (state bytes, {name: [seconds]});
    the report gives every timing and the ratio `candidate` / `baseline`, and that of
    each (candidate, baseline) pair of `also`. Command line:
    --sizes (default 10MB,100MB; 1GB as well), --repetitions (default 7), --directory
    (where to write; a temporary directory is made in it and removed).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sizes", default="10MB,100MB")
    parser.add_argument("--repetitions", type=int, default=7)
    directory_argument(parser)
    args = parser.parse_args()
    quiet_tensorflow()
    header(title)
    directory = scratch_directory(args.directory)
    try:
        for size in args.sizes.split(","):
            nbytes, times = measure(size, args.repetitions, directory)
            print(f"{size} model, {nbytes / 1e6:.0f} MB state")
            width = max(map(len, times))
            for name, seconds in times.items():
                print(f"  {name:{width}s} {summary(seconds)}")
            for ours, theirs in ((candidate, baseline), *also):
                print("  " + ratio_line(f"{ours} / {theirs}", times[ours], times[theirs]))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def directory_argument(parser):
    """Add --directory, where a benchmark writes (it makes a scratch directory there)."""
    parser.add_argument(
        "--directory",
        default=None,
        help="where to write (default: ./save, the checkpoint file system)",
    )


def evict(directory):
    """Drop every file under `directory` from the page cache (they are all clean: fsynced)."""
    for parent, _, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(function):
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def copy_floor(arrays, repetitions):
    """Seconds to copy `arrays` into one block of aligned snapshot memory, filled once
    untimed first, with `direct_io.copy_into` (two threads for large arrays), as an
    async save copies the state: the least a snapshot that copies can stall training."""
    from candle_ckpt.core.storage.direct_io import aligned_arrays, copy_into

    block = aligned_arrays([(a.dtype, a.shape) for a in arrays])

    def copy_all():
        for target, source in zip(block, arrays):
            copy_into(target, source)

    copy_all()
    return [timed(copy_all) for _ in range(repetitions)]


def interleave(repetitions, warmup=0, **candidates):
    """Run each candidate `repetitions` times, interleaved; {name: [seconds]}.

    `warmup` untimed rounds of every candidate run first.
    """
    for _ in range(warmup):
        for function in candidates.values():
            function()
    times = {name: [] for name in candidates}
    for _ in range(repetitions):
        for name, function in candidates.items():
            times[name].append(timed(function))
    return times


# The epochs of a cycle (bench_async.py, bench_pytorch.py): a plain epoch, one that ends
# in a synchronous save, one that ends in an async save, and the one its write overlaps.
PLAIN, SYNC_SAVE, ASYNC_SAVE, AFTER_ASYNC = range(4)
PHASE_NAMES = ("plain", "sync save", "async save", "after async")
EPOCHS_PER_CYCLE = len(PHASE_NAMES)


def cycle_epochs(cycles):
    """How many epochs to train for `cycles` kept cycles: one cycle more before them
    (tracing, allocator warm-up) and one after (its async save is waited for by the end
    of training, not at the start of a next cycle)."""
    return EPOCHS_PER_CYCLE * (cycles + 2)


def kept_cycles(epoch_times, waits, cycles):
    """(the epoch times of each kept cycle by phase, the wait for each one's async save),
    from the times of all `cycle_epochs(cycles)` epochs and the waits taken at the start
    of every cycle: the wait for cycle k's save is the one cycle k + 1 starts with."""
    per_cycle = [
        epoch_times[EPOCHS_PER_CYCLE * k : EPOCHS_PER_CYCLE * (k + 1)] for k in range(1, cycles + 1)
    ]
    return per_cycle, waits[2 : cycles + 2]


def cycle_costs(cycles, waits):
    """What each cycle's saves cost training, (sync costs, async costs) in seconds.

    `cycles` holds the epoch times of each cycle by phase, `waits` the seconds the
    training thread waited for the cycle's async save at the start of the next one.
    A sync save costs its epoch's excess over the plain epoch of its cycle, an async
    save the excess of its epoch and the next, and any wait for it.
    """
    sync = [cycle[SYNC_SAVE] - cycle[PLAIN] for cycle in cycles]
    asynchronous = [
        cycle[ASYNC_SAVE] + cycle[AFTER_ASYNC] + wait - 2 * cycle[PLAIN]
        for cycle, wait in zip(cycles, waits)
    ]
    return sync, asynchronous


def report_cycles(cycles, waits, indent="  "):
    """Print the epoch times by phase, the cost of each kind of save (mean and its
    standard error over the cycles) and the ratio the async target is about."""
    for phase, name in enumerate(PHASE_NAMES):
        print(f"{indent}epoch time, {name:11s} {summary([c[phase] for c in cycles])}")
    sync, asynchronous = cycle_costs(cycles, waits)
    for name, costs in (("sync ", sync), ("async", asynchronous)):
        error = statistics.stdev(costs) / len(costs) ** 0.5
        print(
            f"{indent}{name} save's cost to training: {statistics.mean(costs):.4f} s "
            f"(standard error {error:.4f}, n={len(costs)})"
        )
    print(
        f"{indent}epoch cost async / sync (<= 0.25): ratio "
        f"{statistics.mean(asynchronous) / statistics.mean(sync):.3f} "
        f"(of the medians: {statistics.median(asynchronous) / statistics.median(sync):.3f})"
    )
    late = [wait for wait in waits if wait > 0.001]
    print(
        f"{indent}async saves still running when their cycle ended: {len(late)} of "
        f"{len(waits)}" + (f" (waited for, {sum(late):.3f} s in all)" if late else "")
    )


def summary(seconds):
    return (
        f"median {statistics.median(seconds):.4f} s "
        f"(min {min(seconds):.4f}, max {max(seconds):.4f}, n={len(seconds)})"
    )


def against_fastest(times, ours="candle_ckpt", peers=None):
    """How `ours` compares with the fastest of `peers` (default: every other name in
    `times`, {name: [seconds]}), by medians: (that peer's name, ours / its time, ours
    minus its time in seconds)."""
    names = peers if peers is not None else [name for name in times if name != ours]
    peer = min(names, key=lambda name: statistics.median(times[name]))
    mine, theirs = statistics.median(times[ours]), statistics.median(times[peer])
    return peer, mine / theirs, mine - theirs


def ratio_line(label, candidate, baseline):
    ratio = statistics.median(candidate) / statistics.median(baseline)
    return f"{label}: ratio {ratio:.3f}"


def header(title):
    print(f"# {title}")
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} {os.cpu_count()} cores, "
        f"python {platform.python_version()}, command: {' '.join([sys.executable] + sys.argv)}"
    )


def footer(repetitions):
    """The last line of a report: how loaded the machine was, and the medians' size."""
    print(f"# load average {os.getloadavg()} at {time.strftime('%H:%M')}; medians of {repetitions}")
