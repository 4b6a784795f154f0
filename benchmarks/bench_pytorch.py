"""Benchmark 8: PyTorch save, restart and async stall against torch.save / torch.load.

A tiny-compute model with large state (one square Linear layer trained one step with
AdamW, so the state is about 3x the parameters) is saved and restored through the
public API, `CandleCkptPyTorch`, interleaved repetition by repetition with its
baselines measured in the same run:

- save: `ckpt.ckpt_epoch` (snapshot, write, fsync, CRC32, ckpt-info.json, rename,
  links) ÷ `torch.save` of the same state dicts into a new file + fsync of the file and
  its directory (target <= 0.8). Neither deletes during the measurement (no keep
  limit): deleting on this file system (mounted with `discard`) competes with the
  next write on both sides and is measured by bench_prune.py;
- restart: `ckpt.restart()` into a fresh model and optimizer (ckpt-info validation,
  the CRC32 of every byte, every entry checked before the first value changes) ÷
  `torch.load(weights_only=True)` + `load_state_dict` of model and optimizer (target
  <= 1.0). Warm: as the files were just written, a restart right after a save (the
  torch file is then in the page cache, ours only partly: O_DIRECT bypasses it). Cold:
  both files evicted from the page cache first (`posix_fadvise(DONTNEED)`, untimed),
  as on a restart in a new job or on another node;
- the CPU time a synchronous save uses (every thread, mostly the kernel copying into
  the page cache) over its wall time: when training keeps every core busy, an async
  save still takes that CPU from it, so (async - none) / (sync - none) cannot go below
  about this ratio there;
- training, epochs of real steps (forward, backward, AdamW) in cycles of four, as in
  bench_async.py: plain, a synchronous save, an async save, the epoch its write
  overlaps. The stall, what `ckpt_epoch` holds the training thread, async ÷ sync
  (target <= 0.1) and the first async save's over a later one's (target <= 2); what
  each kind of save costs training, from neighbouring epochs of a cycle
  (`common.cycle_costs`), async ÷ sync (target <= 0.25);
- copy_floor: the state copied into aligned snapshot memory alone (`common.copy_floor`),
  the least an async save that copies the state can stall, over the sync stall.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_pytorch.py [--sizes 100MB,1GB] \\
        [--repetitions 5] [--directory DIR] [--quick]

--quick: 100MB only, 3 repetitions, 20 training cycles.
"""

import argparse
import functools
import logging
import os
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    ASYNC_SAVE,
    EPOCHS_PER_CYCLE,
    PLAIN,
    SIZES_MB,
    SYNC_SAVE,
    copy_floor,
    cycle_epochs,
    directory_argument,
    evict,
    footer,
    header,
    interleave,
    kept_cycles,
    ratio_line,
    report_cycles,
    scratch_directory,
    summary,
    timed,
)

from candle_ckpt.core.storage.durable import fsync_dir, fsync_file

# Short epochs: the steps no save touches add noise to the cost of a save, not signal.
# An async save's write that outlasts the epoch after it is waited for, and counted.
EPOCH_SECONDS = {"100MB": 0.4, "1GB": 4.0}
CYCLES = {"100MB": 60, "1GB": 20}


def cpu_seconds():
    """CPU time of this process so far, every thread, user and system (the kernel's
    page-cache writes count as system time of the thread that writes)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build(megabytes, seed=0):
    """A Linear layer of about `megabytes` MB of float32 parameters, AdamW after a step."""
    import torch

    torch.manual_seed(seed)
    width = int((megabytes * 1e6 / 4) ** 0.5)
    model = torch.nn.Linear(width, width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(2, width)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def state_tensors(model, optimizer):
    """The tensors of the model's and the optimizer's state dicts."""
    import torch

    tensors = list(model.state_dict().values())
    tensors += [
        t
        for s in optimizer.state_dict()["state"].values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    ]
    return tensors


def state_bytes(model, optimizer):
    return sum(t.numel() * t.element_size() for t in state_tensors(model, optimizer))


def session(root, model, optimizer, asynchronous=False, keep_limit=2):
    from candle_ckpt import CandleCkptPyTorch

    params = {
        "ckpt_directory": root,
        "epochs": 10**6,
        "ckpt_save_best": False,
        "ckpt_async": asynchronous,
        "ckpt_restart_mode": "auto",
    }
    if keep_limit is not None:
        params["ckpt_keep_limit"] = keep_limit
    ckpt = CandleCkptPyTorch(params, logger=None, verbose=False)
    ckpt.set_model({"model": model, "optimizer": optimizer})
    return ckpt


def restart_into(root, model, optimizer):
    """A verified restart of `model` and `optimizer` from the newest epoch under `root`."""
    restarted = session(root, model, optimizer)
    if restarted.restart(verbose=False) is None:
        raise RuntimeError(f"nothing to restart from in {root}")
    restarted.finish()


def measure(size, repetitions, directory):
    return measure_model(build, SIZES_MB[size], size, repetitions, directory)


def measure_model(build, spec, label, repetitions, directory, cold=True):
    """Save and restart times of `build(spec)`'s model and optimizer, candle_ckpt and
    torch interleaved: (state bytes, saves, restarts), {name: [seconds]} each.

    The restarts go into a second build (`build(spec, seed=1)`), whose state must then
    equal the first's; `cold` adds restarts with both files evicted from the page cache.
    """
    import torch

    logging.getLogger("candle_ckpt").propagate = False
    model, optimizer = build(spec)
    root = os.path.join(directory, "ckpts-" + label)
    baseline_dir = os.path.join(directory, "torch-" + label)
    os.makedirs(baseline_dir)
    ckpt = session(root, model, optimizer, keep_limit=None)
    epochs = iter(range(10**6))
    baseline_files = (os.path.join(baseline_dir, f"state-{k}.pt") for k in range(10**6))

    save_cpu = []

    def candle_save():
        before = cpu_seconds()
        ckpt.ckpt_epoch(next(epochs))
        save_cpu.append(cpu_seconds() - before)

    def torch_save():
        baseline_file = next(baseline_files)
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, baseline_file
        )
        fsync_file(baseline_file)
        fsync_dir(baseline_dir)

    saves = interleave(repetitions, warmup=1, candle_ckpt=candle_save, torch_save=torch_save)
    saves["candle_ckpt_cpu"] = save_cpu[1:]  # the warm-up left out, as for the wall time
    ckpt.finish()

    baseline_file = os.path.join(baseline_dir, f"state-{repetitions}.pt")  # the last
    fresh_model, fresh_optimizer = build(spec, seed=1)

    def candle_restart():
        restart_into(root, fresh_model, fresh_optimizer)

    def torch_restart():
        loaded = torch.load(baseline_file, map_location="cpu", weights_only=True)
        fresh_model.load_state_dict(loaded["model"])
        fresh_optimizer.load_state_dict(loaded["optimizer"])

    restarts = interleave(
        repetitions, warmup=1, candle_ckpt=candle_restart, torch_load=torch_restart
    )
    for _ in range(repetitions if cold else 0):
        for name, function, where in (
            ("candle_ckpt_cold", candle_restart, root),
            ("torch_load_cold", torch_restart, baseline_dir),
        ):
            evict(where)
            restarts.setdefault(name, []).append(timed(function))
    saved, restored = state_tensors(model, optimizer), state_tensors(fresh_model, fresh_optimizer)
    if len(saved) != len(restored) or not all(map(torch.equal, saved, restored)):
        raise RuntimeError("the restarted state differs from the saved one")
    shutil.rmtree(root)
    shutil.rmtree(baseline_dir)
    return state_bytes(model, optimizer), saves, restarts


def training(size, cycles, epoch_seconds, directory, steps=None):
    """Train `cycles` + 2 cycles of four epochs of real steps (common.PHASE_NAMES: plain,
    a synchronous save, an async save, the epoch its write overlaps), the first and the
    last left out (allocator warm-up; the end's wait).

    Returns (per cycle the epoch times by phase, per cycle the seconds the training
    thread waited for its async save at the start of the next, {"sync", "async_first",
    "async_later", "copy_floor": [stall seconds]}, steps per epoch). An epoch is
    `steps` steps, or as many as take about `epoch_seconds` here without checkpointing
    (calibrated on one step); its time includes `ckpt_epoch`. Each session calls
    `restart()` first, as a CANDLE loop does (so `ckpt_async` allocates its snapshot
    there, before the first step).
    """
    import torch

    model, optimizer = build(SIZES_MB[size])
    batch = torch.randn(64, model.in_features, generator=torch.Generator().manual_seed(0))

    def step():
        model(batch).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    steps = steps or max(1, round(epoch_seconds / timed(step)))
    saving = {
        phase: session(os.path.join(directory, name), model, optimizer, phase == ASYNC_SAVE)
        for phase, name in ((SYNC_SAVE, "train-sync"), (ASYNC_SAVE, "train-async"))
    }
    for ckpt in saving.values():
        ckpt.restart(verbose=False)
    background = saving[ASYNC_SAVE].session.checkpointer.background
    epoch_times, waits = [], []
    stalls = {SYNC_SAVE: [], ASYNC_SAVE: []}
    for epoch in range(cycle_epochs(cycles)):
        phase = epoch % EPOCHS_PER_CYCLE
        if phase == PLAIN:
            waits.append(timed(background.wait))
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if phase in saving:
            stalls[phase].append(timed(functools.partial(saving[phase].ckpt_epoch, epoch)))
        epoch_times.append(time.perf_counter() - started)
    for ckpt in saving.values():
        ckpt.finish()
        shutil.rmtree(ckpt.session.settings["ckpt_directory"])
    arrays = [t.detach().numpy() for t in state_tensors(model, optimizer)]
    per_cycle, waits = kept_cycles(epoch_times, waits, cycles)
    stalls = {
        "sync": stalls[SYNC_SAVE],
        "async_first": stalls[ASYNC_SAVE][:1],
        "async_later": stalls[ASYNC_SAVE][1:],
        "copy_floor": copy_floor(arrays, len(stalls[ASYNC_SAVE]) - 1),
    }
    return per_cycle, waits, stalls, steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100MB,1GB")
    parser.add_argument("--repetitions", type=int, default=5)
    directory_argument(parser)
    parser.add_argument(
        "--cycles",
        type=int,
        default=None,
        help="training cycles of 4 epochs (default: 60, 20 at 1GB)",
    )
    parser.add_argument(
        "--epoch-seconds",
        type=float,
        default=None,
        help="training time per epoch without checkpointing, calibrated "
        "(default: 0.4 s at 100MB, 4 s at 1GB)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per epoch (default: calibrated)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="100MB, 3 repetitions, 20 training cycles"
    )
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repetitions, args.cycles = "100MB", 3, 20
    header("PyTorch: save, restart and async stall against torch.save / torch.load")
    directory = scratch_directory(args.directory)
    try:
        for size in args.sizes.split(","):
            nbytes, saves, restarts = measure(size, args.repetitions, directory)
            epoch_seconds = args.epoch_seconds or EPOCH_SECONDS.get(size, 2.0)
            cycles = args.cycles or CYCLES.get(size, 20)
            epoch_times, waits, stalls, steps = training(
                size, cycles, epoch_seconds, directory, args.steps
            )
            print(f"{size} model, {nbytes / 1e6:.0f} MB state; training: {steps} steps per epoch")
            for label, times in (
                ("save", saves),
                ("restart", restarts),
                ("stall", stalls),
            ):
                for name, seconds in times.items():
                    print(f"  {label:7s} {name:12s} {summary(seconds)}")
            print(
                "  "
                + ratio_line(
                    "save candle_ckpt / torch.save+fsync (<= 0.8)",
                    saves["candle_ckpt"],
                    saves["torch_save"],
                )
            )
            print(
                "  "
                + ratio_line(
                    "save CPU (all threads) / wall: what an async save "
                    "takes from training on saturated cores, at least",
                    saves["candle_ckpt_cpu"],
                    saves["candle_ckpt"],
                )
            )
            print(
                "  "
                + ratio_line(
                    "restart candle_ckpt / torch.load+load_state_dict (<= 1.0)",
                    restarts["candle_ckpt"],
                    restarts["torch_load"],
                )
            )
            print(
                "  "
                + ratio_line(
                    "restart cold, both files evicted first (<= 1.0)",
                    restarts["candle_ckpt_cold"],
                    restarts["torch_load_cold"],
                )
            )
            print(
                "  "
                + ratio_line(
                    "stall async later / sync (<= 0.1)", stalls["async_later"], stalls["sync"]
                )
            )
            print(
                "  "
                + ratio_line(
                    "stall async first / later (<= 2)", stalls["async_first"], stalls["async_later"]
                )
            )
            print(
                "  "
                + ratio_line(
                    "stall copy_floor / sync: the least a copying snapshot stalls",
                    stalls["copy_floor"],
                    stalls["sync"],
                )
            )
            report_cycles(epoch_times, waits)
        footer(args.repetitions)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
