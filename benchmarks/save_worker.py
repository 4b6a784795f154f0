"""A process that saves one model synchronously, again and again, on request.

`bench_direct_write.py --saves` runs one per framework and per version of the library
(PYTHONPATH chooses the version: this tree, or an older commit's extracted by `git
archive`), so that saves of each are interleaved in one run, each process holding its
own model of the same size. It uses only the public API every version has
(`CandleCheckpointCallback`, `CandleCkptPyTorch`) and imports nothing else of the
library at its start, so an older tree runs it too.

    python save_worker.py keras|pytorch STATE_MEGABYTES DIRECTORY

It prints one JSON line when the model is built ({"state_bytes": ...}), then reads one
write path a line from stdin and answers each with one JSON line:

- "chosen": a synchronous save as the library makes it;
- "page cache": the same with every byte of the model file written through the page
  cache, with writeback started as the writes go on, as on a file system that refuses
  O_DIRECT (in a version that writes with O_DIRECT).

The answer: {"seconds": wall time of the save, "cpu": CPU seconds of the process
meanwhile (every thread, user + system), "direct_bytes": bytes written with O_DIRECT
(null in a version from before O_DIRECT)}. After each save, untimed, the worker waits
for its deleted epochs to be gone from trash/ and runs sync(2), so the next save, of
any process, starts on an idle disk.
"""

import itertools
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class WritePath:
    """Forces the page cache for the model file's arrays (as on a file system that
    refuses O_DIRECT), and records the bytes written with O_DIRECT; inert in a version
    from before O_DIRECT."""

    def __init__(self):
        self.page_cache, self.direct_bytes = False, []
        try:
            from candle_ckpt import hdf5
            from candle_ckpt.core.storage import direct_io
        except ImportError:
            self.available = False
            return
        self.available = True
        real_open, real_write_at = direct_io._open_direct, hdf5.write_at

        def open_direct(path):
            return None if self.page_cache else real_open(path)

        def write_at(*args, **kwargs):
            written = real_write_at(*args, **kwargs)
            self.direct_bytes.append(written.direct_bytes)
            return written

        direct_io._open_direct, hdf5.write_at = open_direct, write_at


def keras_saver(megabytes, root):
    from common import build_model, callback_save, quiet_tensorflow, state_bytes

    quiet_tensorflow()
    model = build_model(megabytes / 3)
    return callback_save(model, root), state_bytes(model)


def pytorch_saver(megabytes, root):
    import logging

    from bench_pytorch import build, session, state_bytes

    logging.getLogger("candle_ckpt").propagate = False
    model, optimizer = build(megabytes / 3)
    ckpt = session(root, model, optimizer, keep_limit=2)
    epochs = itertools.count()
    return lambda: ckpt.ckpt_epoch(next(epochs)), state_bytes(model, optimizer)


def wait_for_trash(root, timeout=60.0):
    trash = os.path.join(root, "ckpts", "trash")
    deadline = time.monotonic() + timeout
    while os.path.isdir(trash) and os.listdir(trash) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.sync()


def main():
    framework, megabytes, directory = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    root = os.path.join(directory, f"{framework}-{os.getpid()}")
    path = WritePath()
    save, nbytes = (keras_saver if framework == "keras" else pytorch_saver)(megabytes, root)
    print(json.dumps({"state_bytes": nbytes}), flush=True)
    for line in sys.stdin:
        mode = line.strip()
        if mode == "page cache" and not path.available:
            raise SystemExit("save_worker: this version writes through the page cache only")
        path.page_cache, path.direct_bytes = mode == "page cache", []
        started, before = time.perf_counter(), cpu_seconds()
        save()
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - before
        wait_for_trash(root)
        direct = sum(path.direct_bytes) if path.available else None
        print(json.dumps({"seconds": seconds, "cpu": cpu, "direct_bytes": direct}), flush=True)


if __name__ == "__main__":
    main()
