"""Benchmark: writing a model file's bulk with O_DIRECT against the page cache.

A file of the given size is laid out (truncated to size, as h5py leaves the space of
its large datasets) and its whole content written and fsynced, interleaved repetition
by repetition, each way timed for wall time and for the CPU time of the process (all
threads, user + system: what a background save takes from training on busy cores):

- buffered: `os.pwrite` of PIECE_BYTES pieces through the page cache, then fsync (what
  `direct_io.write_at` did before O_DIRECT, and still does where it is refused);
- direct: `direct_io.write_at` from page-aligned memory (a snapshot): O_DIRECT from
  the memory itself, the CRC32 from memory in the CRC thread, then fsync;
- bounce: `direct_io.write_at` from memory off a page boundary (a live tensor, a sync
  save): copied BOUNCE_BYTES at a time into an aligned buffer, written from there;
- bounce-<N>MiB (`--bounce-mib`): the same with another bounce buffer size;
- buffered+crc32_file, the baseline of the ratios: buffered, then the CRC32 read back
  from the file (`checksum.crc32_file`), as the save path did before O_DIRECT.

Then, copy into a snapshot: a copy of the same size from numpy's memory into reused
page-aligned huge-page memory, `np.copyto` (one thread) against `direct_io.copy_into`
(two threads from PARALLEL_COPY_BYTES on): the snapshot's part of an async save's stall.

These are the measurements the comments of core/storage/direct_io.py refer to.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_direct_write.py [--megabytes 100,1000]
        [--repetitions 5] [--bounce-mib 8] [--directory DIR]
"""

import argparse
import os
import resource
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import header, interleave, ratio_line, scratch_directory, summary

from candle_ckpt.core.storage import direct_io
from candle_ckpt.core.storage.checksum import crc32_file
from candle_ckpt.core.storage.durable import fsync_file
from candle_ckpt.core.storage.memory import anonymous_memory


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def laid_out(path, size):
    with open(path, "wb") as stream:
        stream.truncate(size)


def buffered(path, source, with_crc=False):
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in range(0, len(source), direct_io.PIECE_BYTES):
            os.pwrite(fd, source[offset : offset + direct_io.PIECE_BYTES], offset)
    finally:
        os.close(fd)
    fsync_file(path)
    if with_crc:
        crc32_file(path)


def through_write_at(path, source):
    written = direct_io.write_at(path, [(0, source)])
    fsync_file(path)
    return written


def measure(megabytes, directory, repetitions, bounce_mib):
    """{name: [wall seconds]}, {name: [CPU seconds]} of every way, interleaved."""
    size = megabytes * 10**6
    memory = anonymous_memory(size + direct_io.ALIGNMENT)
    whole = memoryview(memory)
    whole[:] = os.urandom(len(whole))
    aligned = whole[:size]
    unaligned = whole[64 : 64 + size]  # where a CPU allocator's tensor may start
    path = os.path.join(directory, "model.h5")
    candidates = {
        "buffered": lambda: buffered(path, aligned),
        "buffered+crc32_file": lambda: buffered(path, aligned, with_crc=True),
        "direct": lambda: through_write_at(path, aligned),
        "bounce": lambda: through_write_at(path, unaligned),
    }
    if bounce_mib:

        def bounce_other():
            default, direct_io.BOUNCE_BYTES = direct_io.BOUNCE_BYTES, bounce_mib << 20
            try:
                through_write_at(path, unaligned)
            finally:
                direct_io.BOUNCE_BYTES = default

        candidates[f"bounce-{bounce_mib}MiB"] = bounce_other
    wall = {name: [] for name in candidates}
    cpu = {name: [] for name in candidates}
    for repetition in range(repetitions + 1):  # the first is a warm-up
        for name, function in candidates.items():
            if os.path.exists(path):
                os.unlink(path)
            laid_out(path, size)
            started, before = time.perf_counter(), cpu_seconds()
            function()
            if repetition:
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(cpu_seconds() - before)
    return wall, cpu


def measure_copy(megabytes, repetitions):
    import numpy as np

    source = np.random.default_rng(0).integers(0, 256, megabytes * 10**6, dtype=np.uint8)
    target = np.frombuffer(anonymous_memory(source.nbytes), np.uint8)
    np.copyto(target, source)  # fault the pages in, as a reused snapshot has them
    return interleave(
        repetitions,
        warmup=1,
        np_copyto=lambda: np.copyto(target, source),
        copy_into=lambda: direct_io.copy_into(target, source),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", default="100,1000")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--bounce-mib", type=int, default=None)
    parser.add_argument("--directory", default=None)
    args = parser.parse_args()
    header("O_DIRECT model-file writes against the page cache (write + fsync)")
    directory = scratch_directory(args.directory)
    try:
        for megabytes in (int(m) for m in args.megabytes.split(",")):
            wall, cpu = measure(megabytes, directory, args.repetitions, args.bounce_mib)
            print(f"{megabytes} MB, page-aligned source for direct, +64 bytes for bounce")
            for name in wall:
                print(f"  {name:20s} wall {summary(wall[name])}")
                print(f"  {name:20s} CPU  {summary(cpu[name])}")
            base = statistics.median(wall["buffered+crc32_file"])
            for name in wall:
                print(
                    f"  {name} / buffered+crc32_file: wall ratio "
                    f"{statistics.median(wall[name]) / base:.3f}, CPU/wall "
                    f"{statistics.median(cpu[name]) / statistics.median(wall[name]):.3f}"
                )
            copies = measure_copy(megabytes, 3 * args.repetitions)
            print(f"{megabytes} MB copy into a snapshot")
            for name, seconds in copies.items():
                print(f"  {name:20s} {summary(seconds)}")
            print(
                "  " + ratio_line("copy_into / np.copyto", copies["copy_into"], copies["np_copyto"])
            )
    finally:
        shutil.rmtree(directory)
    load = os.getloadavg()
    print(f"# load average {load} at {time.strftime('%H:%M')}")


if __name__ == "__main__":
    main()
