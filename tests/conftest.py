"""Shared helpers: a plain-file model writer so the core is tested without TensorFlow."""

import os

import pytest

from candle_ckpt.core.checkpointer import Checkpointer


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
