"""What is written: a Keras 3 model's full training state as ``model.h5``, and back, exactly.

`snapshot` copies the state to host memory on the training thread, `write` turns the
copy into ``model.h5`` with h5py alone (so it may run in a background thread), and
`restore` loads a file into a built and compiled model, validating everything first.

File layout (format version 1)
------------------------------
Keras' legacy HDF5 full-model layout plus the optimizer's variables and the RNG
states: docs/FORMAT.md, "Model files", describes it (and how upstream CANDLE files are
read); this module is its one implementation.

How it is written
-----------------
h5py holds the GIL while HDF5 writes a dataset, which stalls a training thread running
alongside a background save. So h5py only lays the file out, in memory
(`candle_ckpt.hdf5.FileImage`): every large dataset is created empty with its space
allocated at once and never filled, small arrays are written by h5py, the file is
closed, and the layout and the arrays are written into the file with ``os.pwrite``,
which releases the GIL (`candle_ckpt.hdf5.write_file`). HDF5 itself never writes to
the file system, so a full disk fails there as an OSError, never inside HDF5.

Why these choices
-----------------
- No ``training_config``: ``load_model`` would then compile an optimizer and load only
  part of its state (MEASUREMENTS.md: Adam gets 2 of N variables, the next step fails).
  The optimizer state is restored here, by position, after ``optimizer.build``.
- SeedGenerator states are not weights, so the legacy layout has no place for them; a
  fresh model starts its Dropout streams elsewhere, and a resumed run would diverge
  from an uninterrupted one. They are tiny; ``candle_ckpt_rng`` keeps them.
- Only datasets and name lists are read back: ``model_config`` is never deserialised,
  so restoring never runs code from the file.

Not in the file, because it is not the model's: the input pipeline's shuffling, the
Python/NumPy/TF global generators and Keras' global SeedGenerator (unseeded
``keras.random`` calls), callback state (e.g. ReduceLROnPlateau's counters; the learning
rate itself is an optimizer variable and is restored).
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import re
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from typing import Any, BinaryIO

import h5py
import numpy as np
import tensorflow as tf
from tensorflow.python.ops.resource_variable_ops import BaseResourceVariable

from candle_ckpt.core.errors import CheckpointFormatError, failed_after_checks
from candle_ckpt.core.logs import LibraryLogger, silent_logger
from candle_ckpt.core.restore.verify import OVERWRITTEN
from candle_ckpt.core.storage.checksum import read_file
from candle_ckpt.core.storage.direct_io import Written, aligned, aligned_arrays, copy_into
from candle_ckpt.core.text import printable
from candle_ckpt.hdf5 import (
    DIRECT_MIN_BYTES,
    FileImage,
    create_array,
    create_file,
    has_names,
    raised_in,
    writable_bytes,
    writable_contents,
    write_file,
)
from candle_ckpt.hdf5 import attr_str as _attr_str
from candle_ckpt.hdf5 import read_names as _read_names
from candle_ckpt.hdf5_check import ListedGroup, Listing, StoredArray, list_model_file

MODEL_FILE = "model.h5"
FORMAT_VERSION = 1
FORMAT_ATTR = "candle_ckpt_format_version"
WEIGHTS_ONLY_ATTR = "candle_ckpt_weights_only"
RNG_GROUP = "candle_ckpt_rng"

# HDF5 keeps attributes in a 64 KiB object header; Keras splits longer name lists.
_ATTR_LIMIT = 64512
# What TensorFlow's CPU allocator aligns tensors to (Eigen's maximum alignment).
_TENSOR_ALIGNMENT = 64
_AUTO_SUFFIX = re.compile(r"(_\d+)?(:\d+)?$")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Arrays:
    """One group of the file: dataset names (Keras' weight_names) and their values."""

    names: tuple[str, ...]
    arrays: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class TrainingState:
    """A model's training state at one instant, as read-only numpy arrays.

    Safe to hand to another thread: nothing in it refers to Keras or TensorFlow. The
    arrays are copies, or views of the variables' buffers (see `snapshot`).
    """

    keras_version: str
    backend: str
    model_config: str | None  # JSON; None if the model has no config
    layer_names: tuple[str, ...]  # every layer of model.layers, in that order
    layers: tuple[_Arrays, ...]  # one per layer, parallel to layer_names
    top_level: _Arrays
    optimizer: _Arrays | None  # None when weights_only
    rng: _Arrays
    weights_only: bool
    nbytes: int
    # Writers of more groups, each called with the file being laid out (keras/steps.py).
    extra: tuple[Callable[[h5py.File], None], ...] = ()


def snapshot(
    model: Any, weights_only: bool = False, copy: bool = True, into: TrainingState | None = None
) -> TrainingState:
    """Every weight, SeedGenerator state and (unless `weights_only`) optimizer variable.

    Runs on the training thread. With `copy`, the arrays are fresh copies in host
    memory, marked read-only. Without, they are read-only views of the buffers the
    variables hold now, where TensorFlow allows it (CPU): nothing is copied and no
    memory is added. Training after the call leaves either unchanged: TensorFlow
    updates a variable whose buffer is still referenced by copying it first
    (copy-on-write; `test_keras_h5` checks it), so views are meant for a snapshot
    written at once, before training goes on, where that copy never happens.

    `into`, an earlier snapshot of this model that nobody reads any more, is
    overwritten where the variables still match it: a copy then costs no new memory
    and no page faults (its pages are mapped already). A copy without `into` is made
    into one block of page-aligned memory in huge pages (`memory.anonymous_memory`),
    which takes fewer page faults to fill for the first time than memory numpy
    allocates page by page.

    An optimizer that was never built is built first (``restore`` does the same), so
    that the file always holds its slot variables; not while the model itself is
    unbuilt (`is_unbuilt`: a subclassed model before its first call), since an optimizer
    built without the model's variables refuses them at the first step. Raises
    ValueError if `weights_only` is false and the model has no optimizer.
    """
    optimizer = None
    if not weights_only:
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError(
                f"cannot snapshot the optimizer state of model '{model.name}': it has no "
                f"optimizer; compile it first, or pass weights_only=True"
            )
        if not is_unbuilt(model):
            _build_optimizer(model)
    layer_names = tuple(layer.name for layer in model.layers)
    if into is not None and (into.layer_names, into.weights_only) != (
        layer_names,
        bool(weights_only),
    ):
        into = None
    if copy and into is None:
        into = _blank_state(model, layer_names, optimizer, weights_only)
    spare_layers = into.layers if into else (None,) * len(layer_names)
    layers = tuple(
        _arrays(_legacy_weights(layer), f"layer '{layer.name}'", copy, spare)
        for layer, spare in zip(model.layers, spare_layers)
    )
    top_level = _arrays(
        _top_level_weights(model),
        "the model's top-level weights",
        copy,
        into.top_level if into else None,
    )
    rng = _arrays(_rng_states(model), "the SeedGenerator states", copy, into.rng if into else None)
    opt = (
        _arrays(
            optimizer.variables, "the optimizer variables", copy, into.optimizer if into else None
        )
        if optimizer
        else None
    )
    groups = layers + (top_level, rng) + ((opt,) if opt else ())
    keras_version, backend, model_config = _model_metadata(model)
    return TrainingState(
        keras_version=keras_version,
        backend=backend,
        model_config=model_config,
        layer_names=layer_names,
        layers=layers,
        top_level=top_level,
        optimizer=opt,
        rng=rng,
        weights_only=bool(weights_only),
        nbytes=sum(a.nbytes for g in groups for a in g.arrays),
    )


def _blank_state(
    model: Any, layer_names: tuple[str, ...], optimizer: Any, weights_only: bool
) -> TrainingState:
    """A TrainingState shaped like `model`'s, its arrays carved out of one block of
    huge-page memory (contents undefined), for `snapshot` to copy into."""
    groups = [_legacy_weights(layer) for layer in model.layers]
    groups += [_top_level_weights(model), _rng_states(model)]
    groups += [optimizer.variables] if optimizer is not None else []
    carved = iter(
        aligned_arrays([(v.dtype, tuple(v.shape)) for variables in groups for v in variables])
    )
    blank = [
        _Arrays(tuple(v.path for v in variables), tuple(next(carved) for _ in variables))
        for variables in groups
    ]
    *layers, top_level, rng = blank[: len(model.layers) + 2]
    return TrainingState(
        keras_version="",
        backend="",
        model_config=None,
        layer_names=layer_names,
        layers=tuple(layers),
        top_level=top_level,
        rng=rng,
        optimizer=blank[-1] if optimizer is not None else None,
        weights_only=bool(weights_only),
        nbytes=sum(aligned(_variable_nbytes(v)) for variables in groups for v in variables),
    )


def _variable_nbytes(variable: Any) -> int:
    return int(np.prod(variable.shape)) * np.dtype(variable.dtype).itemsize


def state_nbytes(model: Any, weights_only: bool = False) -> int:
    """The bytes `snapshot` would copy, computed from shapes without copying anything."""
    variables = [w for layer in model.layers for w in _legacy_weights(layer)]
    variables += list(_top_level_weights(model)) + list(_rng_states(model))
    optimizer = None if weights_only else getattr(model, "optimizer", None)
    if optimizer is not None:
        variables += list(optimizer.variables)
    return sum(_variable_nbytes(v) for v in variables)


def write(
    state: TrainingState,
    path: str | os.PathLike[str],
    progress: Callable[[int], None] | None = None,
    *,
    checksum: bool = True,
) -> Written:
    """Write `state` to `path` (created or truncated) in the layout of the module docstring;
    return what `direct_io.write_at` wrote, with the file's CRC32 (None without
    `checksum`).

    May run in a background thread. Does not fsync: the save protocol does that once for
    every file of the epoch. h5py lays the file out in memory and writes the small
    arrays there; `hdf5.write_file` writes the layout and the large arrays into the
    file (with O_DIRECT where it can), and calls `progress`, if given, with the bytes
    it wrote through the page cache so far (the save path uses it to start disk
    writeback early: `durable.WritebackStarter`).

    Raises:
        OSError: the file could not be written (disk full, quota, EIO).
    """
    # (dataset offset, array) of the arrays pwrite writes. Any: write_at is typed for a
    # memoryview, create_array for an ndarray; Python 3.10 has no Buffer type for both.
    direct: list[tuple[int, Any]] = []
    image = FileImage()
    with create_file(image) as f:
        f.attrs[FORMAT_ATTR] = FORMAT_VERSION
        f.attrs[WEIGHTS_ONLY_ATTR] = state.weights_only
        f.attrs["keras_version"] = state.keras_version
        f.attrs["backend"] = state.backend
        if state.model_config is not None:
            f.attrs["model_config"] = state.model_config.encode("utf8")
        weights = f.create_group("model_weights")
        _write_names(weights, "layer_names", state.layer_names)
        weights.attrs["backend"] = state.backend
        weights.attrs["keras_version"] = state.keras_version
        # Name order, as Keras writes them: no group name is created before its prefix.
        for name, arrays in sorted(zip(state.layer_names, state.layers), key=lambda p: p[0]):
            _write_arrays(weights.create_group(name), arrays, direct)
        _write_arrays(weights.create_group("top_level_model_weights"), state.top_level, direct)
        if state.optimizer is not None:
            _write_arrays(f.create_group("optimizer_weights"), state.optimizer, direct)
        _write_arrays(f.create_group(RNG_GROUP), state.rng, direct)
        for write_group in state.extra:
            write_group(f)
    return write_file(os.fspath(path), image, direct, progress, checksum=checksum)


@dataclass(frozen=True)
class InPlaceRead:
    """The variables whose values a restart reads straight from `path` into their own
    buffers (`plan_in_place`): no new memory to fault in, no copy to assign."""

    path: str
    offsets: dict[int, int]  # id(variable) -> the file offset of its dataset
    regions: list[tuple[int, np.ndarray]]  # (that offset, the variable's buffer, writable)
    tensors: list[Any]  # reads of those variables, which hold their buffers meanwhile
    listing: Listing | None = None  # of the file as planned


def plan_in_place(model: Any, path: str, stream: BinaryIO) -> InPlaceRead:
    """Which of `model`'s variables the candle_ckpt file open as `stream` can be read
    into in place, and where: every large contiguous dataset that a full `restore`
    would load into a variable whose buffer is host memory of its own.

    Reads only the file's metadata, logs nothing, and changes no value. The whole plan
    is checked first, as `restore` checks it: every dataset `restore` reads, whether
    into a variable's own buffer or not, must fit its variable (shape, dtype and byte
    order) and be stored as one run of bytes inside the file (`hdf5.reads_as_view`),
    so that `restore` cannot fail to read it once buffers are written. A file it
    cannot plan (an upstream file, one that does not fit the model, or that stores a
    dataset otherwise) gets no region, and `restore` reports what is wrong with it.
    `checksum.read_file` writes the buffers once the file has verified, and `restore`
    then skips the variables they hold, after checking them against the file as
    verified. A restart writes them before training, when no other tensor reads them; a
    buffer two variables share is written for the first only (the second is assigned,
    which gives it one of its own).
    """
    plan = InPlaceRead(path, {}, [], [])
    quiet = silent_logger()
    try:
        size = os.fstat(stream.fileno()).st_size
        listing = list_model_file(stream, path)
        f = listing.root
        version = _format_version(f, path)
        if version is None:
            return plan
        plan = InPlaceRead(path, {}, [], [], listing)
        pairs = _plan_weights(f, model, path, True, quiet)
        pairs += _plan_rng(f, model, path, True, quiet)
        pairs += _plan_optimizer(f, model, path, version, quiet) or []
        if not all(dataset.offset + dataset.nbytes <= size for _, dataset in pairs):
            return plan  # `restore` says what is wrong with the file
        buffers = set()
        for variable, dataset in pairs:
            large = dataset.nbytes >= DIRECT_MIN_BYTES
            held = _own_buffer(variable, dataset) if large else None
            if held is not None and held[0].ctypes.data not in buffers:
                buffers.add(held[0].ctypes.data)
                plan.offsets[id(variable)] = dataset.offset
                plan.regions.append((dataset.offset, held[0]))
                plan.tensors.append(held[1])
    except Exception:  # `restore` says what is wrong with the file
        return InPlaceRead(path, {}, [], [])
    return plan


def _own_buffer(variable: Any, dataset: StoredArray) -> tuple[np.ndarray, Any] | None:
    """(a writable byte view of the buffer `variable` holds, a read holding it), where
    that buffer is host memory of the variable's own that holds `dataset`'s values."""
    if isinstance(variable.value, tf.distribute.DistributedValues):
        return None  # one buffer per replica: writing one would leave the others
    tensor, again = tf.convert_to_tensor(variable), tf.convert_to_tensor(variable)
    try:
        first, second = np.from_dlpack(tensor), np.from_dlpack(again)
    except (BufferError, TypeError, ValueError, RuntimeError):
        return None  # not host memory: DLPack refuses rather than copy
    # Two reads of one variable share its buffer unless reading copies it (TensorFlow's
    # copy-on-read mode): then writing either read would not reach the variable.
    if (
        first.ctypes.data != second.ctypes.data
        or not first.flags.c_contiguous
        or (first.shape, first.dtype) != (dataset.shape, dataset.dtype)
    ):
        return None
    return writable_bytes(first.ctypes.data, first.nbytes), tensor


def restore(
    model: Any,
    path: str | os.PathLike[str],
    *,
    contents: memoryview | None = None,
    logger: LibraryLogger | None = None,
    weights_only: bool = False,
    in_place: InPlaceRead | None = None,
    overwritten: Set[int] = frozenset(),
    listed: Listed | None = None,
) -> dict[str, Any]:
    """Load `path` into the built and compiled `model`: weights, optimizer, RNG state.

    With `weights_only` (a warm start from another run's checkpoint) only the layers'
    weights are loaded: the optimizer and the SeedGenerator states stay as they are.

    Everything is read and checked against the model (layer count and names, weight
    counts, shapes and dtypes, optimizer and SeedGenerator variables) before the first
    assignment, so on any CheckpointFormatError the model's values are untouched (but
    for what `in_place` says was read into them already); only an unbuilt optimizer may
    have been built, which the first training step would do anyway. Reads datasets and
    name lists only; never deserialises code.

    The file is read into memory once and parsed there; its arrays are assigned from
    that memory without another copy, and where it is private memory (a verified read,
    `hdf5.writable_contents`) the large ones become the variables' buffers themselves
    (`_as_tensor`). `contents`, if given, are the file's bytes
    already read (and verified) by the caller (`checksum.read_file`): they are what is
    parsed and loaded, and the file is not opened at all. `path` then only names the
    file in messages. `in_place`, the plan those bytes were read by, names the
    variables that hold their values already (their datasets are zeros in `contents`):
    each must be at the place the verified file gives its dataset, else the model holds
    bytes that are not its values and CheckpointFormatError says so, as it does when
    `overwritten` names a variable this file does not load (the ids of variables read
    in place from a file that then failed verification).

    Returns {"optimizer_restored", "rng_restored", "legacy", "nbytes"}: `legacy` is true
    for a file without candle_ckpt's format attribute (plain Keras ``model.save``),
    `nbytes` the bytes loaded. An upstream file whose optimizer state cannot be mapped
    exactly restores its weights only, with a warning on `logger`.
    """
    log = logger if logger is not None else _log
    path = os.fspath(path)
    try:
        if contents is None:
            contents, _ = read_file(path, compute_crc=False)
        source = writable_contents(contents)
        if listed is None:
            listed = list_for_restore(contents, path, in_place)
        f, premade = listed.listing.root, listed.premade
        version = _format_version(f, path)
        ours = version is not None
        pairs = _plan_weights(f, model, path, ours, log)
        optimizer = None
        if not weights_only:
            pairs += _plan_rng(f, model, path, ours, log)
            optimizer = _plan_optimizer(f, model, path, version, log)
            pairs += optimizer or []
        offsets = in_place.offsets if in_place is not None else {}
        held = {id(v) for v, d in pairs if offsets.get(id(v), -1) == d.offset}
        if held != offsets.keys():
            raise CheckpointFormatError(
                f"'{path}' changed while it was read: the arrays read into the model's "
                f"memory are not where the file, as verified, has them. {OVERWRITTEN}"
            )
        if overwritten - {id(variable) for variable, _ in pairs}:
            raise CheckpointFormatError(
                f"'{path}' does not load every variable that a model file which failed "
                f"verification was read into. {OVERWRITTEN}"
            )
        loaded = sum(d.nbytes for v, d in pairs if id(v) in held)
        pairs = [(v, d) for v, d in pairs if id(v) not in held]
        values = [dataset.array(source, path) for _, dataset in pairs]
    except CheckpointFormatError:
        raise
    except Exception as e:
        # An error of numpy or this package reading the file is the file's; one
        # of other code (Keras, TensorFlow: planning asks the model for its variables)
        # is that code's own, kept as it is.
        if not raised_in(e, "numpy", "candle_ckpt"):
            raise
        raise CheckpointFormatError(
            f"'{path}' is not a readable HDF5 file ({type(e).__name__}: {printable(str(e)[:300])})"
        ) from e
    tensors = []  # all of them before any assign
    for (_, dataset), value in zip(pairs, values):
        tensor = premade.get((dataset.offset, dataset.shape, dataset.dtype.str))
        tensors.append(_as_tensor(value) if tensor is None else tensor)
    for k, ((variable, _), tensor) in enumerate(zip(pairs, tensors)):
        try:
            _assign(variable, tensor)
        except Exception as error:  # a check this module lacks: say what is loaded
            raise failed_after_checks(
                path, f"variable '{variable.path}'", error, f"{k} of {len(pairs)} variables"
            ) from error
    # Lookup and normalization layers derive tensors from their weights (Keras'
    # loader does this only for top-level layers; nested ones need it as well).
    for layer in model._flatten_layers(include_self=False):
        if hasattr(layer, "finalize_state") and layer.weights:
            layer.finalize_state()
    return {
        "optimizer_restored": optimizer is not None,
        "rng_restored": ours and not weights_only,
        "legacy": not ours,
        "nbytes": loaded + sum(v.nbytes for v in values),
    }


@dataclass(frozen=True)
class Listed:
    """A model file's listing as `restore` reads it (`list_for_restore`)."""

    listing: Listing
    premade: dict[tuple[int, tuple[int, ...], str], Any]  # tensors, by place


def list_for_restore(contents: Any, path: str, in_place: InPlaceRead | None = None) -> Listed:
    """The listing of the model file read as `contents` (`hdf5_check.list_model_file`)
    for `restore` (and for what else a restart reads from it first: `steps.read`):
    that of the plan `contents` were read by, where the file as read holds the same
    bytes wherever the checker read it for the plan (so HDF5 lists it the same way),
    else a new one, during which the small datasets' tensors are made
    (`_premade_tensors`)."""
    premade: dict[tuple[int, tuple[int, ...], str], Any] = {}
    if in_place is not None and in_place.listing is not None:
        planned = in_place.listing
        if planned.reads.found_in(contents, in_place.regions):
            return Listed(planned, premade)
    source = writable_contents(contents)
    return Listed(list_model_file(contents, path, _premade_tensors(source, premade)), premade)


def _premade_tensors(
    source: Any, premade: dict[tuple[int, tuple[int, ...], str], Any]
) -> Callable[[Any], None]:
    """`list_model_file`'s `found` for `restore`: the values of each small dataset of
    `source` (the file's bytes), as a new tensor in `premade` by (offset, shape,
    dtype), made while the checker walks the rest of the file. A tensor reaches no
    model there: `restore` takes those of the datasets it loads once the whole file
    is listed and checked against the model. Large datasets become tensors later, on
    `source`'s own memory (`_as_tensor`)."""

    def found(place: Any) -> None:
        offset, shape, dtype = int(place[0]), tuple(int(n) for n in place[1]), np.dtype(place[2])
        size = math.prod(shape)
        nbytes = size * dtype.itemsize
        if 0 < nbytes < DIRECT_MIN_BYTES and offset + nbytes <= len(source):
            values = np.frombuffer(source, dtype, size, offset).reshape(shape)
            premade[(offset, shape, place[2])] = tf.constant(values)

    return found


# -- what the model holds ------------------------------------------------------------


def is_unbuilt(model: Any) -> bool:
    """Whether some layer of `model` has not created its variables yet (Keras' own test
    in `Trainer._symbolic_build`)."""
    return not all(layer.built for layer in model._flatten_layers())


def _as_tensor(array: np.ndarray) -> Any:
    """`array` as a TensorFlow tensor on the array's own memory, where it is writable and
    _TENSOR_ALIGNMENT-aligned, else `array` itself.

    `tf.convert_to_tensor`, which `assign` applies to a numpy array, always copies it
    into new memory; a tensor imported through DLPack shares the array's memory, and
    assigning it lets the variable take that buffer. TensorFlow copies a buffer before
    updating it while another reference holds it, so the restored values stay the
    file's until training changes them.
    """
    if not array.flags.writeable or array.ctypes.data % _TENSOR_ALIGNMENT:
        return array
    try:
        return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    except (BufferError, TypeError, ValueError, RuntimeError, tf.errors.OpError):
        return array  # a dtype DLPack lacks: assign copies it


def _assign(variable: Any, tensor: Any) -> None:
    """`variable.assign(tensor)`, for a `tensor` of the variable's shape and dtype.

    A variable held by one TensorFlow resource variable (the optimizer's slots are
    created in a tf.function: a subclass) is assigned with the op TensorFlow's own
    `assign` ends in, after its shape check (`_match` made it): for a model of
    thousands of small variables, Keras' and TensorFlow's checks and wrappers around
    it cost several times the op itself. A variable of a distribution strategy (one
    per replica) goes through its own `assign`.
    """
    value = getattr(variable, "value", None)
    if isinstance(value, BaseResourceVariable):
        tf.raw_ops.AssignVariableOp(resource=value.handle, value=tensor)
    else:
        variable.assign(tensor)


def _legacy_weights(layer: Any) -> list[Any]:
    # The order Keras' h5 layout uses, which differs from layer.weights.
    return layer.trainable_weights + layer.non_trainable_weights


def _top_level_weights(model: Any) -> list[Any]:
    # Keras' own expression (legacy_h5_format.save_weights_to_hdf5_group): load_weights
    # counts these, so our file must hold exactly the same list.
    owned = {id(w) for w in model.weights}
    return [
        v for v in model._trainable_variables + model._non_trainable_variables if id(v) in owned
    ]


def _rng_states(model: Any) -> list[Any]:
    # model.variables = weights + SeedGenerator states (metrics are excluded).
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _build_optimizer(model: Any) -> None:
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def _arrays(variables: Sequence[Any], where: str, copy: bool, spare: _Arrays | None) -> _Arrays:
    """An _Arrays of `variables`: copies (into `spare`'s arrays where they match) or views."""
    names = tuple(v.path for v in variables)
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise CheckpointFormatError(
            f"cannot store {where}: two variables share the path '{duplicate}', and the "
            f"Keras h5 layout names each dataset by its variable's path"
        )
    if spare is not None and spare.names != names:
        spare = None
    arrays = []
    for k, variable in enumerate(variables):
        previous = spare.arrays[k] if spare is not None else None
        if copy and previous is None:
            array = np.asarray(variable.numpy())  # TF's Tensor.numpy() always copies
        else:
            # numpy's array protocol on a CPU tensor: a view of the variable's buffer
            array = np.asarray(tf.convert_to_tensor(variable))
            if copy and previous is not None:  # copy and no previous: the branch above
                array = _copy_into(previous, array)
        array.flags.writeable = False
        arrays.append(array)
    return _Arrays(names, tuple(arrays))


def _copy_into(previous: np.ndarray, array: np.ndarray) -> np.ndarray:
    """`array` copied into `previous` if it has its shape and dtype, else into new memory.

    Only a copy made earlier is overwritten (memory numpy owns, or carved out of a
    snapshot's block by `_blank_state`), never a view of some variable's buffer.
    """
    ours = previous.flags.owndata or _in_snapshot_block(previous)
    if not ours or (previous.shape, previous.dtype) != (array.shape, array.dtype):
        return array.copy()
    previous.flags.writeable = True
    copy_into(previous, array)
    return previous


def _in_snapshot_block(array: np.ndarray) -> bool:
    base = array.base
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def _model_metadata(model: Any) -> tuple[str, str, str | None]:
    """(keras_version, backend, model_config JSON or None), as Keras' h5 save computes them."""
    from keras.src.legacy.saving import json_utils, saving_options, saving_utils

    with saving_options.keras_option_scope(use_legacy_config=True):
        metadata = saving_utils.model_metadata(model, include_optimizer=False, require_config=False)
        config = metadata["model_config"]
        # The config only serves load_model; a model without a (JSON-able) config, which
        # Keras' own h5 save refuses, is still checkpointed, just not rebuildable.
        try:
            model_config = (
                json.dumps(config, default=json_utils.get_json_type) if "config" in config else None
            )
        except TypeError as e:
            _log.debug("model_config of '%s' omitted: %s", model.name, e)
            model_config = None
    return metadata["keras_version"], metadata["backend"], model_config


# -- writing -------------------------------------------------------------------------


def _write_arrays(group: h5py.Group, arrays: _Arrays, direct: list[tuple[int, np.ndarray]]) -> None:
    """Create `arrays`' datasets in `group` (`hdf5.create_array`: small ones written by
    h5py, large ones left for `write_at`, their (offset, array) appended to `direct`)."""
    _write_names(group, "weight_names", arrays.names)
    for name, array in zip(arrays.names, arrays.arrays):
        create_array(group, name, array, direct)


def _write_names(group: h5py.Group, key: str, names: Sequence[str]) -> None:
    data = np.array([n.encode("utf8") for n in names], dtype=bytes)
    if data.nbytes <= _ATTR_LIMIT:
        group.attrs[key] = data
        return
    per_chunk = max(1, _ATTR_LIMIT // data.itemsize)
    for i, start in enumerate(range(0, len(data), per_chunk)):
        group.attrs[f"{key}{i}"] = data[start : start + per_chunk]


# -- reading and validating ----------------------------------------------------------


def _format_version(f: ListedGroup, path: str) -> int | None:
    """candle_ckpt's format version of the file, or None for an upstream Keras file."""
    if FORMAT_ATTR not in f.attrs:
        return None
    version = f.attrs[FORMAT_ATTR]
    if not isinstance(version, (int, np.integer)) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointFormatError(
            f"'{path}': {FORMAT_ATTR} is {version!r}; this candle_ckpt reads versions 1 to "
            f"{FORMAT_VERSION} (a newer candle_ckpt may have written the file)"
        )
    return int(version)


def _layer_weights_root(f: ListedGroup, path: str) -> ListedGroup:
    """The group that holds `layer_names` and one group per layer: the file itself
    (`save_weights`), or its `model_weights` (`model.save`, and candle_ckpt).

    Raises:
        CheckpointFormatError: neither holds `layer_names` (not a Keras model file).
    """
    root = f
    if "layer_names" not in f.attrs and "model_weights" in f:
        root = f.group("model_weights", path)
    if not has_names(root, "layer_names"):
        raise CheckpointFormatError(
            f"'{path}' is not a Keras HDF5 model file: no 'layer_names' attribute in '{root.name}'"
        )
    return root


def _plan_weights(
    f: ListedGroup, model: Any, path: str, ours: bool, log: LibraryLogger
) -> list[tuple[Any, StoredArray]]:
    """[(variable, dataset)] for every layer weight; checks counts, shapes, dtypes, names."""
    root = _layer_weights_root(f, path)
    saved = [
        name
        for name in _read_names(root, "layer_names")
        if _read_names(root.group(name, path), "weight_names")
    ]
    layers = [layer for layer in model.layers if _legacy_weights(layer)]
    if len(saved) != len(layers):
        raise CheckpointFormatError(
            f"'{path}' holds weights for {len(saved)} layers {_brief(saved)}, the model "
            f"has {len(layers)} layers with weights {_brief([x.name for x in layers])}"
        )
    pairs, renamed = [], []
    for k, (name, layer) in enumerate(zip(saved, layers)):
        if not _same_name(name, layer.name):
            renamed.append(f"layer #{k} is '{name}' in the file, '{layer.name}' in the model")
        pairs += _match(
            root.group(name, path),
            _legacy_weights(layer),
            f"layer #{k} '{layer.name}' ('{name}' in the file)",
            path,
            renamed,
        )
    if "top_level_model_weights" in root:
        pairs += _match(
            root.group("top_level_model_weights", path),
            _top_level_weights(model),
            "group 'top_level_model_weights'",
            path,
            renamed,
        )
    if renamed and ours:
        raise CheckpointFormatError(
            f"'{path}' does not match the model's names: {'; '.join(renamed)}"
        )
    if renamed:
        log.warning(
            "'%s' was written with other names (loaded by position, as Keras does): %s",
            path,
            "; ".join(renamed),
        )
    return pairs


def _plan_rng(
    f: ListedGroup, model: Any, path: str, ours: bool, log: LibraryLogger
) -> list[tuple[Any, StoredArray]]:
    if not ours:
        if _rng_states(model):
            log.info(
                "'%s' holds no SeedGenerator state (Dropout, noise layers): their "
                "random streams continue from the model's current seeds",
                path,
            )
        return []
    if RNG_GROUP not in f:
        raise CheckpointFormatError(
            f"'{path}' has no '{RNG_GROUP}' group; every "
            f"candle_ckpt file of format {FORMAT_VERSION} has one"
        )
    return _match(
        f.group(RNG_GROUP, path),
        _rng_states(model),
        f"group '{RNG_GROUP}' (SeedGenerator states)",
        path,
    )


def _plan_optimizer(
    f: ListedGroup, model: Any, path: str, version: int | None, log: LibraryLogger
) -> list[tuple[Any, StoredArray]] | None:
    """[(variable, dataset)] for the optimizer, or None if it is not to be restored."""
    if "optimizer_weights" not in f:
        if version is not None and not f.attrs.get(WEIGHTS_ONLY_ATTR, False):
            raise CheckpointFormatError(
                f"'{path}' has no 'optimizer_weights' group, but its {WEIGHTS_ONLY_ATTR} "
                f"is not true: the file is incomplete"
            )
        return None
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        log.warning(
            "'%s' holds optimizer state but the model is not compiled: the "
            "optimizer state was not restored",
            path,
        )
        return None
    keras_version = _attr_str(f.attrs.get("keras_version", "unknown"))
    if version is None and _major(keras_version) < 3:
        log.warning(
            "'%s' was written by Keras %s, whose optimizer variables do not map "
            "one to one onto Keras 3's: weights restored, the optimizer state was "
            "not restored (it starts fresh)",
            path,
            keras_version,
        )
        return None
    _build_optimizer(model)
    group = f.group("optimizer_weights", path)
    try:
        return _match(group, optimizer.variables, f"optimizer '{optimizer.name}'", path)
    except CheckpointFormatError as e:
        if version is not None:
            raise
        log.warning("%s; weights restored, the optimizer state was not restored", e)
        return None


def _match(
    group: ListedGroup,
    variables: Sequence[Any],
    where: str,
    path: str,
    renamed: list[str] | None = None,
) -> list[tuple[Any, StoredArray]]:
    """Pair `group`'s datasets (in weight_names order) with `variables`, position by
    position, after checking count, shape and dtype. Leaf-name differences are appended
    to `renamed` if given."""
    names = _read_names(group, "weight_names")
    if len(names) != len(variables):
        raise CheckpointFormatError(
            f"'{path}': {where} has {len(names)} variables in the file {_brief(names)}, "
            f"the model expects {len(variables)} {_brief([v.path for v in variables])}"
        )
    pairs = []
    for name, variable in zip(names, variables):
        dataset = group.dataset(name, path)
        found = (tuple(dataset.shape), dataset.dtype.name)
        expected = (tuple(variable.shape), str(variable.dtype))
        if found != expected or not dataset.dtype.isnative:
            order = "" if dataset.dtype.isnative else ", not in this machine's byte order"
            raise CheckpointFormatError(
                f"'{path}': {where}, variable '{name}' is {_describe(*found)}{order} in the "
                f"file, the model's '{variable.path}' is {_describe(*expected)}"
            )
        if renamed is not None and not _same_name(name, variable.name):
            renamed.append(f"{where}: weight '{name}' in the file, '{variable.path}' in the model")
        pairs.append((variable, dataset))
    return pairs


def _describe(shape: tuple[int, ...], dtype: str) -> str:
    return f"{dtype} of shape {shape}"


def _brief(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}, ... {len(names) - limit} more]" if len(names) > limit else f"[{shown}]"


def _same_name(saved: str, current: str) -> bool:
    """Equal up to the numeric suffix of Keras' automatic names and TF's ':0'."""

    def base(name: str) -> str:
        return _AUTO_SUFFIX.sub("", name.rsplit("/", 1)[-1])

    return base(saved) == base(current)


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0
