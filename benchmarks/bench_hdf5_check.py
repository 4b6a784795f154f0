"""What the model file check costs a restart (candle_ckpt/hdf5_check.py).

A PyTorch model of the given size of parameters (one square Linear layer trained one
step with AdamW, as bench_pytorch.py: the state is about 3x that) is saved once; then
`ckpt.restart()` into fresh objects is timed, repetition by repetition, with the check
as it is and with the check reduced to its superblock test (no checker process), in
alternation, each restart starting its own checker process, as a job's one restart
does. Printed: the median of each, their difference, and the check alone
(`hdf5_check.check` on the file's bytes, checker included), beside the process's
resident memory.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_hdf5_check.py [--sizes 100MB,1GB] \\
        [--repetitions 5] [--directory DIR]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import SIZES_MB  # noqa: E402

import candle_ckpt  # noqa: E402
from candle_ckpt import hdf5_check  # noqa: E402


def objects(megabytes, seed):
    side = int((megabytes * 1e6 / 4) ** 0.5)
    torch.manual_seed(seed)
    model = torch.nn.Linear(side, side, bias=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, side)).sum().backward()
    optimizer.step()
    return {"model": model, "optimizer": optimizer}


def superblock_only(contents, path):
    hdf5_check._check_superblock(memoryview(contents).cast("B"), path)


def stop_checker():
    """End the checker process a check kept, so that the next check starts one."""
    checker = hdf5_check._checker
    if checker is not None:
        checker.kill()
        checker.wait()
        hdf5_check._checker = None


def resident_bytes():
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(size, repetitions, directory):
    params = {"ckpt_directory": os.path.join(directory, f"save{size}"), "epochs": 1}
    saver = candle_ckpt.CandleCkptPyTorch(params, logger=None, verbose=False)
    saver.set_model(objects(SIZES_MB[size], 0))
    saver.ckpt_epoch(0, {"val_loss": 1.0})
    saver.finish()
    model_file = os.path.join(params["ckpt_directory"], "ckpts", "epochs", "001", "model.h5")
    with open(model_file, "rb") as stream:
        contents = stream.read()
    fresh = objects(SIZES_MB[size], 1)
    real_check = hdf5_check.check
    times = {"check": [], "superblock only": [], "check alone": []}
    for _ in range(repetitions):
        for label, check in (("check", real_check), ("superblock only", superblock_only)):
            hdf5_check.check = check
            stop_checker()  # a job restarts once: its checker process starts then
            ckpt = candle_ckpt.CandleCkptPyTorch(params, logger=None, verbose=False)
            ckpt.set_model(fresh)
            started = time.perf_counter()
            ckpt.restart(verbose=False)
            times[label].append(time.perf_counter() - started)
        hdf5_check.check = real_check
        stop_checker()
        started = time.perf_counter()
        real_check(contents, model_file)
        times["check alone"].append(time.perf_counter() - started)
    medians = {label: statistics.median(values) for label, values in times.items()}
    print(
        f"{len(contents) / 1e6:.0f} MB model file, {resident_bytes() / 1e9:.2f} GB resident: "
        f"restart {medians['check']:.3f} s with the check, "
        f"{medians['superblock only']:.3f} s with the superblock test only "
        f"(+{medians['check'] - medians['superblock only']:.3f} s, "
        f"{medians['check'] / medians['superblock only']:.2f}x); "
        f"the check alone {medians['check alone']:.3f} s"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100MB,1GB")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(" ".join(sys.argv))
    with tempfile.TemporaryDirectory(dir=args.directory) as directory:
        for size in args.sizes.split(","):
            measure(size, args.repetitions, directory)


if __name__ == "__main__":
    main()
