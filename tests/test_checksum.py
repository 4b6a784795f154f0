"""CRC32: isal and zlib agree, streamed over files of any size."""

import os
import zlib

import pytest

from candle_ckpt import checksum


@pytest.mark.parametrize("size", [0, 1, 4095, checksum.CHUNK_BYTES, checksum.CHUNK_BYTES * 2 + 17])
def test_file_crc_equals_zlib_of_the_bytes(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert checksum.crc32_file(path) == zlib.crc32(data)
    assert checksum.crc32_file(path, crc_function=zlib.crc32) == zlib.crc32(data)


def test_isal_and_zlib_give_identical_values_incl_running_value():
    isal_zlib = pytest.importorskip("isal.isal_zlib")
    data = os.urandom(1 << 20)
    assert isal_zlib.crc32(data) == zlib.crc32(data)
    assert isal_zlib.crc32(data[500:], isal_zlib.crc32(data[:500])) == zlib.crc32(data)
    assert checksum.BACKEND == "isal"


def test_progress_reports_every_chunk(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * (checksum.CHUNK_BYTES + 1))
    seen = []
    checksum.crc32_file(path, progress=seen.append)
    assert seen == [checksum.CHUNK_BYTES, checksum.CHUNK_BYTES + 1]


def test_large_files_are_checksummed_in_two_halves_with_the_same_value(tmp_path, monkeypatch):
    pytest.importorskip("isal.isal_zlib")
    monkeypatch.setattr(checksum, "PARALLEL_MIN_BYTES", 1 << 20)
    for size in (1 << 20, (3 << 20) + 12345, checksum.CHUNK_BYTES * 3 + 1):
        data = os.urandom(size)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        assert checksum.crc32_file(path) == zlib.crc32(data)
