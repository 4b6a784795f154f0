"""Bytes flipped in the checkpoint `last` names: restart refuses, or falls back when asked.

Each flip XORs one byte at a random offset with a random non-zero mask, restarts,
checks the outcome and puts the byte back.
"""

import json
import logging
import os
import random
import re

import numpy as np
import pytest
from test_keras_restart import fit, params_for, tiny_model

import candle_ckpt
from candle_ckpt.core.format.layout import CheckpointLayout

keras = pytest.importorskip("keras")

pytestmark = pytest.mark.slow

MODEL_FLIPS = 100
INFO_FLIPS = 400
NAMES_A_PLACE = re.compile(r"key '[^']+'|line \d+ column \d+|position \d+")


def state(model):
    """Every weight and optimizer variable, copied."""
    return [np.array(v.numpy()) for v in model.weights + model.optimizer.variables]


def assert_untouched(model, before):
    for a, b in zip(before, state(model)):
        assert np.array_equal(a, b)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tree with epochs 1-3 of the tiny model; last -> epochs/003."""
    params = params_for(tmp_path_factory.mktemp("corruption"), ckpt_save_best=False)
    fit(tiny_model(), {**params, "epochs": 3}, 3)
    return params


class Flipper:
    """Flips one byte of a file and puts it back."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as stream:
            self.original = stream.read()

    def flip(self, offset, mask):
        data = bytearray(self.original)
        data[offset] ^= mask
        with open(self.path, "wb") as stream:
            stream.write(data)

    def restore(self):
        with open(self.path, "wb") as stream:
            stream.write(self.original)


def epoch_file(params, epoch, name):
    return os.path.join(CheckpointLayout(params["ckpt_directory"]).epoch_dir(epoch), name)


def test_every_byte_flip_in_model_h5_is_refused_naming_the_file(trained):
    flipper = Flipper(epoch_file(trained, 3, "model.h5"))
    model, rng = tiny_model(seed=7), random.Random(1)
    before = state(model)
    try:
        for _ in range(MODEL_FLIPS):
            flipper.flip(rng.randrange(len(flipper.original)), rng.randrange(1, 256))
            with pytest.raises(candle_ckpt.ChecksumMismatchError) as raised:
                candle_ckpt.restart(trained, model, verbose=False)
            assert raised.value.path == flipper.path
            assert flipper.path in str(raised.value)
            assert_untouched(model, before)
    finally:
        flipper.restore()


def test_every_byte_flip_in_ckpt_info_json_is_refused_naming_the_file_and_the_place(trained):
    """A flip that leaves the parsed content identical ('1e-05' -> '1E-05', one blank
    for another) is harmless and restarts; every other one is refused."""
    flipper = Flipper(epoch_file(trained, 3, "ckpt-info.json"))
    original = json.loads(flipper.original)
    model, rng = tiny_model(seed=7), random.Random(2)
    before, refused, harmless = state(model), 0, 0
    try:
        for _ in range(INFO_FLIPS):
            flipper.flip(rng.randrange(len(flipper.original)), rng.randrange(1, 256))
            try:
                info = candle_ckpt.restart(trained, model, verbose=False)
            except candle_ckpt.CheckpointFormatError as error:
                refused += 1
                assert flipper.path in str(error) and NAMES_A_PLACE.search(str(error)), error
                assert_untouched(model, before)
            else:
                harmless += 1
                with open(flipper.path, "rb") as stream:
                    assert json.loads(stream.read()) == original
                assert info["epoch"] == 3
                before = state(model)
    finally:
        flipper.restore()
    print(
        f"{INFO_FLIPS} flips of ckpt-info.json: {refused} refused, {harmless} left the "
        f"content identical"
    )
    assert refused + harmless == INFO_FLIPS and refused > 0.95 * INFO_FLIPS


def test_a_changed_value_that_still_parses_is_refused(trained):
    """time_elapsed one second more: valid JSON, valid by the schema, but not what was written."""
    path = epoch_file(trained, 3, "ckpt-info.json")
    flipper = Flipper(path)
    info = json.loads(flipper.original)
    try:
        with open(path, "w") as stream:
            json.dump({**info, "time_elapsed": info["time_elapsed"] + 1}, stream, indent=1)
        with pytest.raises(
            candle_ckpt.CheckpointFormatError,
            match=r"ckpt-info.json: key 'info_crc32' is '\d+' but",
        ):
            candle_ckpt.restart(trained, tiny_model(seed=7), verbose=False)
    finally:
        flipper.restore()


def test_fallback_skips_corrupt_epochs_loudly_and_training_goes_on(trained, caplog):
    """ckpt_restart_fallback: last (3) has a bad model.h5, 2 a bad ckpt-info.json: 1 loads."""
    flips = [
        Flipper(epoch_file(trained, 3, "model.h5")),
        Flipper(epoch_file(trained, 2, "ckpt-info.json")),
    ]
    flips[0].flip(len(flips[0].original) // 2, 0x01)
    flips[1].flip(3, 0xFF)
    params = {**trained, "ckpt_restart_fallback": True}
    try:
        with pytest.raises(candle_ckpt.ChecksumMismatchError):
            candle_ckpt.restart(trained, tiny_model(seed=7), verbose=False)
        caplog.clear()  # that refusal's own "RESTART REFUSED" record
        with caplog.at_level(logging.ERROR, logger="candle_ckpt"):
            info = candle_ckpt.restart(params, tiny_model(seed=7), verbose=False)
        assert info["epoch"] == 1
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors[0].startswith("CHECKPOINT OF EPOCH 3 IS UNUSABLE: checksum mismatch in")
        assert "skipping epoch 2 as well" in errors[1] and "not UTF-8" in errors[1]
        assert errors[2].startswith("FALLING BACK to epoch 1")

        flips[0].flip(len(flips[0].original) // 2, 0x01)
        flips.append(Flipper(epoch_file(trained, 1, "model.h5")))
        flips[2].flip(100, 0x80)
        model = tiny_model(seed=7)
        before = state(model)
        with pytest.raises(candle_ckpt.CheckpointError, match=r"no earlier epoch verifies"):
            candle_ckpt.restart(params, model, verbose=False)
        assert_untouched(model, before)
    finally:
        for flipper in flips:
            flipper.restore()


def test_after_a_fallback_training_rewrites_the_skipped_epochs(tmp_path):
    params = params_for(tmp_path, epochs=3, ckpt_restart_fallback=True)
    fit(tiny_model(), params, 3)
    Flipper(epoch_file(params, 3, "model.h5")).flip(200, 0x40)
    model = tiny_model(seed=7)
    info = candle_ckpt.restart(params, model, verbose=False)
    assert info["epoch"] == 2
    fit(model, params, 3, initial_epoch=info["epoch"])
    assert candle_ckpt.restart(params, tiny_model(seed=7), verbose=False)["epoch"] == 3
