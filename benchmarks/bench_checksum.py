"""Benchmark 2: CRC32 throughput of the library on a saved model file, vs zlib.

Writes a model.h5 of the given size with the library's writer, reads it once so it is
in the page cache (as right after a save), then times `checksum.crc32_file` (isal over
an mmap, 8 MiB slices) against `zlib.crc32` over the same mmap and against reading the
file in 8 MiB chunks into zlib, interleaved.

    .venv/bin/python benchmarks/bench_checksum.py [--megabytes 300] [--repetitions 9]
"""

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import header, interleave, summary


def zlib_over_reads(path):
    value = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(8 << 20):
            value = zlib.crc32(chunk, value)
    return value


def zlib_over_mmap(path):
    with open(path, "rb") as stream, \
            mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
        return zlib.crc32(mapping)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=300)
    parser.add_argument("--repetitions", type=int, default=9)
    args = parser.parse_args()
    from candle_ckpt.core import checksum
    header(f"CRC32 throughput, {args.megabytes} MB file in page cache, backend {checksum.BACKEND}")
    os.makedirs("save", exist_ok=True)
    with tempfile.NamedTemporaryFile(dir="save", suffix=".bin") as handle:
        block = os.urandom(1 << 20)
        for _ in range(args.megabytes):
            handle.write(block)
        handle.flush()
        path = handle.name
        expected = zlib_over_reads(path)
        assert checksum.crc32_file(path) == zlib_over_mmap(path) == expected
        times = interleave(args.repetitions,
                           library=lambda: checksum.crc32_file(path),
                           zlib_mmap=lambda: zlib_over_mmap(path),
                           zlib_reads=lambda: zlib_over_reads(path))
    gib = args.megabytes * (1 << 20) / (1 << 30)
    for name, seconds in times.items():
        print(f"  {name:11s} {gib / statistics.median(seconds):6.1f} GiB/s  {summary(seconds)}")
    speedup = statistics.median(times["zlib_mmap"]) / statistics.median(times["library"])
    print(f"  library / zlib over mmap: {speedup:.2f}x faster")


if __name__ == "__main__":
    main()
