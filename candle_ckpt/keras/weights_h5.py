"""Keras 3's ``.weights.h5`` from a verified ``model.h5``, with h5py alone (no Keras).

`candle-ckpt export` uses it on a login node, so it imports neither TensorFlow nor
Keras. What it writes is what ``model.save_weights("x.weights.h5")`` writes for a
Sequential or Functional model (``keras/src/saving/saving_lib.py``: `_save_state`,
`_save_container_state`, `H5IOStore`), without the optimizer::

    /vars                                   attr name = the model's name (no datasets
                                            unless the model owns weights itself)
    /layers/<snake_case(class)>[_k]/vars    one per entry of model.layers, in that
                                            order; attr name = the layer's name;
                                            datasets "0", "1", ... = the layer's own
                                            variables, trainable then non-trainable

Keras addresses a layer by its class name (``dense``, ``dense_1``, ... in model.layers
order), not by its own name, and `load_weights` matches by those paths. ``model.h5``
(the legacy layout, `candle_ckpt.keras.h5`) records the layer names in model.layers
order and each layer's weights in the same trainable-then-non-trainable order, and the
class of each layer in ``model_config``, which is read here as JSON data only (never
deserialised). The SeedGenerator states are not written: Keras saves none either.

What cannot be mapped exactly is refused (`CheckpointFormatError`), rather than
written as a file that plain Keras would load wrongly or not at all: a subclassed
model (Keras 3 names its weights by the model's attributes, which the file does not
record), a file without ``model_config``, and a layer holding the weights of nested
layers (``model.h5`` records them flattened under the outer layer; Keras 3 needs each
nested layer's own group).
"""

from __future__ import annotations

import re
from typing import Any

import h5py

from ..core.errors import CheckpointFormatError
from ..hdf5 import (
    attr_str,
    dataset,
    dataset_array,
    group,
    layer_weights_root,
    read_names,
)
from ..hdf5_check import errors_are_the_files, load_json, open_model_file

WEIGHTS_SUFFIX = ".weights.h5"
_MAPPABLE_MODELS = ("Sequential", "Functional")


def to_snake_case(name: str) -> str:
    """Keras' `naming.to_snake_case`, which names each layer's group in `.weights.h5`."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def write_weights_h5(contents: memoryview, source: str, destination: str) -> int:
    """Write the weights in the verified model file `contents` (of `source`, for
    messages) as Keras 3's `.weights.h5` at `destination` (created or truncated).

    Everything is read and checked before `destination` is created. Does not fsync.

    Returns:
        The number of weight arrays written.

    Raises:
        CheckpointFormatError: the file is not a Keras model file, or its model cannot
            be mapped exactly (see the module docstring); the message says why.
    """
    with (
        errors_are_the_files(source, "a readable Keras HDF5 model file"),
        open_model_file(contents, source) as f,
    ):
        model_name, plan = _plan(f, contents, source)
    with h5py.File(destination, "w") as out:
        out.create_group("vars").attrs["name"] = model_name
        for path, name, arrays in plan:
            entry = out.create_group(path).create_group("vars") if path else out["vars"]
            entry.attrs["name"] = name
            for k, array in enumerate(arrays):
                entry.create_dataset(str(k), data=array)
    return sum(len(arrays) for _, _, arrays in plan)


def _plan(
    f: h5py.File, contents: memoryview, source: str
) -> tuple[str, list[tuple[str, str, list[Any]]]]:
    """(model name, [(group path, name attr, arrays)]) of the `.weights.h5` to write."""
    root = layer_weights_root(f, source)
    config = _model_config(f, source)
    classes = _layer_classes(config, source)
    plan: list[tuple[str, str, list[Any]]] = []
    used: dict[str, int] = {}
    for name in read_names(root, "layer_names"):
        if name not in classes:
            raise CheckpointFormatError(
                f"'{source}': layer '{name}' is not in the file's model_config (its layers "
                f"are {sorted(classes)}); the class that names its group in .weights.h5 is "
                f"unknown"
            )
        key = to_snake_case(classes[name])
        used[key] = used.get(key, -1) + 1
        path = f"layers/{key}" if used[key] == 0 else f"layers/{key}_{used[key]}"
        layer = group(root, name, source)
        names = read_names(layer, "weight_names")
        for weight in names:
            owner = weight.rsplit("/", 2)[-2] if weight.count("/") else None
            if owner is None or _strip_device(owner) != name:
                raise CheckpointFormatError(
                    f"'{source}': layer '{name}' ({classes[name]}) holds weight '{weight}' "
                    f"of a nested layer; model.h5 records nested layers' weights "
                    f"flattened, and Keras 3's .weights.h5 needs each nested layer's own "
                    f"group. Not exported: load the checkpoint with candle_ckpt.restart "
                    f"and call model.save_weights instead"
                )
        plan.append(
            (
                path,
                name,
                [
                    dataset_array(dataset(layer, weight, source), contents, source)
                    for weight in names
                ],
            )
        )
    if "top_level_model_weights" in root:
        top = group(root, "top_level_model_weights", source)
        names = read_names(top, "weight_names")
        if names:
            plan.append(
                (
                    "",
                    str(config["config"].get("name", "")),
                    [
                        dataset_array(dataset(top, weight, source), contents, source)
                        for weight in names
                    ],
                )
            )
    return str(config["config"].get("name", "")), plan


def _strip_device(name: str) -> str:
    """A Keras 2 weight's owner component, without TF's ':0'."""
    return name.split(":", 1)[0]


def _model_config(f: h5py.File, source: str) -> dict:
    """The root attribute model_config, parsed as JSON (data only, never deserialised)."""
    if "model_config" not in f.attrs:
        raise CheckpointFormatError(
            f"'{source}' records no model_config (the model had no serialisable config, "
            f"or this is a weights-only legacy file): the layers' classes, which name "
            f"their groups in Keras 3's .weights.h5, are unknown. Load the checkpoint "
            f"with candle_ckpt.restart and call model.save_weights instead"
        )
    text = attr_str(f.attrs["model_config"]).encode("utf8", "surrogatepass")
    config = load_json(text, source, "attribute model_config", max_string=1 << 20)
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise CheckpointFormatError(
            f"'{source}': model_config is {str(config)[:80]!r}; "
            f"expected a dict with 'class_name' and 'config'"
        )
    return config


def _layer_classes(config: dict, source: str) -> dict[str, str]:
    """{layer name: class name} of a Sequential or Functional model's config."""
    model_class = str(config.get("class_name", "")).rsplit(">", 1)[-1]
    layers = config["config"].get("layers")
    if model_class not in _MAPPABLE_MODELS or not isinstance(layers, list):
        raise CheckpointFormatError(
            f"'{source}' holds a {model_class or 'unknown'} model; only Sequential and "
            f"Functional models map exactly onto Keras 3's .weights.h5 (a subclassed "
            f"model's weights are named by its attributes, which the file does not "
            f"record). Load the checkpoint with candle_ckpt.restart and call "
            f"model.save_weights instead"
        )
    classes = {}
    for layer in layers:
        name = layer.get("name") or (layer.get("config") or {}).get("name")
        if isinstance(name, str) and isinstance(layer.get("class_name"), str):
            # a registered custom class is "package>Name"; Keras names it by Name
            classes[name] = layer["class_name"].rsplit(">", 1)[-1]
    return classes
