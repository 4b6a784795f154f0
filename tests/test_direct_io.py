"""`direct_io.write_at`: O_DIRECT where offset and memory are aligned, the page cache for
the rest and where O_DIRECT is refused, and the file's CRC32 computed from memory."""

import errno
import os
import zlib

import numpy as np
import pytest

from candle_ckpt.core.storage import direct_io
from candle_ckpt.core.storage.direct_io import ALIGNMENT, BOUNCE_BYTES, PIECE_BYTES, write_at
from candle_ckpt.core.storage.memory import anonymous_memory

if not hasattr(os, "O_DIRECT"):
    pytest.skip("no O_DIRECT on this platform", allow_module_level=True)


def needs_o_direct(o_direct, directory):
    if not o_direct(directory):
        pytest.skip(f"the file system of {directory} refuses O_DIRECT")


def random_bytes(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def laid_out(path, size, seed=1):
    """A file of `size` bytes of random 'layout' bytes, as h5py leaves one: the regions
    written later overwrite part of it, the rest is what the CRC reads back."""
    with open(path, "wb") as stream:
        stream.write(random_bytes(size, seed))


def aligned_memory(data):
    """`data` copied into page-aligned memory (a snapshot block)."""
    memory = anonymous_memory(len(data))
    view = memoryview(memory)[: len(data)]
    view[:] = data
    return view


def expected_file(path_size, layout_seed, regions):
    contents = bytearray(random_bytes(path_size, layout_seed))
    for offset, data in regions:
        contents[offset : offset + len(data)] = bytes(data)
    return bytes(contents)


def check(path, regions, written, size, direct):
    with open(path, "rb") as stream:
        found = stream.read()
    assert found == expected_file(size, 1, regions)
    assert written.crc32 == zlib.crc32(found)
    assert written.nbytes == sum(len(data) for _, data in regions)
    assert written.direct_bytes == direct


def test_aligned_offset_and_memory_go_direct_and_the_tail_buffered(tmp_path, o_direct):
    needs_o_direct(o_direct, tmp_path)
    path = str(tmp_path / "f")
    size = 3 * PIECE_BYTES
    laid_out(path, size)
    body = PIECE_BYTES + 5 * ALIGNMENT  # more than one piece, in whole blocks
    regions = [
        (ALIGNMENT, aligned_memory(random_bytes(body + 123, 2))),  # a tail of 123 bytes
        (2 * PIECE_BYTES, aligned_memory(random_bytes(ALIGNMENT, 3))),  # no tail
    ]
    written = write_at(path, regions)
    check(path, regions, written, size, direct=body + ALIGNMENT)


def test_unaligned_memory_goes_direct_through_the_bounce_buffer(tmp_path, o_direct):
    needs_o_direct(o_direct, tmp_path)
    path = str(tmp_path / "f")
    size = 4 * BOUNCE_BYTES
    laid_out(path, size)
    data = random_bytes(2 * BOUNCE_BYTES + 3 * ALIGNMENT + 7, 2)
    source = memoryview(bytearray(ALIGNMENT + len(data)))[1 : 1 + len(data)]  # off by one
    source[:] = data
    assert np.frombuffer(source, np.uint8).ctypes.data % ALIGNMENT
    regions = [(0, source)]
    written = write_at(path, regions)
    check(path, regions, written, size, direct=len(data) - 7)


def test_unaligned_offsets_small_and_empty_regions_go_through_the_page_cache(tmp_path):
    path = str(tmp_path / "f")
    size = 20 * ALIGNMENT
    laid_out(path, size)
    regions = [
        (17, aligned_memory(random_bytes(3 * ALIGNMENT, 2))),  # unaligned offset
        (4 * ALIGNMENT, b""),  # empty, between two others
        (4 * ALIGNMENT, aligned_memory(random_bytes(ALIGNMENT - 1, 3))),  # below a block
        (6 * ALIGNMENT + 1, b"x"),
    ]
    progress = []
    written = write_at(path, regions[::-1], progress.append)  # any order
    check(path, regions, written, size, direct=0)
    assert progress[-1] == written.nbytes


def test_many_small_regions_and_a_file_ending_in_layout_bytes(tmp_path, o_direct):
    needs_o_direct(o_direct, tmp_path)
    path = str(tmp_path / "f")
    size = 300 * ALIGNMENT + 999
    laid_out(path, size)
    rng = np.random.default_rng(5)
    regions, offset = [], 0
    while True:
        offset += int(rng.integers(0, 3 * ALIGNMENT))
        length = int(rng.integers(0, 4 * ALIGNMENT))
        if offset + length > size - 500:
            break
        if rng.random() < 0.5:  # half of them on a block boundary
            offset -= offset % ALIGNMENT
            if regions and offset < regions[-1][0] + len(regions[-1][1]):
                offset += ALIGNMENT
        regions.append((offset, aligned_memory(random_bytes(length, offset))))
        offset += length
    assert len(regions) > 20
    written = write_at(path, regions)
    with open(path, "rb") as stream:
        found = stream.read()
    assert found == expected_file(size, 1, regions)
    assert written.crc32 == zlib.crc32(found)
    assert 0 < written.direct_bytes < written.nbytes


def test_without_checksum_nothing_is_computed_and_every_byte_is_written(
    tmp_path, o_direct, monkeypatch
):
    def no_crc_expected(*args):
        raise AssertionError("write_at(checksum=False) started a CRC32")

    monkeypatch.setattr(direct_io, "WrittenFileCrc", no_crc_expected)
    path = str(tmp_path / "f")
    size = 2 * PIECE_BYTES
    laid_out(path, size)
    regions = [
        (0, aligned_memory(random_bytes(PIECE_BYTES + 7, 2))),
        (PIECE_BYTES + 3 * ALIGNMENT, random_bytes(ALIGNMENT + 1, 3)),
    ]
    written = write_at(path, regions, checksum=False)
    with open(path, "rb") as stream:
        assert stream.read() == expected_file(size, 1, regions)
    assert written.crc32 is None
    assert written.nbytes == sum(len(data) for _, data in regions)


def test_page_cache_bytes_only_reach_progress(tmp_path, o_direct):
    needs_o_direct(o_direct, tmp_path)
    path = str(tmp_path / "f")
    laid_out(path, 4 * PIECE_BYTES)
    progress = []
    written = write_at(
        path, [(0, aligned_memory(random_bytes(2 * PIECE_BYTES + 10, 2)))], progress.append
    )
    assert written.direct_bytes == 2 * PIECE_BYTES
    assert progress == [10]


def refuse_direct_open(monkeypatch):
    real_open = os.open

    def open_without_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", open_without_direct)


def test_a_file_system_refusing_o_direct_gets_every_byte_through_the_page_cache(
    tmp_path, monkeypatch
):
    refuse_direct_open(monkeypatch)
    path = str(tmp_path / "f")
    size = 3 * PIECE_BYTES
    laid_out(path, size)
    regions = [(0, aligned_memory(random_bytes(PIECE_BYTES + 77, 2)))]
    progress = []
    written = write_at(path, regions, progress.append)
    check(path, regions, written, size, direct=0)
    assert progress == [PIECE_BYTES, PIECE_BYTES + 77]


def route_direct_writes(monkeypatch, write):
    """Send every pwrite to a descriptor opened with O_DIRECT to `write(real_pwrite, fd,
    data, offset)`; return the list of those writes' offsets, filled as they happen."""
    direct_fds, offsets = set(), []
    real_open, real_pwrite = os.open, os.pwrite

    def recording_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def routed_pwrite(fd, data, offset):
        if fd not in direct_fds:
            return real_pwrite(fd, data, offset)
        offsets.append(offset)
        return write(real_pwrite, fd, data, offset)

    monkeypatch.setattr(direct_io.os, "open", recording_open)
    monkeypatch.setattr(direct_io.os, "pwrite", routed_pwrite)
    return offsets


def test_o_direct_refused_at_the_first_write_falls_back_for_the_rest(tmp_path, monkeypatch):
    """Some file systems accept the O_DIRECT open, then refuse a write (EINVAL)."""

    def refusing_pwrite(real_pwrite, fd, data, offset):
        raise OSError(errno.EINVAL, "Invalid argument")

    direct_calls = route_direct_writes(monkeypatch, refusing_pwrite)
    path = str(tmp_path / "f")
    size = 3 * PIECE_BYTES
    laid_out(path, size)
    regions = [
        (0, aligned_memory(random_bytes(PIECE_BYTES, 2))),
        (2 * PIECE_BYTES, aligned_memory(random_bytes(ALIGNMENT, 3))),
    ]
    written = write_at(path, regions)
    check(path, regions, written, size, direct=0)
    assert direct_calls == [0]


def unaligned_copy(data):
    """`data` in memory one byte past a page boundary (a live tensor's is 64)."""
    source = memoryview(bytearray(ALIGNMENT + len(data)))
    start = 1 + (-np.frombuffer(source, np.uint8).ctypes.data) % ALIGNMENT
    source = source[start : start + len(data)]
    source[:] = data
    return source


@pytest.mark.parametrize("count", [0, ALIGNMENT, None], ids=["refused", "short", "error"])
def test_a_bounced_write_refused_or_short_mid_array_leaves_the_rest_to_the_page_cache(
    tmp_path, monkeypatch, o_direct, count
):
    """The third bounced piece's O_DIRECT write is refused (EINVAL), written in part, or
    fails (EIO): the rest goes through the page cache (the file as asked, the CRC32 its
    own), or the error is raised naming the file; no O_DIRECT write follows."""
    needs_o_direct(o_direct, tmp_path)

    def failing_pwrite(real_pwrite, fd, data, offset):
        if len(direct_calls) == 3:
            if count is None:
                raise OSError(errno.EIO, "Input/output error")
            if count == 0:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_pwrite(fd, memoryview(data)[:count], offset)
        return real_pwrite(fd, data, offset)

    direct_calls = route_direct_writes(monkeypatch, failing_pwrite)
    path = str(tmp_path / "f")
    size = 6 * BOUNCE_BYTES
    laid_out(path, size)
    regions = [(ALIGNMENT, unaligned_copy(random_bytes(4 * BOUNCE_BYTES + 5 * ALIGNMENT, 2)))]
    if count is None:
        with pytest.raises(OSError) as raised:
            write_at(path, regions)
        assert raised.value.errno == errno.EIO and raised.value.filename == path
        return
    written = write_at(path, regions)
    check(path, regions, written, size, direct=2 * BOUNCE_BYTES + count)
    assert direct_calls == [ALIGNMENT + k * BOUNCE_BYTES for k in range(3)]


def test_other_write_errors_are_raised_naming_the_file(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io.os, "pwrite", full)
    path = str(tmp_path / "f")
    laid_out(path, 4 * ALIGNMENT)
    for source in (aligned_memory(random_bytes(2 * ALIGNMENT)), random_bytes(2 * ALIGNMENT)):
        with pytest.raises(OSError) as raised:
            write_at(path, [(0, source)])
        assert raised.value.errno == errno.ENOSPC and raised.value.filename == path


def test_overlapping_regions_and_regions_past_the_end_are_refused(tmp_path):
    path = str(tmp_path / "f")
    laid_out(path, 4 * ALIGNMENT)
    with pytest.raises(ValueError, match="overlaps the one before, which ends at 4096"):
        write_at(path, [(0, random_bytes(ALIGNMENT)), (ALIGNMENT - 1, b"ab")])
    with pytest.raises(ValueError, match="ends past the end of the file"):
        write_at(path, [(3 * ALIGNMENT, random_bytes(ALIGNMENT + 1))])


def test_copy_into_copies_in_halves_and_falls_back_for_strided_arrays():
    source = np.random.default_rng(3).standard_normal((3, direct_io.PARALLEL_COPY_BYTES // 8 + 5))
    target = np.zeros_like(source)
    direct_io.copy_into(target, source)
    assert np.array_equal(target, source)
    strided = np.zeros((source.shape[1], 3)).T  # not C-contiguous
    direct_io.copy_into(strided, source)
    assert np.array_equal(strided, source)
    small = np.arange(10.0)
    direct_io.copy_into(target[0, :10], small)
    assert np.array_equal(target[0, :10], small)
