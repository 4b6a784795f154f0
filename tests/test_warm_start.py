"""Warm start (`ckpt_init_from`), in process, Keras and PyTorch: a run with no checkpoint
of its own starts from a parent tree's verified weights only; with its own `last`,
restart wins; a missing or corrupt source is refused before anything is loaded."""

import logging
import os

import numpy as np
import pytest
from conftest import flip_byte
from keras_helpers import fit_checkpointed

import candle_ckpt
from candle_ckpt.core.errors import CheckpointError
from candle_ckpt.core.format.info import read_info
from candle_ckpt.core.format.layout import CheckpointLayout
from candle_ckpt.core.params import ckpt_defs, ckpt_parser, validate_params

keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")


def flip_last_byte_of(path):
    flip_byte(path, offset=os.path.getsize(path) - 1, mask=0x01)


def test_ckpt_init_from_is_a_parameter_of_the_table():
    assert validate_params({})["ckpt_init_from"] is None
    assert validate_params({"ckpt_init_from": "p/save:best"})["ckpt_init_from"] == "p/save:best"
    import argparse

    parsed = ckpt_parser(argparse.ArgumentParser()).parse_args(["--ckpt_init_from", "x:3"])
    assert parsed.ckpt_init_from == "x:3"
    assert "ckpt_init_from" in [entry["name"] for entry in ckpt_defs([])]
    with pytest.raises(TypeError, match="ckpt_init_from"):
        validate_params({"ckpt_init_from": 5})


# -- Keras ------------------------------------------------------------------------------


def keras_model(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dropout(0.25, seed=seed),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mean_squared_error")
    return model


def keras_fit(model, params, epochs, initial_epoch=0):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4)).astype("float32")
    y = x[:, :1] * 2
    _, callback = fit_checkpointed(
        model, params, x, y, epochs, initial_epoch, batch_size=8, validation_data=(x, y)
    )
    return callback


def weights_of(model):
    return [w.copy() for w in model.get_weights()]


def assert_equal_arrays(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


@pytest.fixture(scope="module")
def keras_parent(tmp_path_factory):
    """A parent tree of 3 epochs, every one kept, and its final weights."""
    root = tmp_path_factory.mktemp("keras_parent") / "save"
    model = keras_model(1)
    keras_fit(model, {"ckpt_directory": str(root), "epochs": 3, "ckpt_save_best_metric": "loss"}, 3)
    return root, weights_of(model)


def test_keras_warm_start_loads_the_parents_weights_only(keras_parent, tmp_path, caplog):
    parent, parent_weights = keras_parent
    params = {"ckpt_directory": str(tmp_path / "child"), "epochs": 2, "ckpt_init_from": str(parent)}
    child = keras_model(7)
    seed_states = [v.numpy().copy() for v in child.variables if "seed_generator" in v.path]
    with caplog.at_level(logging.INFO, logger="candle_ckpt"):
        assert candle_ckpt.restart(params, child, verbose=False) is None
    assert_equal_arrays(weights_of(child), parent_weights)
    assert "WARM START" in caplog.text and "epoch 3" in caplog.text
    # the optimizer and the random states are the child's own, fresh
    assert int(child.optimizer.iterations.numpy()) == 0
    assert_equal_arrays(
        [v.numpy() for v in child.variables if "seed_generator" in v.path], seed_states
    )
    callback = keras_fit(child, params, 2)
    parent_epoch = os.path.join(parent, "ckpts", "epochs", "003")
    assert callback.checkpointer.init_from == {
        "source": parent_epoch,
        "epoch": 3,
        "checksum": read_info(parent_epoch)["checksum"],
    }
    # epochs start at 0: the child's tree holds its own epochs 1 and 2
    assert CheckpointLayout(params["ckpt_directory"]).list_epochs() == [1, 2]
    assert int(child.optimizer.iterations.numpy()) == 2 * 4

    # with a last of its own, restart wins and says the init source is ignored
    trained = weights_of(child)
    again = keras_model(8)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="candle_ckpt"):
        info = candle_ckpt.restart(params, again, verbose=False)
    assert info["epoch"] == 2
    assert "ckpt_init_from" in caplog.text and "is ignored" in caplog.text
    assert_equal_arrays(weights_of(again), trained)
    callback = keras_fit(again, {**params, "epochs": 3}, 3, initial_epoch=2)
    # the resumed lineage still descends from the parent's weights, and says so
    assert read_info(os.path.join(params["ckpt_directory"], "ckpts", "epochs", "003"))[
        "init_from"
    ] == {"source": parent_epoch, "epoch": 3, "checksum": read_info(parent_epoch)["checksum"]}


@pytest.mark.parametrize(
    "selector, epoch",
    [(":1", 1), (":best", None), (":last", 3), ("/ckpts/epochs/002", 2), ("/ckpts/last", 3)],
)
def test_keras_warm_start_selectors(keras_parent, tmp_path, selector, epoch):
    parent, _ = keras_parent
    layout = CheckpointLayout(parent)
    epoch = epoch or layout.resolve_link("best")
    reference = keras_model(1)
    candle_ckpt.restart(
        {"ckpt_directory": str(parent), "epochs": 3}, reference, verbose=False
    )  # epoch 3, then load the wanted epoch's weights
    from candle_ckpt.keras import h5

    h5.restore(reference, os.path.join(layout.epoch_dir(epoch), "model.h5"))
    child = keras_model(9)
    params = {
        "ckpt_directory": str(tmp_path / "child"),
        "epochs": 1,
        "ckpt_init_from": f"{parent}{selector}",
    }
    assert candle_ckpt.restart(params, child, verbose=False) is None
    assert_equal_arrays(weights_of(child), weights_of(reference))


@pytest.mark.parametrize(
    "source, message",
    [
        ("{tmp}/nowhere", "neither a checkpoint tree"),
        ("{parent}:9", "has no ckpt-info.json"),
        ("{tmp}/nowhere:best", "is not a checkpoint tree"),
        ("{empty}:last", "is absent or dangling"),
    ],
)
def test_keras_missing_init_source_is_refused(keras_parent, tmp_path, source, message):
    parent, _ = keras_parent
    os.makedirs(tmp_path / "empty" / "ckpts")
    child = keras_model(5)
    before = weights_of(child)
    params = {
        "ckpt_directory": str(tmp_path / "child"),
        "epochs": 1,
        "ckpt_init_from": source.format(tmp=tmp_path, parent=parent, empty=tmp_path / "empty"),
    }
    with pytest.raises(CheckpointError, match=message) as raised:
        candle_ckpt.restart(params, child, verbose=False)
    assert "ckpt_init_from" in str(raised.value)
    assert "Nothing was loaded" in str(raised.value)
    assert_equal_arrays(weights_of(child), before)


def test_keras_corrupt_init_source_is_refused_before_training(keras_parent, tmp_path):
    import shutil

    parent = tmp_path / "parent"
    shutil.copytree(keras_parent[0], parent, symlinks=True)
    flip_last_byte_of(parent / "ckpts" / "epochs" / "003" / "model.h5")
    child = keras_model(5)
    before = weights_of(child)
    params = {"ckpt_directory": str(tmp_path / "child"), "epochs": 1, "ckpt_init_from": str(parent)}
    with pytest.raises(CheckpointError, match=r"ckpt_init_from .*checksum mismatch in"):
        candle_ckpt.restart(params, child, verbose=False)
    assert_equal_arrays(weights_of(child), before)
    assert not os.path.exists(tmp_path / "child" / "ckpts")


def test_keras_init_source_of_another_architecture_is_refused(keras_parent, tmp_path):
    keras.utils.set_random_seed(3)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5), keras.layers.Dense(1)])
    other.compile(optimizer="adam", loss="mse")
    before = weights_of(other)
    params = {
        "ckpt_directory": str(tmp_path / "child"),
        "epochs": 1,
        "ckpt_init_from": str(keras_parent[0]),
    }
    with pytest.raises(CheckpointError, match=r"ckpt_init_from .*shape.*Nothing was loaded"):
        candle_ckpt.restart(params, other, verbose=False)
    assert_equal_arrays(weights_of(other), before)


# -- PyTorch ----------------------------------------------------------------------------


def torch_objects(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    return {
        "model": net,
        "optimizer": opt,
        "scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5),
    }


def torch_train(objects, params, start=0):
    ckpt = candle_ckpt.CandleCkptPyTorch(params, verbose=False)
    ckpt.set_model(objects)
    J = ckpt.restart()
    net, opt = objects["model"], objects["optimizer"]
    generator = torch.Generator().manual_seed(0)
    for epoch in range(J["epoch"] if J else start, params["epochs"]):
        for _ in range(3):
            opt.zero_grad()
            loss = net(torch.randn(8, 4, generator=generator)).pow(2).mean()
            loss.backward()
            opt.step()
        objects["scheduler"].step()
        ckpt.ckpt_epoch(epoch, {"val_loss": loss.item()})
    return ckpt, J


def state_of(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_same_tensors(a, b):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def torch_parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_parent") / "save"
    objects = torch_objects(1)
    torch_train(objects, {"ckpt_directory": str(root), "epochs": 3})
    return root, state_of(objects["model"])


def test_pytorch_warm_start_loads_the_parents_weights_only(torch_parent, tmp_path, caplog):
    parent, parent_state = torch_parent
    params = {
        "ckpt_directory": str(tmp_path / "child"),
        "epochs": 2,
        "ckpt_init_from": f"{parent}:last",
    }
    objects = torch_objects(7)
    ckpt = candle_ckpt.CandleCkptPyTorch(params, verbose=False)
    ckpt.set_model(objects)
    fresh_optimizer = objects["optimizer"].state_dict()
    with caplog.at_level(logging.INFO, logger="candle_ckpt"):
        assert ckpt.restart() is None
    assert_same_tensors(state_of(objects["model"]), parent_state)
    assert "WARM START" in caplog.text
    # optimizer and scheduler fresh: no Adam state, the initial learning rate
    assert objects["optimizer"].state_dict() == fresh_optimizer
    assert objects["scheduler"].last_epoch == 0
    parent_epoch = os.path.join(parent, "ckpts", "epochs", "003")
    assert ckpt.session.checkpointer.init_from == {
        "source": parent_epoch,
        "epoch": 3,
        "checksum": read_info(parent_epoch)["checksum"],
    }
    ckpt.finish()

    _, J = torch_train(objects, params)
    assert J is None
    assert CheckpointLayout(params["ckpt_directory"]).list_epochs() == [1, 2]
    trained = state_of(objects["model"])

    # its own last wins over the init source
    again = torch_objects(8)
    with caplog.at_level(logging.INFO, logger="candle_ckpt"):
        ckpt, J = torch_train(again, {**params, "epochs": 2})
    assert J["epoch"] == 2 and "is ignored" in caplog.text
    assert_same_tensors(state_of(again["model"]), trained)
    # the resumed lineage carries its warm start's provenance on
    assert (
        ckpt.session.checkpointer.init_from
        == read_info(os.path.join(params["ckpt_directory"], "ckpts", "epochs", "002"))["init_from"]
    )


def test_pytorch_corrupt_or_unfitting_init_source_is_refused(torch_parent, tmp_path):
    import shutil

    parent = tmp_path / "parent"
    shutil.copytree(torch_parent[0], parent, symlinks=True)
    flip_last_byte_of(parent / "ckpts" / "epochs" / "002" / "model.h5")
    objects = torch_objects(4)
    before = state_of(objects["model"])
    ckpt = candle_ckpt.CandleCkptPyTorch(
        {"ckpt_directory": str(tmp_path / "child"), "epochs": 1, "ckpt_init_from": f"{parent}:2"},
        verbose=False,
    )
    ckpt.set_model(objects)
    with pytest.raises(CheckpointError, match=r"ckpt_init_from .*checksum mismatch"):
        ckpt.restart()
    assert_same_tensors(state_of(objects["model"]), before)

    # a module registered under a name the parent has no weights for
    ckpt = candle_ckpt.CandleCkptPyTorch(
        {"ckpt_directory": str(tmp_path / "child2"), "epochs": 1, "ckpt_init_from": f"{parent}:3"},
        verbose=False,
    )
    ckpt.set_model({"net2": torch.nn.Linear(4, 1)})
    with pytest.raises(CheckpointError, match=r"ckpt_init_from .*\['net2'\] are not in the"):
        ckpt.restart()


def test_a_keras_tree_is_refused_as_the_source_of_a_pytorch_run(keras_parent, tmp_path):
    objects = torch_objects(4)
    before = state_of(objects["model"])
    ckpt = candle_ckpt.CandleCkptPyTorch(
        {
            "ckpt_directory": str(tmp_path / "child"),
            "epochs": 1,
            "ckpt_init_from": str(keras_parent[0]),
        },
        verbose=False,
    )
    ckpt.set_model(objects)
    with pytest.raises(CheckpointError, match=r"ckpt_init_from .*a Keras checkpoint"):
        ckpt.restart()
    assert_same_tensors(state_of(objects["model"]), before)
