"""Benchmark: what async step saves (`ckpt_save_steps`, issue 29) cost PyTorch training.

A PyTorch MLP (four square Linear layers, AdamW after a step: the state is about 3x the
parameters) of about `--sizes` of state trains on a fixed batch in one process, in
segments of the same number of batches (about `--segment-seconds`), the modes
interleaved segment by segment, round after round (the order reversed every other
round, so that a drift of the machine's speed falls on every mode alike):

- none: the loop alone, no candle_ckpt call;
- every N: `CandleCkptPyTorch` with `ckpt_save_steps` N and `ckpt_async`, N chosen from
  the loop's batch time measured first so that a save comes every `--every-seconds`
  (the goal of issue 29: at most 3.5 % overhead with a save at least every 5 s at
  100 MB, every 30 s at 1 GB);
- auto: `ckpt_save_steps auto` and `ckpt_async`, with the default budget
  `ckpt_save_overhead` 3.5 %.

Each session trains one epoch per segment: `ckpt_epoch` ends the one before untimed
just before the segment, so the step schedule's batch clock starts with it; epoch ends
are never saved (`ckpt_save_interval` beyond the run). A segment's time is its batches'
and `batch_end` calls' and, at its end, the wait for the save still being written,
which in a longer run the next batches would have overlapped: counting it all makes the
overhead an upper bound.

Reported per size and mode: the segments' training time (median, range); the overhead
of each mode's total time over none's, and of each round's segment over none's in the
same round; the CPU time the process used (every thread) over none's: the work the
saves add, which is what they would cost a training that kept every core busy, and
which other jobs on the machine cannot hide (under load, the writer thread takes its
CPU from them as much as from training, so the wall-time overhead can read low); the
CPU time of the training thread alone over none's (the stalls, and what sharing caches
and memory with the save's threads costs it: what the saves cost a training that has
the other cores to itself); the saves made and the seconds between two saves of one
segment (median and largest, from the time each save's "saved" log record was made,
when its background write ended); for auto, the intervals in batches it logged; the
batch time.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_step_saves.py [--sizes 100MB,1GB]
        [--rounds 3] [--segment-seconds 20,60] [--every-seconds 5,30] [--threads 1]
        [--directory DIR]

`--segment-seconds` and `--every-seconds` give one value per size (or one for all).
"""

import argparse
import itertools
import logging
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pytorch import cpu_seconds, state_bytes
from common import SIZES_MB, directory_argument, footer, header, scratch_directory, summary

MODES = ("none", "every", "auto")


def build(size, seed=0):
    """The model of `size`, its AdamW with one step taken so that the optimizer's state
    exists, and the batch it trains on. A size in MB (`SIZES_MB`): four Linear(w, w)
    layers with about that much state (parameters, exp_avg, exp_avg_sq: 3 x 4 bytes a
    parameter); "transformer" or "deep": `bench_shapes.py`'s model of that name."""
    if size in ("transformer", "deep"):
        import bench_shapes

        if size == "deep":
            model, optimizer = bench_shapes.torch_deep(bench_shapes.DEEP_LAYERS["pytorch"], seed)
            return model, optimizer, torch.randn(32, bench_shapes.DEEP_WIDTH)
        spec = bench_shapes.TRANSFORMERS[size]
        model, optimizer = bench_shapes.torch_transformer(spec, seed)
        return model, optimizer, torch.randn(32, bench_shapes.SEQUENCE, spec[0])
    torch.manual_seed(seed)
    width = int((SIZES_MB[size] * 1e6 / 48) ** 0.5)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(4)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randn(32, width, generator=torch.Generator().manual_seed(seed))
    return model, optimizer, batch


class SaveRecords(logging.Handler):
    """Keeps the time of every save's log record and the intervals `auto` logged."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.saves, self.auto = [], []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("ckpt_save_steps auto: a save every"):
            self.auto.append(int(message.split()[5]))
        elif " saved (" in message and record.name.startswith("candle_ckpt"):
            self.saves.append(time.perf_counter())


def session(root, steps):
    from candle_ckpt import CandleCkptPyTorch

    params = {
        "ckpt_directory": root,
        "epochs": 10**6,
        "ckpt_save_interval": 10**6,  # no epoch-end save inside the run
        "ckpt_save_best": False,
        "ckpt_save_steps": steps,
        "ckpt_async": True,
        "ckpt_restart_mode": "off",
    }
    return CandleCkptPyTorch(params, verbose=False)  # logs to its ckpt.log, as a job does


def measure(size, directory, rounds, segment_seconds, every_seconds):
    """{mode: [segment seconds]}, {mode: [training seconds between saves]}, {mode:
    saves}, auto's logged intervals, the batch time and N, and the state bytes."""
    model, optimizer, batch = build(size)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(batch).square().mean().backward()
        optimizer.step()

    for _ in range(3):  # allocator and AdamW state warm-up
        step()
    started = time.perf_counter()
    for _ in range(5):
        step()
    batch_seconds = (time.perf_counter() - started) / 5
    every = max(1, round(every_seconds / batch_seconds))
    batches = max(every, round(segment_seconds / batch_seconds))

    records = SaveRecords()
    library = logging.getLogger("candle_ckpt")
    library.addHandler(records)
    library.propagate = False
    sessions = {
        "every": session(os.path.join(directory, "every"), every),
        "auto": session(os.path.join(directory, "auto"), "auto"),
    }
    objects = {"model": model, "optimizer": optimizer}
    for ckpt in sessions.values():
        ckpt.set_model(objects)
    epochs = dict.fromkeys(sessions, 0)
    seconds = {mode: [] for mode in MODES}
    cpu = {mode: [] for mode in MODES}
    thread = {mode: [] for mode in MODES}
    between = {mode: [] for mode in MODES}
    saves = dict.fromkeys(MODES, 0)
    try:
        for number in range(rounds):
            for mode in MODES if number % 2 == 0 else MODES[::-1]:
                ckpt = sessions.get(mode)
                if ckpt is not None and epochs[mode]:
                    ckpt.ckpt_epoch(epochs[mode] - 1)  # untimed: the epoch before ends
                del records.saves[:]
                started, cpu_before = time.perf_counter(), cpu_seconds()
                thread_before = time.thread_time()
                for index in range(batches):
                    step()
                    if ckpt is not None:
                        ckpt.batch_end(index)
                if ckpt is not None:
                    ckpt.session.checkpointer.background.wait()
                ended = time.perf_counter()
                seconds[mode].append(ended - started)
                cpu[mode].append(cpu_seconds() - cpu_before)
                thread[mode].append(time.thread_time() - thread_before)
                if ckpt is not None:
                    epochs[mode] += 1
                    saves[mode] += len(records.saves)
                    done = records.saves
                    between[mode] += [b - a for a, b in itertools.pairwise(done)]
    finally:
        for ckpt in sessions.values():
            ckpt.finish()
        library.removeHandler(records)
    return (
        seconds,
        cpu,
        thread,
        between,
        saves,
        records.auto,
        batch_seconds,
        every,
        state_bytes(model, optimizer),
    )


def per_size(values, sizes, name):
    numbers = [float(v) for v in values.split(",")]
    if len(numbers) == 1:
        numbers *= len(sizes)
    if len(numbers) != len(sizes):
        raise SystemExit(f"--{name}: one value per size ({len(sizes)}), or one for all")
    return dict(zip(sizes, numbers))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="100MB,1GB",
        help="MLP state sizes, or the shapes 'transformer' (d=256, 114 MB) and 'deep' "
        "(500 x Linear(64, 64)) of bench_shapes.py",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--segment-seconds", default="20,60")
    parser.add_argument("--every-seconds", default="5,30")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    directory_argument(parser)
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    segment = per_size(args.segment_seconds, sizes, "segment-seconds")
    every = per_size(args.every_seconds, sizes, "every-seconds")
    torch.set_num_threads(args.threads)
    header(f"async step saves against none, PyTorch, {args.threads} training thread(s)")
    directory = scratch_directory(args.directory)
    try:
        for size in sizes:
            seconds, cpu, thread, between, saves, auto, batch_seconds, n, nbytes = measure(
                size, os.path.join(directory, size), args.rounds, segment[size], every[size]
            )
            print(
                f"{size} model, {nbytes / 1e6:.0f} MB state; a batch {batch_seconds:.4f} s; "
                f"every = ckpt_save_steps {n} (a save every {every[size]:g} s of training)"
            )
            base = sum(seconds["none"])
            for mode in MODES:
                line = f"  {mode:5s} segment {summary(seconds[mode])}"
                if mode != "none":
                    overhead = 100 * (sum(seconds[mode]) / base - 1)
                    rounds = ", ".join(
                        f"{100 * (ours / theirs - 1):+.1f}"
                        for ours, theirs in zip(seconds[mode], seconds["none"])
                    )
                    work = 100 * (sum(cpu[mode]) / sum(cpu["none"]) - 1)
                    own = 100 * (sum(thread[mode]) / sum(thread["none"]) - 1)
                    gaps = between[mode] or [float("nan")]
                    line += (
                        f"; overhead {overhead:+.2f} % (by round: {rounds}), CPU {work:+.2f} %, "
                        f"training thread's CPU {own:+.2f} %; "
                        f"{saves[mode]} saves, seconds between saves median "
                        f"{statistics.median(gaps):.2f}, max {max(gaps):.2f}"
                    )
                print(line)
            if auto:
                print(f"  auto logged intervals (batches): {auto}")
            shutil.rmtree(os.path.join(directory, size), ignore_errors=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    footer(args.rounds)


if __name__ == "__main__":
    main()
