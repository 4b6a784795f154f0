"""CRC32: isal and zlib agree, streamed over files of any size."""

import os
import time
import zlib

import pytest

from candle_ckpt.core.storage import checksum


def random_file(tmp_path, size, name="f"):
    """(path, bytes) of a new file `name` in `tmp_path` of `size` random bytes."""
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("size", [0, 1, 4095, checksum.CHUNK_BYTES, checksum.CHUNK_BYTES * 2 + 17])
def test_file_crc_equals_zlib_of_the_bytes(tmp_path, size):
    path, data = random_file(tmp_path, size)
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
        path, data = random_file(tmp_path, size, f"f{size}")
        assert checksum.crc32_file(path) == zlib.crc32(data)


@pytest.mark.parametrize("size", [0, 1, 4095, checksum.CHUNK_BYTES, checksum.CHUNK_BYTES * 2 + 17])
def test_read_file_returns_the_bytes_and_their_crc(tmp_path, size):
    path, data = random_file(tmp_path, size)
    contents, crc = checksum.read_file(path)
    assert bytes(contents) == data and crc == zlib.crc32(data)
    assert contents.readonly
    contents, crc = checksum.read_file(path, compute_crc=False)
    assert bytes(contents) == data and crc is None


def test_read_file_checksums_the_bytes_it_read_when_the_file_shrinks(tmp_path, monkeypatch):
    path, data = random_file(tmp_path, checksum.CHUNK_BYTES * 2)
    real_fstat = os.fstat

    def fstat_then_truncate(fd):  # the file shrinks between open and read
        status = real_fstat(fd)
        os.truncate(path, checksum.CHUNK_BYTES + 5)
        return status

    monkeypatch.setattr(checksum.os, "fstat", fstat_then_truncate)
    contents, crc = checksum.read_file(path)
    assert bytes(contents) == data[: checksum.CHUNK_BYTES + 5]
    assert crc == zlib.crc32(data[: checksum.CHUNK_BYTES + 5])


@pytest.fixture()
def in_place_from_any_size(monkeypatch):
    monkeypatch.setattr(checksum, "IN_PLACE_MIN_BYTES", 0)


def test_read_file_reads_the_regions_into_their_buffers_once_the_file_verifies(
    tmp_path, in_place_from_any_size
):
    size = checksum.CHUNK_BYTES * 2 + 12345
    path, data = random_file(tmp_path, size)
    places = [(4096, 3 * checksum.CHUNK_BYTES // 2), (checksum.CHUNK_BYTES * 2, 4096)]
    buffers = [bytearray(length) for _, length in places]
    contents, crc = checksum.read_file(
        path,
        read_into=checksum.RegionPlanner(
            lambda *_: [(at, buffer) for (at, _), buffer in zip(places, buffers)]
        ),
        expected_crc=zlib.crc32(data),
    )
    assert crc == zlib.crc32(data) and len(contents) == size
    for (at, length), buffer in zip(places, buffers):
        assert bytes(buffer) == data[at : at + length]
        assert bytes(contents[at : at + length]) == bytes(length)  # left unread
    kept = bytearray(contents)
    for at, length in places:
        kept[at : at + length] = data[at : at + length]
    assert bytes(kept) == data


def test_a_file_below_the_planners_own_minimum_is_read_whole_without_planning(
    tmp_path, in_place_from_any_size
):
    path, data = random_file(tmp_path, 4096 * 3)
    planned = []
    planner = checksum.RegionPlanner(lambda *_: planned.append(1) or [], min_file_bytes=4096 * 4)
    contents, crc = checksum.read_file(path, read_into=planner, expected_crc=zlib.crc32(data))
    assert planned == [] and bytes(contents) == data and crc == zlib.crc32(data)
    planner = checksum.RegionPlanner(lambda *_: planned.append(1) or [], min_file_bytes=4096 * 3)
    checksum.read_file(path, read_into=planner, expected_crc=zlib.crc32(data))
    assert planned == [1]


def mappings():
    """{(begin, end): bytes mapped in (Rss)} of every mapping of this process."""
    found, where = {}, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                where = tuple(int(x, 16) for x in first.split("-"))
            elif first == "Rss:":
                found[where] = int(line.split()[1]) * 1024
    return found


def resident_bytes(view):
    """The bytes of the anonymous mapping under `view` that are mapped in."""
    import ctypes

    address = ctypes.addressof(ctypes.c_char.from_buffer(view.obj))
    return next(rss for (b, e), rss in mappings().items() if b <= address < e)


@pytest.mark.parametrize("rest_in_new_memory", [True, False])
def test_read_file_maps_the_memory_in_during_the_first_pass_if_asked_but_not_the_regions(
    tmp_path, in_place_from_any_size, monkeypatch, rest_in_new_memory
):
    size = 8 << 20
    path, data = random_file(tmp_path, size)
    real = checksum._mapped_crc32

    def slow_disk(fd):
        time.sleep(0.5)  # a disk read: time to map all the memory in
        return real(fd)

    monkeypatch.setattr(checksum, "_mapped_crc32", slow_disk)
    buffer = bytearray(4 << 20)
    mapped_in = []
    # an earlier read's memory of the same size may not be freed yet: only new mappings
    earlier = set(mappings())

    def plan(*_):
        mapped_in.extend(
            rss for (b, e), rss in mappings().items() if e - b == size and (b, e) not in earlier
        )
        return [(1 << 20, buffer)]

    contents, crc = checksum.read_file(
        path,
        read_into=checksum.RegionPlanner(plan, rest_in_new_memory),
        expected_crc=zlib.crc32(data),
    )
    assert (size in mapped_in) == rest_in_new_memory  # before the second pass
    assert crc == zlib.crc32(data) and bytes(buffer) == data[1 << 20 : 5 << 20]
    assert bytes(contents[1 << 20 : 5 << 20]) == bytes(4 << 20)
    assert resident_bytes(contents) == size - len(buffer)


def read_recording_plans(path, expected_crc):
    """`read_file` of `path` with a planner that plans nothing but records that it was
    asked: (the planner's calls, contents, crc)."""
    planned = []
    contents, crc = checksum.read_file(
        path,
        read_into=checksum.RegionPlanner(lambda *args: planned.append(args) or []),
        expected_crc=expected_crc,
    )
    return planned, contents, crc


def test_read_file_reads_nothing_into_the_regions_of_a_file_that_fails_its_crc(
    tmp_path, in_place_from_any_size
):
    path, data = random_file(tmp_path, 3 * 4096)
    planned, contents, crc = read_recording_plans(path, expected_crc=zlib.crc32(b"x"))
    assert not planned and bytes(contents) == data and crc == zlib.crc32(data)


def test_read_file_reads_a_small_file_into_new_memory_only(tmp_path):
    path, data = random_file(tmp_path, 3 * 4096)
    planned, contents, crc = read_recording_plans(path, expected_crc=zlib.crc32(data))
    assert not planned and bytes(contents) == data and crc == zlib.crc32(data)


def test_read_file_refuses_overlapping_regions(tmp_path, in_place_from_any_size):
    path, data = random_file(tmp_path, 3 * 4096)
    with pytest.raises(ValueError, match="overlaps"):
        checksum.read_file(
            path,
            read_into=checksum.RegionPlanner(
                lambda *_: [(0, bytearray(4096)), (4095, bytearray(10))]
            ),
            expected_crc=zlib.crc32(data),
        )
