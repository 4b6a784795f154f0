"""`candle-ckpt export`: verified epochs exported as files plain Keras (`load_weights`)
and plain PyTorch (`load_state_dict(torch.load(..., weights_only=True))`) load; corrupt
epochs and unmappable models refused; never a half-written file; the SHA-256 beside it."""

import hashlib
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
from test_cli import GUARD, cli

import candle_ckpt
from candle_ckpt.core.format.layout import CheckpointLayout

keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")

# Keras warns so when any weights file without optimizer state meets a compiled model
# whose optimizer has its iteration and learning-rate variables: export leaves the
# optimizer out on purpose (a weights-only file), and the weights load all the same.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Skipping variable loading for optimizer:UserWarning"
)


def train_keras(model, root, epochs=2):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    callback = candle_ckpt.CandleCheckpointCallback(
        {"ckpt_directory": str(root), "epochs": epochs, "ckpt_save_best_metric": "loss"},
        verbose=False,
    )
    model.fit(x, y, epochs=epochs, batch_size=8, shuffle=False, verbose=0, callbacks=[callback])
    return model


def sequential(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(8),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return model


def functional(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    a = keras.layers.Dense(6, name="left")(inputs)
    b = keras.layers.Dense(6, name="right")(inputs)
    merged = keras.layers.Concatenate()([a, b])
    x = keras.layers.LayerNormalization()(merged)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(x))
    model.compile(optimizer="adam", loss="mse")
    return model


def assert_same_weights(a, b):
    wa, wb = a.get_weights(), b.get_weights()
    assert len(wa) == len(wb) and len(wa) > 0
    for x, y in zip(wa, wb):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def check_digest(path, stdout):
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert f"{digest}  {path}" in stdout.splitlines()
    assert open(f"{path}.sha256").read() == f"{digest}  {os.path.basename(path)}\n"
    # the digest file is what sha256sum -c reads
    subprocess.run(
        ["sha256sum", "-c", "--quiet", f"{os.path.basename(path)}.sha256"],
        cwd=os.path.dirname(path),
        check=True,
    )


def layout_of(path):
    """{HDF5 path: group attrs, or a dataset's dtype, shape and bytes} of a file."""
    import h5py

    found = {}

    def visit(name, node):
        if isinstance(node, h5py.Dataset):
            found[name] = (node.dtype.str, node.shape, node[()].tobytes())
        else:
            found[name] = {key: str(value) for key, value in node.attrs.items()}

    with h5py.File(path, "r") as f:
        found["/"] = dict(f.attrs)
        f.visititems(visit)
    return found


@pytest.mark.parametrize("build", [sequential, functional])
def test_keras_export_loads_in_plain_keras(tmp_path, build):
    trained = train_keras(build(1), tmp_path / "save")
    out = tmp_path / "out" / "model.weights.h5"
    out.parent.mkdir()
    result = cli("export", tmp_path / "save", "--to", out)
    assert "epoch 2: exported" in result.stdout
    check_digest(str(out), result.stdout)
    # the very layout Keras writes itself, less the optimizer
    reference = tmp_path / "keras.weights.h5"
    trained.save_weights(str(reference))
    ours, theirs = layout_of(out), layout_of(reference)
    assert ours == {k: v for k, v in theirs.items() if not k.startswith("optimizer")}
    fresh = build(2)  # another process' names differ (dense_5 ...): Keras matches classes
    fresh.load_weights(str(out))
    assert_same_weights(fresh, trained)
    # an earlier epoch by number, into a model that was never compiled
    cli("export", tmp_path / "save", "1", "--to", tmp_path / "e1.weights.h5")
    uncompiled = build(3)
    uncompiled.load_weights(str(tmp_path / "e1.weights.h5"))
    reference = build(4)
    candle_ckpt.restart(
        {"ckpt_directory": str(tmp_path / "save"), "epochs": 2}, reference, verbose=False
    )
    from candle_ckpt.keras import h5

    h5.restore(reference, CheckpointLayout(tmp_path / "save").epoch_dir(1) + "/model.h5")
    assert_same_weights(uncompiled, reference)


def test_keras_export_imports_neither_tensorflow_nor_keras_nor_torch(tmp_path):
    train_keras(sequential(1), tmp_path / "save", epochs=1)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            GUARD,
            "export",
            str(tmp_path / "save"),
            "--to",
            str(tmp_path / "m.weights.h5"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.splitlines()[-1] == "STATUS 0 HEAVY h5py,jsonschema,numpy", result.stderr


def test_keras_export_of_an_upstream_candle_tree(tmp_path):
    """upstream CANDLE: plain model.save('model.h5') and the 8-key JSON."""
    model = sequential(1)
    train_keras(model, tmp_path / "ours", epochs=1)
    directory = tmp_path / "save" / "ckpts" / "epochs" / "003"
    directory.mkdir(parents=True)
    model.save(str(directory / "model.h5"))
    crc = zlib.crc32((directory / "model.h5").read_bytes())
    (directory / "ckpt-info.json").write_text(
        '{"epoch": 3, "save_best_metric": "val_loss", "best_metric_last": 0.5, '
        '"model_file": "model.h5", "checksum": "%d", "timestamp": "2021-05-03 10:00:00", '
        '"time_elapsed": 1.5, "metadata": null}\n' % crc
    )
    os.symlink(str(directory), tmp_path / "save" / "ckpts" / "last")
    cli("export", tmp_path / "save", "--to", tmp_path / "up.weights.h5")
    fresh = sequential(5)
    fresh.load_weights(str(tmp_path / "up.weights.h5"))
    assert_same_weights(fresh, model)


def test_a_corrupt_epoch_is_refused_and_nothing_is_written(tmp_path):
    train_keras(sequential(1), tmp_path / "save")
    path = os.path.join(CheckpointLayout(tmp_path / "save").epoch_dir(2), "model.h5")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x10
    open(path, "wb").write(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    err = cli("export", tmp_path / "save", "--to", out / "m.weights.h5", expect=1).stderr
    assert "epoch 2 fails verification" in err and path in err
    assert "nothing was exported" in err and "list --verify" in err
    assert os.listdir(out) == []  # no file, no temporary, no digest


def test_destination_rules(tmp_path):
    train_keras(sequential(1), tmp_path / "save", epochs=1)
    save = tmp_path / "save"
    assert (
        "ending in '.weights.h5'" in cli("export", save, "--to", tmp_path / "m.h5", expect=2).stderr
    )
    assert (
        "does not exist"
        in cli("export", save, "--to", tmp_path / "no/m.weights.h5", expect=2).stderr
    )
    target = tmp_path / "m.weights.h5"
    target.write_bytes(b"older")
    assert "pass --force" in cli("export", save, "--to", target, expect=2).stderr
    assert target.read_bytes() == b"older"
    check_digest(str(target), cli("export", save, "--to", target, "--force").stdout)
    assert "expected a number" in cli("export", save, "five", "--to", target, expect=2).stderr
    assert "the following arguments are required: --to" in cli("export", save, expect=2).stderr


def test_nested_and_subclassed_keras_models_are_refused(tmp_path):
    keras.utils.set_random_seed(1)
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    nested = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(1)])
    nested.compile(optimizer="adam", loss="mse")
    train_keras(nested, tmp_path / "nested", epochs=1)
    err = cli("export", tmp_path / "nested", "--to", tmp_path / "n.weights.h5", expect=2).stderr
    assert "nested layer" in err and "model.save_weights" in err
    assert not os.path.exists(tmp_path / "n.weights.h5")

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    model = Subclassed()
    model.compile(optimizer="adam", loss="mse")
    model(np.zeros((1, 4), "float32"))
    train_keras(model, tmp_path / "sub", epochs=1)
    err = cli("export", tmp_path / "sub", "--to", tmp_path / "s.weights.h5", expect=2).stderr
    assert "model_config" in err or "only Sequential and Functional" in err
    assert not os.path.exists(tmp_path / "s.weights.h5")


# -- PyTorch ----------------------------------------------------------------------------


def torch_net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    )


def test_pytorch_export_loads_in_plain_pytorch(tmp_path):
    net = torch_net(1)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    ckpt = candle_ckpt.CandleCkptPyTorch(
        {"ckpt_directory": str(tmp_path / "save"), "epochs": 2}, verbose=False
    )
    ckpt.set_model({"model": net, "optimizer": opt})
    ckpt.restart()
    for epoch in range(2):
        opt.zero_grad()
        loss = net(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        ckpt.ckpt_epoch(epoch, loss.item())
    out = tmp_path / "net.pt"
    result = cli("export", tmp_path / "save", "last", "--to", out)
    assert "state dict of 'model'" in result.stdout
    check_digest(str(out), result.stdout)
    fresh = torch_net(2)
    fresh.load_state_dict(torch.load(str(out), weights_only=True))
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_pytorch_export_of_an_upstream_candle_pickle(tmp_path):
    import io

    net = torch_net(3)
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "model_state_dict": net.state_dict(), "loss": 0}, buffer)
    directory = tmp_path / "save" / "ckpts" / "epochs" / "001"
    directory.mkdir(parents=True)
    (directory / "model.h5").write_bytes(buffer.getvalue())
    (directory / "ckpt-info.json").write_text(
        '{"epoch": 1, "save_best_metric": "val_loss", "best_metric_last": Infinity, '
        '"model_file": "model.h5", "checksum": "%d", "timestamp": "2022-01-01 10:00:00", '
        '"time_elapsed": 3.5, "metadata": null}\n' % zlib.crc32(buffer.getvalue())
    )
    cli("export", tmp_path / "save", "1", "--to", tmp_path / "up.pt")
    fresh = torch_net(4)
    fresh.load_state_dict(torch.load(str(tmp_path / "up.pt"), weights_only=True))
    assert torch.equal(fresh[0].weight, net[0].weight)


@pytest.mark.parametrize("point", ["export_written", "export_digest_removed", "export_renamed"])
def test_killed_export_never_leaves_a_half_written_file_or_a_wrong_digest(tmp_path, point):
    from candle_ckpt.core.storage.faults import EXPORT_POINTS

    assert point in EXPORT_POINTS
    train_keras(sequential(1), tmp_path / "save", epochs=1)
    target = tmp_path / "out" / "m.weights.h5"
    target.parent.mkdir()
    target.write_bytes(b"older")
    digest_file = tmp_path / "out" / "m.weights.h5.sha256"
    digest_file.write_text(f"{hashlib.sha256(b'older').hexdigest()}  m.weights.h5\n")
    from test_cli import CLI

    killed = subprocess.run(
        [*CLI, "export", str(tmp_path / "save"), "--to", str(target), "--force"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, CANDLE_CKPT_FAULT=point),
    )
    assert killed.returncode == -9, killed.stderr
    data = target.read_bytes()
    assert data == b"older" or data.startswith(b"\x89HDF")
    if digest_file.exists():  # never one that does not match the file
        assert digest_file.read_text().split()[0] == hashlib.sha256(data).hexdigest()
    assert (data == b"older") == (point != "export_renamed")
    # the rerun completes; a temporary left by the kill never has the file's name
    check_digest(str(target), cli("export", tmp_path / "save", "--to", target, "--force").stdout)
    sequential(2).load_weights(str(target))
