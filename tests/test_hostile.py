"""Hostile checkpoint trees: each is refused with a clear error and nothing is loaded.

Every case edits a good tree (epochs 1-2 of the tiny model, last -> epochs/002), then
restarts a fresh model: the error must be a CheckpointError naming the path (and the
key, for JSON), and the model must be untouched. Restart never runs code from a file.
"""

import json
import os
import shutil

import numpy as np
import pytest
from test_keras_restart import fit, params_for, tiny_model

import candle_ckpt
from candle_ckpt.core.format.info import read_info, write_info
from candle_ckpt.core.format.layout import CheckpointLayout
from candle_ckpt.keras import h5 as keras_h5

keras = pytest.importorskip("keras")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def good_tree(tmp_path_factory):
    params = params_for(tmp_path_factory.mktemp("hostile"), epochs=2)
    fit(tiny_model(), params, 2)
    return params["ckpt_directory"]


@pytest.fixture
def tree(good_tree, tmp_path):
    """A copy of the good tree to spoil: (params, layout, ckpt-info dict of epoch 2)."""
    root = str(tmp_path / "save")
    shutil.copytree(good_tree, root, symlinks=True)
    layout = CheckpointLayout(root)
    return {"ckpt_directory": root}, layout, read_info(layout.epoch_dir(2))


def refused(params, expected_error, *fragments):
    """Restart a fresh model: assert the error and its message, and that nothing loaded."""
    model = tiny_model(seed=7)
    before = [np.array(v.numpy()) for v in model.weights]
    with pytest.raises(expected_error) as raised:
        candle_ckpt.restart(params, model, verbose=False)
    for fragment in fragments:
        assert fragment in str(raised.value)
    for a, v in zip(before, model.weights):
        assert np.array_equal(a, v.numpy())
    assert not model.optimizer.built  # the optimizer was not even built
    return str(raised.value)


def write_json(layout, epoch, text):
    path = os.path.join(layout.epoch_dir(epoch), "ckpt-info.json")
    with open(path, "wb") as stream:
        stream.write(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


BAD_VALUES = [
    ("model_file", "../../etc/passwd"),
    ("model_file", "/etc/passwd"),
    ("model_file", ".."),
    ("model_file", "model.h5\u0000"),
    ("epoch", "2"),
    ("epoch", 10**30),
    ("epoch", -2),
    ("epoch", 2.5),
    ("files", ["model.h5"]),
    ("files", {"/etc/passwd": {"size": 1, "crc32": None}}),
    ("checksum", 12),
    ("best_metric_last", "0.1"),
    ("epochs_saved", "all"),
    ("versions", {"x": 1}),
    ("metadata", "m" * 70000),
    ("format", "pickle"),
    ("format_version", 99),
    ("unexpected_key", "hello"),
]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={str(v)[:20]}" for k, v in BAD_VALUES])
def test_bad_value_in_ckpt_info_is_refused_naming_the_key(tree, key, value):
    params, layout, info = tree
    path = write_json(layout, 2, json.dumps({**info, key: value}))
    refused(params, candle_ckpt.CheckpointFormatError, path, f"'{key}")


@pytest.mark.parametrize("key", ["epoch", "model_file", "files", "checksum", "format_version"])
def test_missing_key_is_refused_naming_it(tree, key):
    params, layout, info = tree
    del info[key]
    path = write_json(layout, 2, json.dumps(info))
    refused(params, candle_ckpt.CheckpointFormatError, path, key)


@pytest.mark.parametrize(
    "text,fragment",
    [
        (b'{"epoch": 2, \xff\xfe}', "not UTF-8"),
        ("{" + '"epoch": 2,' * 10, "not valid JSON"),
        ("[" * 200000 + "]" * 200000, "nested"),
        ('"best_metric_last": 1e400', "1e400 is not a finite number"),
        ('"best_metric_last": NaN', "NaN is not valid JSON"),
        ("[1, 2, 3]", "expected a JSON object"),
        ("", "not valid JSON"),
    ],
    ids=["non-UTF-8", "truncated", "nested-200000-deep", "1e400", "NaN", "array", "empty"],
)
def test_malformed_ckpt_info_is_refused(tree, text, fragment):
    params, layout, info = tree
    if isinstance(text, str) and text.startswith('"best_metric_last"'):  # in a good file
        text = json.dumps(info).replace(f'"best_metric_last": {info["best_metric_last"]}', text)
    path = write_json(layout, 2, text)
    refused(params, candle_ckpt.CheckpointFormatError, path, fragment)


def test_a_100_mb_ckpt_info_is_refused_without_reading_it_all(tree):
    params, layout, info = tree
    path = write_json(layout, 2, json.dumps({**info, "metadata": "x" * (100 << 20)}))
    assert os.path.getsize(path) > 100 << 20
    refused(params, candle_ckpt.CheckpointFormatError, path, "larger than")


def test_ckpt_info_that_is_a_link_or_a_fifo_is_refused(tree):
    params, layout, _ = tree
    path = os.path.join(layout.epoch_dir(2), "ckpt-info.json")
    os.unlink(path)
    os.symlink("/etc/passwd", path)
    refused(params, candle_ckpt.CheckpointFormatError, path, "a symbolic link (-> '/etc/passwd')")
    os.unlink(path)
    os.mkfifo(path)  # opening it for reading would block forever
    refused(params, candle_ckpt.CheckpointFormatError, path, "not a regular file")


def test_epoch_of_another_directory_is_refused(tree):
    params, layout, info = tree
    write_info(layout.epoch_dir(2), {**info, "epoch": 1})
    refused(params, candle_ckpt.CheckpointError, "key 'epoch' is 1; expected 2")


def link_cases(layout, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(layout.epoch_dir(2), outside / "002")
    return {
        "relative-outside": os.path.join("..", "..", "outside", "002"),
        "absolute-outside": str(outside / "002"),
        "absolute-etc": "/etc",
        "to-a-file": os.path.join("epochs", "002", "model.h5"),
        "to-ckpts-itself": ".",
        "to-epochs": "epochs",
        "loop": "last",
    }


@pytest.mark.parametrize(
    "case",
    [
        "relative-outside",
        "absolute-outside",
        "absolute-etc",
        "to-a-file",
        "to-ckpts-itself",
        "to-epochs",
        "loop",
    ],
)
def test_last_link_leading_astray_is_refused(tree, tmp_path, case):
    params, layout, _ = tree
    target = link_cases(layout, tmp_path)[case]
    os.unlink(layout.link("last"))
    os.symlink(target, layout.link("last"))
    refused(params, candle_ckpt.LinkError, layout.link("last"))


def test_an_epoch_directory_that_is_a_link_outside_is_never_read_even_by_fallback(tree, tmp_path):
    """epochs/001 -> a copy outside the tree; last (2) is corrupt; fallback is on: the
    tree is refused before anything in it is read, naming the link."""
    params, layout, _ = tree
    outside = str(tmp_path / "elsewhere")
    shutil.move(layout.epoch_dir(1), outside)
    os.symlink(outside, layout.epoch_dir(1))
    with open(os.path.join(layout.epoch_dir(2), "model.h5"), "r+b") as stream:
        stream.write(b"\0" * 64)
    refused(
        {**params, "ckpt_restart_fallback": True},
        candle_ckpt.CheckpointError,
        f"'{layout.epoch_dir(1)}' is a symbolic link",
        "follows no link in the tree but last and best",
    )


def test_a_model_file_that_is_a_link_outside_the_epoch_is_refused(tree, tmp_path):
    params, layout, _ = tree
    model_file = os.path.join(layout.epoch_dir(2), "model.h5")
    outside = str(tmp_path / "model-outside.h5")
    shutil.move(model_file, outside)
    os.symlink(outside, model_file)  # same bytes, same CRC32: only the link is wrong
    refused(params, candle_ckpt.CorruptCheckpointError, model_file, "not a regular file")


def test_a_lambda_layer_in_the_file_is_never_executed(tree, tmp_path):
    """model.h5's model_config describes a Lambda whose code writes a marker file.

    Plain Keras `load_model(..., safe_mode=False)` runs it (the payload is live);
    restart() only reads datasets, so the marker never appears.
    """
    params, layout, info = tree
    marker = tmp_path / "lambda-ran"
    payload = eval(f"lambda x: x + float(open({str(marker)!r}, 'w').close() or 0)")
    evil = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Lambda(payload),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model_file = os.path.join(layout.epoch_dir(2), "model.h5")
    model_config = keras_h5.snapshot(evil, weights_only=True).model_config
    assert '"class_name": "Lambda"' in model_config
    marker.unlink()  # building the Sequential ran the lambda once
    import h5py

    with h5py.File(model_file, "r+") as f:
        f.attrs["model_config"] = model_config.encode("utf8")
    from candle_ckpt.core.storage.checksum import crc32_file

    crc = str(crc32_file(model_file))
    write_info(
        layout.epoch_dir(2),
        {
            **info,
            "checksum": crc,
            "files": {"model.h5": {"size": os.path.getsize(model_file), "crc32": crc}},
        },
    )

    model = tiny_model(seed=7)
    assert candle_ckpt.restart(params, model, verbose=False)["epoch"] == 2
    assert not marker.exists()
    keras.config.enable_unsafe_deserialization()
    try:
        keras.models.load_model(model_file, compile=False, safe_mode=False)
    finally:
        keras.src.saving.serialization_lib.ENABLE_UNSAFE_DESERIALIZATION = False
    assert marker.exists()
