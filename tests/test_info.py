"""ckpt-info.json: schema-valid on write and read, strict JSON, legacy CANDLE files read."""

import json
import os

import pytest
from conftest import file_writer

from candle_ckpt.core.errors import CheckpointFormatError
from candle_ckpt.core.info import encode_info, read_info, write_info


@pytest.fixture
def info(make_checkpointer):
    checkpointer = make_checkpointer(epochs=1)
    checkpointer.epoch_end(1, {"loss": 0.5}, file_writer())
    return read_info(checkpointer.layout.epoch_dir(1))


def write_raw(directory, info):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "ckpt-info.json"), "w") as stream:
        json.dump(info, stream)


def test_written_info_has_every_design_key(info):
    assert set(info) == {
        "epoch", "model_file", "checksum", "save_best_metric", "best_metric_last",
        "timestamp", "time_elapsed", "metadata", "format", "format_version", "files",
        "best_metric_mode", "epoch_best", "epochs_saved", "weights_only", "write_seconds",
        "versions"}
    assert info["checksum"] == info["files"]["model.h5"]["crc32"]
    assert info["time_elapsed"] == "__FIRST__"


def test_round_trip(tmp_path, info):
    write_info(tmp_path, info)
    assert read_info(tmp_path) == info


@pytest.mark.parametrize("key,value", [
    ("epoch", 0), ("epoch", "3"), ("epoch", 10 ** 30), ("model_file", "../../etc/passwd"),
    ("model_file", "/etc/passwd"), ("model_file", ".."), ("checksum", "abc"),
    ("time_elapsed", -1), ("best_metric_mode", "up"), ("weights_only", "no"),
    ("epochs_saved", [1, 1]), ("files", {"../x": {"size": 1, "crc32": None}}),
    ("format_version", 2), ("surprise", 1)])
def test_schema_violation_on_read_names_the_key(tmp_path, info, key, value):
    info[key] = value
    write_raw(tmp_path, info)
    with pytest.raises(CheckpointFormatError) as raised:
        read_info(tmp_path)
    message = str(raised.value)
    assert str(tmp_path) in message
    assert key in message


def test_missing_key_is_named(tmp_path, info):
    del info["epochs_saved"]
    write_raw(tmp_path, info)
    with pytest.raises(CheckpointFormatError, match="epochs_saved"):
        read_info(tmp_path)


def test_invalid_info_is_never_written(tmp_path, info):
    info["epoch"] = -5
    target = tmp_path / "epoch"
    target.mkdir()
    with pytest.raises(CheckpointFormatError, match="epoch"):
        write_info(target, info)
    assert os.listdir(target) == []


def test_model_file_must_be_listed_and_checksums_agree(tmp_path, info):
    info["checksum"] = "123"
    write_raw(tmp_path, info)
    with pytest.raises(CheckpointFormatError, match="'checksum'"):
        read_info(tmp_path)


def test_output_is_strict_json(info):
    info["best_metric_last"] = float("inf")
    with pytest.raises(ValueError):
        encode_info(info)


def test_infinity_in_a_new_file_is_refused(tmp_path, info):
    text = encode_info(info).decode().replace('"best_metric_last": 0.5',
                                              '"best_metric_last": Infinity')
    (tmp_path / "ckpt-info.json").write_text(text)
    with pytest.raises(CheckpointFormatError, match="Infinity"):
        read_info(tmp_path)


def test_not_json_not_utf8_not_object_too_large(tmp_path):
    path = tmp_path / "ckpt-info.json"
    for content, pattern in [(b"{\"epoch\": 1", "not valid JSON"), (b"\xff\xfe{}", "not UTF-8"),
                             (b"[1, 2]", "top level is a list"),
                             (b" " * (17 << 20), "larger than")]:
        path.write_bytes(content)
        with pytest.raises(CheckpointFormatError, match=pattern):
            read_info(tmp_path)


def test_upstream_candle_info_is_read_with_infinity(tmp_path):
    (tmp_path / "ckpt-info.json").write_text(
        '{"epoch": 3, "save_best_metric": "val_loss", "best_metric_last": Infinity, '
        '"model_file": "model.h5", "checksum": "__DISABLED__", "timestamp": '
        '"2021-05-03 10:00:00", "time_elapsed": "__FIRST__", "metadata": null}\n')
    info = read_info(tmp_path)
    assert info["epoch"] == 3 and info["best_metric_last"] == float("inf")


def test_upstream_candle_info_is_still_validated(tmp_path):
    (tmp_path / "ckpt-info.json").write_text(
        '{"epoch": 3, "save_best_metric": "val_loss", "best_metric_last": 1.0, '
        '"model_file": "../model.h5", "checksum": "12", "timestamp": "x", '
        '"time_elapsed": 2.5, "metadata": null}')
    with pytest.raises(CheckpointFormatError, match="model_file"):
        read_info(tmp_path)


@pytest.mark.parametrize("epochs,key", [
    ([1, 2, 0, 5], "epochs_saved/2"), ([3, 1, 2, 2], "epochs_saved"),
    ([1, 2, True, 4], "epochs_saved/2"), ([1, 2, 3, 10 ** 10], "epochs_saved/3")])
def test_long_epochs_saved_lists_are_checked_item_by_item(tmp_path, info, epochs, key):
    info["epochs_saved"] = epochs
    write_raw(tmp_path, info)
    with pytest.raises(CheckpointFormatError, match=f"key '{key}'"):
        read_info(tmp_path)
