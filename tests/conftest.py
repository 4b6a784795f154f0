"""Shared helpers: a plain-file model writer so the core is tested without TensorFlow."""

import os
import zlib

import pytest

from candle_ckpt.core.save.checkpointer import Checkpointer
from candle_ckpt.core.storage.direct_io import write_at


def file_writer(payload=b"weights", name="model.h5"):
    """A write_files function that writes `payload` as the model file."""

    def write_files(directory):
        with open(os.path.join(directory, name), "wb") as stream:
            stream.write(payload)
        return name

    return write_files


@pytest.fixture(autouse=True)
def library_records_reach_caplog(monkeypatch):
    """The `candle_ckpt` logger does not propagate (core/logs.py); caplog listens on the
    root logger, so the tests let it propagate."""
    import logging

    monkeypatch.setattr(logging.getLogger("candle_ckpt"), "propagate", True)
    yield
    logging.getLogger("candle_ckpt").propagate = False


def direct_writer(payload=b"weights", name="model.h5"):
    """A write_files function that lays out a file of `payload`'s size, then writes
    `payload` into it in two halves with `direct_io.write_at`, as the h5 writer does."""

    def write_files(directory):
        path = os.path.join(directory, name)
        with open(path, "wb") as stream:
            stream.truncate(len(payload))
        half = len(payload) // 2
        write_at(path, [(0, memoryview(payload)[:half]), (half, memoryview(payload)[half:])])
        return name

    return write_files


@pytest.fixture
def o_direct():
    """o_direct(directory): whether files there can be opened with O_DIRECT (tmpfs before
    Linux 6.6 and some others refuse it: `direct_io.write_at` then writes through the
    page cache)."""

    def works(directory):
        if not hasattr(os, "O_DIRECT"):
            return False
        probe = os.path.join(directory, ".o_direct_probe")
        open(probe, "wb").close()
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
            return True
        except OSError:
            return False
        finally:
            os.unlink(probe)

    return works


def check_written(written, path, large, o_direct):
    """Assert what `direct_io.write_at` reported writing the file `path`, whose large
    arrays are `large`: the CRC32 of the file's bytes, the arrays' bytes and, where the
    directory takes O_DIRECT (`o_direct`, the fixture), the whole 4 KiB blocks of every
    array written directly, their tails through the page cache. Returns the file's bytes."""
    with open(path, "rb") as stream:
        contents = stream.read()
    assert written.crc32 == zlib.crc32(contents)
    assert written.nbytes == sum(a.nbytes for a in large)
    blocks = sum(a.nbytes - a.nbytes % 4096 for a in large)
    assert written.direct_bytes == (blocks if o_direct(os.path.dirname(path)) else 0)
    return contents


FORMAT2_ONLY_KEYS = (
    "metrics",
    "train_seconds",
    "save_seconds",
    "run_id",
    "run_started",
    "lineage_id",
    "lineage_format1_epoch",
    "init_from",
)


def flip_byte(path, offset=3, mask=0xFF):
    """XOR the byte at `offset` of the file at `path` with `mask`, in place."""
    with open(path, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ mask]))


def reseal(directory, name="model.h5"):
    """Record the file `name` of epoch `directory`, as it is now, in its ckpt-info.json
    (CRC32 and size, `info_crc32` recomputed): what anyone who can write the tree can do
    to a file they crafted."""
    from candle_ckpt.core.format.info import read_info, write_info

    path = os.path.join(directory, name)
    with open(path, "rb") as stream:
        crc = str(zlib.crc32(stream.read()))
    info = read_info(directory)
    if info["model_file"] == name:
        info["checksum"] = crc
    info["files"][name] = {"size": os.path.getsize(path), "crc32": crc}
    write_info(directory, info)


def as_format1(info, epochs_saved):
    """A format_version 1 ckpt-info dict made from a version 2 one, as candle_ckpt
    0.2 wrote it: without the version 2 keys, with the run's `epochs_saved`."""
    old = {key: value for key, value in info.items() if key not in FORMAT2_ONLY_KEYS}
    return {**old, "format_version": 1, "epochs_saved": list(epochs_saved)}


@pytest.fixture
def ckpt_dir(tmp_path):
    return str(tmp_path / "save")


@pytest.fixture
def make_checkpointer(ckpt_dir):
    def make(**params):
        params.setdefault("epochs", 10)
        params.setdefault("ckpt_save_best_metric", "loss")
        params.setdefault("ckpt_directory", ckpt_dir)
        return Checkpointer(params, verbose=False)

    return make


def change_after_its_crc(monkeypatch, path, offset):
    """Make `path` change (64 bytes at `offset`) right after a restart's first CRC32 of
    it, before its second read: the file that verified is not the file read."""
    from candle_ckpt.core.storage import checksum

    real = checksum._mapped_crc32
    done = []

    def crc_then_change(fd, *args):
        value = real(fd, *args)
        if not done and os.path.samefile(f"/proc/self/fd/{fd}", path):
            done.append(True)
            with open(path, "r+b") as stream:
                stream.seek(offset)
                stream.write(b"\xff" * 64)
        return value

    monkeypatch.setattr(checksum, "_mapped_crc32", crc_then_change)
