"""Benchmark 2: CRC32 throughput of the library on a file in the page cache, vs zlib.

Writes a file of the given size, reads it once so it is in the page cache (as right
after a save), then times, interleaved:

- the CRC of a file (`checksum.crc32_file`, the save path): the library (isal over an
  mmap in CHUNK_BYTES slices, both halves at once from PARALLEL_MIN_BYTES), the library
  in one thread, `zlib.crc32` over the same mmap, and reading the file in 8 MiB chunks
  into zlib;
- reading a file whole (`checksum.read_file`, the restart path): with the CRC computed
  alongside, without it, and reading into a bytearray instead of the page-aligned
  anonymous memory of `memory.anonymous_memory`.

These are the measurements the comments of core/storage/checksum.py and core/storage/direct_io.py
refer to. `--chunk-mib` times the library with another slice size as well.

    .venv/bin/python benchmarks/bench_checksum.py [--megabytes 300] [--repetitions 9]
        [--chunk-mib 2]
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
    with (
        open(path, "rb") as stream,
        mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapping,
    ):
        return zlib.crc32(mapping)


def read_into_bytearray(path):
    size = os.path.getsize(path)
    buffer = bytearray(size)
    with open(path, "rb", buffering=0) as stream:
        view = memoryview(buffer)
        filled = 0
        while filled < size and (count := stream.readinto(view[filled : filled + (8 << 20)])):
            filled += count
    return buffer


def with_chunk_bytes(checksum, chunk_bytes, function):
    """`function` run with checksum.CHUNK_BYTES set to `chunk_bytes`."""

    def run():
        default, checksum.CHUNK_BYTES = checksum.CHUNK_BYTES, chunk_bytes
        try:
            return function()
        finally:
            checksum.CHUNK_BYTES = default

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=300)
    parser.add_argument("--repetitions", type=int, default=9)
    parser.add_argument(
        "--chunk-mib",
        type=int,
        default=None,
        help="also time the library with slices of this many MiB",
    )
    args = parser.parse_args()
    from candle_ckpt.core.storage import checksum

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
        assert checksum.read_file(path)[1] == expected
        cases = {
            "library": lambda: checksum.crc32_file(path),
            # an explicit CRC function turns the two-halves path off
            "library_one_thread": lambda: checksum.crc32_file(path, crc_function=checksum.crc32),
            "zlib_mmap": lambda: zlib_over_mmap(path),
            "zlib_reads": lambda: zlib_over_reads(path),
            "read_and_crc": lambda: checksum.read_file(path),
            "read_only": lambda: checksum.read_file(path, compute_crc=False),
            "read_bytearray": lambda: read_into_bytearray(path),
        }
        if args.chunk_mib:
            cases[f"library_{args.chunk_mib}MiB"] = with_chunk_bytes(
                checksum, args.chunk_mib << 20, cases["library"]
            )
        times = interleave(args.repetitions, **cases)
    gib = args.megabytes * (1 << 20) / (1 << 30)
    width = max(map(len, times))
    for name, seconds in times.items():
        print(
            f"  {name:{width}s} {gib / statistics.median(seconds):6.1f} GiB/s  {summary(seconds)}"
        )

    def ratio(candidate, baseline):
        return statistics.median(times[baseline]) / statistics.median(times[candidate])

    print(f"  library / zlib over mmap: {ratio('library', 'zlib_mmap'):.2f}x faster")
    print(f"  two halves / one thread: {ratio('library', 'library_one_thread'):.2f}x faster")
    print(
        f"  read_file: the CRC adds {1 / ratio('read_and_crc', 'read_only') - 1:+.0%} "
        f"to the read alone"
    )
    print(f"  aligned memory / bytearray: {ratio('read_only', 'read_bytearray'):.2f}x faster")
    if args.chunk_mib:
        print(
            f"  {checksum.CHUNK_BYTES >> 20} MiB slices / {args.chunk_mib} MiB: "
            f"{ratio('library', f'library_{args.chunk_mib}MiB'):.2f}x faster"
        )


if __name__ == "__main__":
    main()
