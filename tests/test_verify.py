"""Verifying an epoch directory, and keeping the verified bytes of the model file."""

import os

import pytest
from conftest import file_writer

from candle_ckpt.core.errors import ChecksumMismatchError, CorruptCheckpointError
from candle_ckpt.core.format.info import read_info
from candle_ckpt.core.format.layout import CheckpointLayout
from candle_ckpt.core.restore import verify

PAYLOAD = os.urandom(100_000)


@pytest.fixture
def epoch_dir(make_checkpointer, ckpt_dir):
    make_checkpointer(epochs=1).epoch_end(1, {"loss": 1.0}, file_writer(PAYLOAD))
    return CheckpointLayout(ckpt_dir).epoch_dir(1)


def test_the_kept_file_holds_exactly_the_verified_bytes(epoch_dir):
    results = verify.verify_files(epoch_dir, read_info(epoch_dir), hold_contents_of="model.h5")
    (model,) = results
    assert model.problem is None and model.actual_crc32 == model.expected_crc32
    assert bytes(model.contents) == PAYLOAD and model.contents.readonly
    assert verify.verify_files(epoch_dir, read_info(epoch_dir))[0].contents is None


def test_a_kept_file_with_a_flipped_byte_is_refused(epoch_dir):
    path = os.path.join(epoch_dir, "model.h5")
    with open(path, "r+b") as stream:
        stream.seek(5000)
        stream.write(bytes([PAYLOAD[5000] ^ 1]))
    with pytest.raises(ChecksumMismatchError, match="model.h5"):
        verify.verify_files(epoch_dir, read_info(epoch_dir), hold_contents_of="model.h5")


def test_a_kept_file_that_shrinks_while_it_is_read_is_refused(epoch_dir, monkeypatch):
    real_read_file = verify.read_file

    def shrink_then_read(path, compute_crc, **in_place):
        os.truncate(path, 4096)
        return real_read_file(path, compute_crc=compute_crc, **in_place)

    monkeypatch.setattr(verify, "read_file", shrink_then_read)
    with pytest.raises(
        CorruptCheckpointError, match=r"model.h5: size 4096 bytes, ckpt-info.json records 100000"
    ):
        verify.verify_files(epoch_dir, read_info(epoch_dir), hold_contents_of="model.h5")
