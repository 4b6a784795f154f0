"""The fixed cost of one save: the core protocol with a 4 KiB model file.

`Checkpointer.epoch_end` with keep limit 1 (every save after the first also moves an
epoch into `trash/`, which the collector empties before the next save), no framework:
what the protocol itself costs per save, whatever the model's size (syscalls, fsyncs,
the ckpt-info.json and its schema check). Prints the median milliseconds of a save over
`--saves` saves (the first 20 left out). To compare two versions of the library, run it
alternately with each on PYTHONPATH, several times, and compare the medians:

    PYTHONPATH=. .venv/bin/python benchmarks/bench_core_save.py [--directory DIR] [--saves 520]
"""

import argparse
import logging
import os
import statistics
import tempfile
import time

from candle_ckpt.core.save.checkpointer import Checkpointer


def write_model(directory):
    with open(os.path.join(directory, "model.h5"), "wb") as stream:
        stream.write(b"w" * 4096)
    return "model.h5"


def median_save_seconds(directory, saves):
    with tempfile.TemporaryDirectory(dir=directory) as place:
        params = {
            "ckpt_directory": os.path.join(place, "save"),
            "epochs": 10**6,
            "ckpt_save_best": False,
            "ckpt_keep_limit": 1,
        }
        checkpointer = Checkpointer(params, verbose=False)
        logging.getLogger("candle_ckpt").propagate = False
        checkpointer.start_writing()
        times = []
        for epoch in range(1, saves + 1):
            started = time.perf_counter()
            checkpointer.epoch_end(epoch, {}, write_model)
            times.append(time.perf_counter() - started)
            checkpointer.trash.wait()  # the deletion is not the save's: keep it out
        checkpointer.finish()
    return statistics.median(times[20:])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", default=".", help="where to write (default: here)")
    parser.add_argument("--saves", type=int, default=520)
    args = parser.parse_args()
    print(f"{median_save_seconds(args.directory, args.saves) * 1e3:.3f} ms per save")
