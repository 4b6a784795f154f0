"""How long `candle-ckpt list` and `candle-ckpt history` take on trees of many epochs.

    python benchmarks/bench_cli_list.py [--epochs 10000 100000] [--repeat 5] [--keep]

Builds, in a temporary directory, the tree a run of N epochs leaves with the default
keep policy (every epoch kept): tiny model files, each ckpt-info.json exactly as the
library writes it (format 2: its size does not depend on N), and the history file with
the lines the run appends (a start line, then an epoch and a saved line per epoch), and
the list index (ckpts/index.jsonl, a line per saved epoch).
For each N it prints:

- the bytes of ckpt-info.json in the tree, and of it plus the index (target <= 20 MB
  at 10 000 epochs), and what
  format 1 held for the same tree, computed from its per-file size (each file listed
  every epoch so far in `epochs_saved`);
- `candle-ckpt list DIR` and `candle-ckpt history DIR` as subprocesses (what an
  operator waits for: interpreter start, imports, reading, printing), medians;
  `history` twice: without ckpts/history.cache (the first read of a tree, which writes
  it) and with it;
  targets: list <= 0.1 s at 10 000 and <= 1 s at 100 000 epochs, history <= 0.5 s at
  100 000;
- the baseline measured in the same run: a Python interpreter that imports nothing
  (`python -c pass`), and the ratio of each command to it.
"""

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from candle_ckpt.core.format.history import history_line, utc_time  # noqa: E402
from candle_ckpt.core.format.history_cache import cache_path  # noqa: E402
from candle_ckpt.core.format.index import index_line, index_path  # noqa: E402
from candle_ckpt.core.format.info import TIMESTAMP_FORMAT, info_file_bytes, read_info  # noqa: E402
from candle_ckpt.core.format.layout import (  # noqa: E402
    HISTORY_FILE,
    INFO_FILE,
    CheckpointLayout,
)
from candle_ckpt.core.save.checkpointer import Checkpointer  # noqa: E402
from candle_ckpt.core.save.policies import BestMetric  # noqa: E402
from candle_ckpt.core.save.protocol import point_link  # noqa: E402

PAYLOAD = b"weights"
# What `epochs_saved` added to a format 1 file per listed epoch: ",\n  N" with indent 1.
FORMAT1_BYTES_PER_LISTED_EPOCH = len(",\n  ") + 4


def write_payload(directory):
    """The model writer of the benchmark: a 7-byte model.h5."""
    with open(os.path.join(directory, "model.h5"), "wb") as stream:
        stream.write(PAYLOAD)
    return "model.h5"


def template_info(scratch):
    """A ckpt-info dict exactly as the library writes it: a real Checkpointer's 2nd save."""
    checkpointer = Checkpointer(
        {"ckpt_directory": scratch, "epochs": 2, "ckpt_save_best_metric": "val_loss"}, logger=None
    )
    for epoch in (1, 2):
        checkpointer.epoch_end(
            epoch, {"loss": 1.0, "val_loss": 1.0, "accuracy": 0.5}, write_payload
        )
    info = read_info(checkpointer.layout.epoch_dir(2))
    shutil.rmtree(scratch)
    return info


def build_tree(root, epochs):
    """Write the tree and history of an `epochs`-epoch run that kept every epoch.

    Each record is the record of a real save (`template_info`) with the fields that
    change from epoch to epoch replaced, encoded by the library's own `info_file_bytes`;
    each history line by its `history_line`. Returns the layout.
    """
    template = template_info(root + ".template")
    layout = CheckpointLayout(root)
    os.makedirs(layout.epochs)
    best = BestMetric("val_loss", "min")
    run = {
        "run_id": template["run_id"],
        "run_started": template["run_started"],
        "lineage_id": template["lineage_id"],
    }
    lines = [history_line({"kind": "start", **run, "resumed_from": None})]
    infos = []
    for epoch in range(1, epochs + 1):
        # A loss that falls and plateaus with noise, so `best` lags behind `last`.
        loss = 1.0 / epoch**0.5 + 0.05 * ((epoch * 7919) % 13) / 13
        best.update(loss, epoch)
        metrics = {"loss": loss * 0.9, "val_loss": loss, "accuracy": 1.0 - loss / 2}
        info = {
            **template,
            "epoch": epoch,
            "best_metric_last": best.value,
            "epoch_best": best.epoch,
            "metrics": metrics,
            "timestamp": time.strftime(TIMESTAMP_FORMAT),
        }
        directory = layout.epoch_dir(epoch)
        os.mkdir(directory)
        write_payload(directory)
        with open(os.path.join(directory, INFO_FILE), "wb") as stream:
            stream.write(info_file_bytes(info))
        infos.append(info)
        lines.append(
            history_line(
                {
                    "kind": "epoch",
                    "run_id": run["run_id"],
                    "epoch": epoch,
                    "time": utc_time(time.time()),
                    "metrics": metrics,
                    "train_seconds": 1.234567,
                }
            )
        )
        lines.append(
            history_line(
                {
                    "kind": "saved",
                    "run_id": run["run_id"],
                    "epoch": epoch,
                    "reason": "interval",
                    "save_seconds": 0.012345,
                }
            )
        )
    with open(os.path.join(layout.ckpts, HISTORY_FILE), "wb") as stream:
        stream.write(b"".join(lines))
    # The list index as the saves append it, one line per epoch naming its directory's
    # inode (one scandir here, not one per epoch as each save's own)
    with os.scandir(layout.epochs) as entries:
        inodes = {entry.name: entry.inode() for entry in entries}
    with open(index_path(layout.ckpts), "wb") as stream:
        stream.write(
            b"".join(
                index_line(info, inodes[os.path.basename(layout.epoch_dir(info["epoch"]))])
                for info in infos
            )
        )
    point_link(layout, "best", best.epoch)
    point_link(layout, "last", epochs)
    return layout


def timed(function, repeat, before=lambda: None):
    """(median, min, max) wall seconds, and the median CPU seconds of child processes;
    `before()` runs untimed before each run."""
    walls, cpus = [], []
    for _ in range(repeat):
        before()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        function()
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime)
    return statistics.median(walls), min(walls), max(walls), statistics.median(cpus)


def _command(*args):
    # The installed console script when there is one next to this Python, else -m.
    script = os.path.join(os.path.dirname(sys.executable), "candle-ckpt")
    return ([script] if os.path.exists(script) else [sys.executable, "-m", "candle_ckpt"]) + list(
        args
    )


def measure(top, epochs, repeat, bytecode):
    started = time.perf_counter()
    layout = build_tree(os.path.join(top, f"save{epochs}"), epochs)
    sizes = [
        os.path.getsize(os.path.join(layout.epoch_dir(e), INFO_FILE)) for e in layout.list_epochs()
    ]
    format1 = sum(
        size + FORMAT1_BYTES_PER_LISTED_EPOCH * epoch for epoch, size in enumerate(sizes, 1)
    )
    print(
        f"tree: {epochs} epochs built in {time.perf_counter() - started:.1f} s; "
        f"ckpt-info.json: {sum(sizes)} bytes ({sum(sizes) / 1e6:.1f} MB, largest file "
        f"{max(sizes)} bytes); format 1 would hold about {format1 / 1e6:.0f} MB; "
        f"history.jsonl {os.path.getsize(os.path.join(layout.ckpts, HISTORY_FILE))} bytes; "
        f"index.jsonl {os.path.getsize(index_path(layout.ckpts))} bytes (with ckpt-info.json: "
        f"{(sum(sizes) + os.path.getsize(index_path(layout.ckpts))) / 1e6:.1f} MB)"
    )
    # With bytecode caching, in a directory of its own: an installed candle-ckpt has its
    # modules compiled, while PYTHONDONTWRITEBYTECODE (set in some shells and CI) would
    # make every run compile them again (--no-bytecode measures that).
    environment = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    if bytecode:
        environment.pop("PYTHONDONTWRITEBYTECODE", None)
        environment["PYTHONPYCACHEPREFIX"] = os.path.join(top, "pycache")

    def no_history_cache():
        if os.path.exists(cache_path(layout.ckpts)):
            os.unlink(cache_path(layout.ckpts))

    results = {}
    for name, command, before in [
        ("python -c pass", [sys.executable, "-c", "pass"], lambda: None),
        ("list", _command("list", layout.root), lambda: None),
        # What the first `history` of a tree costs: it parses every line and writes
        # ckpts/history.cache, which the next one reads.
        ("history, no cache", _command("history", layout.root), no_history_cache),
        ("history", _command("history", layout.root), lambda: None),
    ]:

        def run(command=command):
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=environment)

        run()  # warm the page cache and the bytecode cache
        results[name] = timed(run, repeat, before)
        wall = results[name]
        print(
            f"  {name}: {' '.join(command)}: wall median {wall[0]:.3f} s (min {wall[1]:.3f}, "
            f"max {wall[2]:.3f}), CPU {wall[3]:.3f} s; "
            f"/ python -c pass = {wall[0] / results['python -c pass'][0]:.1f}"
        )
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the trees and print where")
    parser.add_argument(
        "--no-bytecode",
        action="store_true",
        help="leave PYTHONDONTWRITEBYTECODE as it is (if set: compile every module at each run)",
    )
    args = parser.parse_args(argv)
    top = tempfile.mkdtemp(prefix="bench_cli_list.")
    try:
        load = os.getloadavg()[0]
        for epochs in args.epochs:
            measure(top, epochs, args.repeat, not args.no_bytecode)
        print(
            f"load average before: {load:.2f} on {os.cpu_count()} cores, after: "
            f"{os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M %Z')}; bytecode "
            + ("as the environment says" if args.no_bytecode else "cached")
        )
        print(
            f"reproduce: python benchmarks/bench_cli_list.py --epochs "
            f"{' '.join(map(str, args.epochs))} --repeat {args.repeat}"
            + (" --no-bytecode" if args.no_bytecode else "")
        )
        if args.keep:
            print(f"trees kept in {top}")
    finally:
        if not args.keep:
            shutil.rmtree(top)


if __name__ == "__main__":
    main()
