"""ckpt-info.json: schema-valid on write and read, strict JSON, legacy CANDLE files read."""

import json
import os

import pytest
from conftest import as_format1, file_writer

from candle_ckpt.core.errors import CheckpointFormatError
from candle_ckpt.core.format.info import encode_info, read_info, write_info


@pytest.fixture
def info(make_checkpointer):
    checkpointer = make_checkpointer(epochs=1)
    checkpointer.epoch_end(1, {"loss": 0.5}, file_writer())
    return read_info(checkpointer.layout.epoch_dir(1))


def write_raw(directory, info):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "ckpt-info.json"), "w") as stream:
        json.dump(info, stream)


@pytest.fixture
def info1(info):
    return as_format1(info, [1])


def test_written_info_has_every_design_key(info):
    assert set(info) == {
        "epoch",
        "model_file",
        "checksum",
        "save_best_metric",
        "best_metric_last",
        "timestamp",
        "time_elapsed",
        "metadata",
        "format",
        "format_version",
        "files",
        "best_metric_mode",
        "epoch_best",
        "metrics",
        "train_seconds",
        "save_seconds",
        "run_id",
        "run_started",
        "lineage_id",
        "lineage_format1_epoch",
        "weights_only",
        "write_seconds",
        "versions",
    }
    assert info["format_version"] == 2
    assert info["checksum"] == info["files"]["model.h5"]["crc32"]
    assert info["time_elapsed"] == "__FIRST__"
    assert info["metrics"] == {"loss": 0.5} and info["lineage_id"] == info["run_id"]


def test_format1_files_are_still_read(tmp_path, info1):
    write_info(tmp_path, info1)
    assert read_info(tmp_path) == info1


def test_non_finite_metrics_are_null_and_non_numbers_left_out(make_checkpointer):
    checkpointer = make_checkpointer(epochs=1)
    checkpointer.epoch_end(
        1,
        {"loss": 0.5, "val_loss": float("nan"), "lr": float("inf"), "note": "text", "flag": True},
        file_writer(),
    )
    metrics = read_info(checkpointer.layout.epoch_dir(1))["metrics"]
    assert metrics == {"loss": 0.5, "val_loss": None, "lr": None}


@pytest.mark.parametrize(
    "key,value",
    [
        ("metrics", {"loss": "0.5"}),
        ("run_id", "not-hex"),
        ("run_started", "yesterday"),
        ("init_from", {"source": "x", "epoch": 0, "checksum": "1"}),
        ("train_seconds", -1),
        ("epochs_saved", [1]),
    ],
)
def test_format2_keys_are_validated(tmp_path, info, key, value):
    info[key] = value
    write_raw(tmp_path, info)
    with pytest.raises(CheckpointFormatError, match=key):
        read_info(tmp_path)


def test_init_from_is_recorded_when_set(make_checkpointer):
    checkpointer = make_checkpointer(epochs=1)
    checkpointer.init_from = {"source": "/runs/parent/save:best", "epoch": 7, "checksum": "123"}
    checkpointer.epoch_end(1, {"loss": 0.5}, file_writer())
    assert read_info(checkpointer.layout.epoch_dir(1))["init_from"]["epoch"] == 7


def test_round_trip(tmp_path, info):
    write_info(tmp_path, info)
    assert read_info(tmp_path) == info


@pytest.mark.parametrize(
    "key,value",
    [
        ("epoch", 0),
        ("epoch", "3"),
        ("epoch", 10**30),
        ("model_file", "../../etc/passwd"),
        ("model_file", "/etc/passwd"),
        ("model_file", ".."),
        ("checksum", "abc"),
        ("time_elapsed", -1),
        ("best_metric_mode", "up"),
        ("weights_only", "no"),
        ("files", {"../x": {"size": 1, "crc32": None}}),
        ("format_version", 3),
        ("surprise", 1),
    ],
)
def test_schema_violation_on_read_names_the_key(tmp_path, info, key, value):
    info[key] = value
    write_raw(tmp_path, info)
    with pytest.raises(CheckpointFormatError) as raised:
        read_info(tmp_path)
    message = str(raised.value)
    assert str(tmp_path) in message
    assert key in message


@pytest.mark.parametrize("version", [1, 2])
def test_missing_key_is_named(tmp_path, info, info1, version):
    info = info1 if version == 1 else info
    key = "epochs_saved" if version == 1 else "metrics"
    del info[key]
    write_raw(tmp_path, info)
    with pytest.raises(CheckpointFormatError, match=key):
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
    text = (
        encode_info(info)
        .decode()
        .replace('"best_metric_last": 0.5', '"best_metric_last": Infinity')
    )
    (tmp_path / "ckpt-info.json").write_text(text)
    with pytest.raises(CheckpointFormatError, match="Infinity"):
        read_info(tmp_path)


def test_not_json_not_utf8_not_object_too_large(tmp_path):
    path = tmp_path / "ckpt-info.json"
    for content, pattern in [
        (b'{"epoch": 1', "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "top level is a list"),
        (b" " * (17 << 20), "larger than"),
    ]:
        path.write_bytes(content)
        with pytest.raises(CheckpointFormatError, match=pattern):
            read_info(tmp_path)


def test_upstream_candle_info_is_read_with_infinity(tmp_path):
    (tmp_path / "ckpt-info.json").write_text(
        '{"epoch": 3, "save_best_metric": "val_loss", "best_metric_last": Infinity, '
        '"model_file": "model.h5", "checksum": "__DISABLED__", "timestamp": '
        '"2021-05-03 10:00:00", "time_elapsed": "__FIRST__", "metadata": null}\n'
    )
    info = read_info(tmp_path)
    assert info["epoch"] == 3 and info["best_metric_last"] == float("inf")


def test_upstream_candle_info_is_still_validated(tmp_path):
    (tmp_path / "ckpt-info.json").write_text(
        '{"epoch": 3, "save_best_metric": "val_loss", "best_metric_last": 1.0, '
        '"model_file": "../model.h5", "checksum": "12", "timestamp": "x", '
        '"time_elapsed": 2.5, "metadata": null}'
    )
    with pytest.raises(CheckpointFormatError, match="model_file"):
        read_info(tmp_path)


@pytest.mark.parametrize(
    "epochs,key",
    [
        ([1, 2, 0, 5], "epochs_saved/2"),
        ([3, 1, 2, 2], "epochs_saved"),
        ([1, 2, True, 4], "epochs_saved/2"),
        ([1, 2, 3, 10**10], "epochs_saved/3"),
    ],
)
def test_long_epochs_saved_lists_are_checked_item_by_item(tmp_path, info1, epochs, key):
    info1["epochs_saved"] = epochs
    write_raw(tmp_path, info1)
    with pytest.raises(CheckpointFormatError, match=f"key '{key}'"):
        read_info(tmp_path)
