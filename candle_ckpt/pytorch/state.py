"""What is written: a PyTorch run's training state as ``model.h5``, and back, exactly.

`snapshot` takes every registered object's state on the training thread, `write` turns
it into ``model.h5`` (h5py lays the file out in memory, `hdf5.write_file` writes it and
the large tensors without holding the GIL, so it may run in a background thread beside
training), and `restore` loads a file into the registered objects, validating
everything first and building the tensors on the verified bytes in place.

File layout (format version 2; version 1 is still read)
------------------------------------------------------
An HDF5 file holding the state as JSON and every tensor's bytes in one dataset, which
the JSON's table describes (version 1: one dataset per tensor): docs/FORMAT.md, "Model
files", describes both; this module is their one implementation. One dataset, not
thousands, because HDF5's work per dataset and attribute (creating, finding, parsing,
checking) was most of the time a model of many small tensors took to save and restore.

Why HDF5 and JSON
-----------------
Loading parses JSON and reads arrays: nothing in the file is ever executed, unlike a
pickle, and the Keras adapter's HDF5 code (contiguous datasets read as views of the
verified bytes) is shared. `torch.load(weights_only=True)` is safe too, but only for
the types its allow-list knows; upstream CANDLE's torch pickles go through it
(`restore_upstream`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import io
import json
import math
import mmap
import pickle
import random
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

import h5py
import numpy as np
import torch

from ..core.adapter import Restored
from ..core.errors import CheckpointFormatError, failed_after_checks
from ..core.logs import LibraryLogger
from ..core.restore.verify import OVERWRITTEN
from ..core.storage.direct_io import ALIGNMENT, Written, copy_into
from ..core.storage.memory import anonymous_memory
from ..hdf5 import (
    DIRECT_MIN_BYTES,
    HDF5_MAGIC,
    FileImage,
    contiguous_offset,
    create_file,
    create_unfilled,
    dataset,
    group,
    writable_bytes,
    writable_contents,
    write_file,
)
from ..hdf5_check import errors_are_the_files, load_json, open_model_file
from . import loader
from .fits import check_restorable, check_state, is_generator, sets_cuda_states

MODEL_FILE = "model.h5"
FORMAT_VERSION = 2
FORMAT_ATTR = "candle_ckpt_torch_format_version"
DATA = "data"
"""The version 2 dataset holding every tensor's bytes."""
IN_PLACE_MIN_BYTES = 256 << 20
"""From this file size on, a restart reads the modules' large tensors straight into
their memory (`plan_in_place`); below it, reading the file once into new memory and
copying the parameters out of it was measured faster (docs/PERFORMANCE.md): the
in-place read checksums the file in a first pass of its own."""
_NUMPY_PREFIX = "numpy:"
# A tensor is built in place on the bytes read only where they start on this boundary
# (what a CPU allocator guarantees); elsewhere it is copied. Version 2 files put every
# tensor on one.
_TENSOR_ALIGNMENT = 64
# The numpy dtype kinds a version 2 table may name (bool, integers, floats, complex:
# the dataset kinds `hdf5_check` lets a version 1 file hold).
_NUMBER_KINDS = "biufc"


@dataclass(frozen=True)
class TrainingState:
    """The registered objects' state at one instant: JSON text plus numpy arrays.

    Safe to hand to another thread: nothing in it refers to a live torch object. The
    arrays are copies, or views of the tensors' memory (see `snapshot`). `offsets`
    places each array in the file's `data` dataset (`data_layout`); a copied snapshot
    holds the whole of that dataset's bytes in `block`, each array a view of it.
    """

    state: str
    arrays: tuple
    dtypes: tuple  # torch dtype name (or "numpy:<dtype>") of each array
    shapes: tuple
    offsets: tuple  # of each array in the data dataset
    data_nbytes: int
    block: np.ndarray | None  # uint8: the data dataset's bytes (a copied snapshot)
    weights_only: bool
    nbytes: int


def uninitialized(objects: Mapping[str, Any]) -> list[str]:
    """ "entry.key" of every parameter or buffer a lazy module (`torch.nn.LazyLinear`...)
    has not initialised yet: it gets its shape, in place, at the module's first call."""
    return [
        f"{name}.{key}"
        for name, value in objects.items()
        if isinstance(value, torch.nn.Module)
        for key, tensor in value.state_dict().items()
        if torch.nn.parameter.is_lazy(tensor)
    ]


def object_states(objects: Mapping[str, Any], weights_only: bool) -> dict:
    """{name: state} of the objects a snapshot holds (modules only if `weights_only`)."""
    return {
        name: value.get_state()
        if is_generator(value)
        else loader.loader_state(value)
        if loader.is_stateful_loader(value)
        else value.state_dict()
        for name, value in objects.items()
        if not weights_only or isinstance(value, torch.nn.Module)
    }


def rng_states() -> dict:
    """The global random states: torch CPU, CUDA (when initialised), numpy, random."""
    states: dict = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def state_nbytes(objects: Mapping[str, Any], weights_only: bool) -> int:
    """The bytes a copied snapshot holds, from the tensors' sizes, copying nothing."""
    total = 0

    def count(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor) and torch.nn.parameter.is_lazy(value):
            return  # no size yet (state_exists says so)
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, np.ndarray):
            total += value.nbytes
        elif isinstance(value, Mapping):
            for item in value.values():
                count(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                count(item)

    count(object_states(objects, weights_only))
    count(rng_states())
    return total


def snapshot(
    objects: Mapping[str, Any],
    weights_only: bool = False,
    copy: bool = True,
    into: TrainingState | None = None,
) -> TrainingState:
    """Every registered object's state and the random states, now (training thread).

    With `copy`, the arrays are copied into one block of huge-page memory laid out as
    the file's `data` dataset (`data_layout`: large arrays on `direct_io.ALIGNMENT`
    boundaries), so that `write` writes it whole with O_DIRECT from where it is; into
    `into`'s block (an older snapshot nobody reads any more) when it is laid out the
    same. Without, CPU tensors are views of their memory: meant for a save written at
    once, before the next optimizer step changes them in place.
    """
    arrays: list = []
    dtypes: list = []
    shapes: list = []

    def array_of(value: Any, path: _Path) -> int:
        if isinstance(value, torch.Tensor):
            if _is_lazy(value) or value.layout != torch.strided or value.is_quantized:
                raise _unsavable(value, path)
            dtype = _DTYPE_NAMES.get(value.dtype) or str(value.dtype).removeprefix("torch.")
            shapes.append(tuple(value.shape))
            host = value.detach().cpu().contiguous()
            try:
                array = host.numpy()
            except TypeError:  # no numpy dtype: keep the raw bytes
                array = host.reshape(-1).view(torch.uint8).numpy()
        else:
            dtype, array = _NUMPY_PREFIX + value.dtype.str, np.ascontiguousarray(value)
            shapes.append(value.shape)
        arrays.append(array)
        dtypes.append(dtype)
        return len(arrays) - 1

    with _collector_paused():
        encoded = {
            "objects": _encode(object_states(objects, weights_only), "state", array_of),
            "rng": _encode({} if weights_only else rng_states(), "rng", array_of),
        }
    offsets, data_nbytes = data_layout([array.nbytes for array in arrays])
    block = None
    if copy:
        reusable = into is not None and (into.offsets, into.data_nbytes) == (
            tuple(offsets),
            data_nbytes,
        )
        block = into.block if reusable and into is not None else None
        if block is None:
            block = np.frombuffer(anonymous_memory(data_nbytes), np.uint8, data_nbytes)
        for k, (array, offset) in enumerate(zip(arrays, offsets)):
            target = np.frombuffer(block, array.dtype, array.size, offset).reshape(array.shape)
            copy_into(target, array)
            arrays[k] = target
    for array in arrays:
        array.flags.writeable = False
    encoded["tensors"] = [
        [dtype, list(shape), offset, array.nbytes]
        for dtype, shape, offset, array in zip(dtypes, shapes, offsets, arrays)
    ]
    encoded["byteorder"] = sys.byteorder
    return TrainingState(
        json.dumps(encoded),
        tuple(arrays),
        tuple(dtypes),
        tuple(shapes),
        tuple(offsets),
        data_nbytes,
        block,
        weights_only,
        sum(a.nbytes for a in arrays),
    )


_is_lazy = torch.nn.parameter.is_lazy
# The names `snapshot` writes of the common dtypes, without formatting each tensor's.
_DTYPE_NAMES = {
    dtype: str(dtype).removeprefix("torch.")
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64)
}


def _unsavable(value: torch.Tensor, path: _Path) -> CheckpointFormatError:
    """The error for a tensor `snapshot` cannot save."""
    if _is_lazy(value):
        return CheckpointFormatError(
            f"cannot save {_path_text(path)}: an uninitialised parameter of a lazy module "
            f"(torch.nn.LazyLinear...), which has no shape until the module's "
            f"first call; call the model on a batch before the first save"
        )
    return CheckpointFormatError(
        f"cannot save {_path_text(path)}: a {value.layout} tensor ({value.dtype}); expected "
        f"a dense tensor (call .to_dense() in state_dict)"
    )


def data_layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """(offset of each of arrays of `sizes` bytes in the data dataset, its size): in
    order, those of DIRECT_MIN_BYTES or more on an ALIGNMENT boundary (written with
    O_DIRECT, read straight into a module's memory), the others packed on
    _TENSOR_ALIGNMENT boundaries (built in place on the bytes read)."""
    offsets, end = [], 0
    for size in sizes:
        step = ALIGNMENT if size >= DIRECT_MIN_BYTES else _TENSOR_ALIGNMENT
        end = -(-end // step) * step
        offsets.append(end)
        end += size
    return offsets, end


_Path = Any
"""Where a value is in the state, built only for an error message (`_path_text`): the
root's name, or (the parent's path, "item" / "key" / "a key" / "metadata", the key)."""


def _path_text(path: _Path) -> str:
    """`path` as the error messages say it: state['model']['0.weight']."""
    suffixes = []
    while isinstance(path, tuple):
        path, kind, key = path
        suffixes.append(
            {
                "item": f"[{key!r:.80}]",
                "key": f" key {key!r:.80}",
                "a key": " key",
                "metadata": "._metadata",
            }[kind]
        )
    return str(path) + "".join(reversed(suffixes))


def _encode(value: Any, path: _Path, array_of: Callable[[Any, _Path], int]) -> Any:
    """`value` as JSON-able data, its tensors and arrays replaced by their index."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return {"tensor": array_of(value, path)}
    if isinstance(value, np.ndarray):
        return {"ndarray": array_of(value, path)}
    if isinstance(value, dict):
        items = [
            [
                key if isinstance(key, str) else _encode(key, (path, "key", key), array_of),
                _encode(item, (path, "item", key), array_of),
            ]
            for key, item in value.items()
        ]
        if isinstance(value, collections.OrderedDict):
            metadata = getattr(value, "_metadata", None)
            return {
                "odict": items,
                "metadata": None
                if metadata is None
                else _encode(dict(metadata), (path, "metadata", None), array_of),
            }
        return {"dict": items}
    if isinstance(value, list):
        return [_encode(item, (path, "item", k), array_of) for k, item in enumerate(value)]
    if isinstance(value, tuple):
        return {
            "tuple": [_encode(item, (path, "item", k), array_of) for k, item in enumerate(value)]
        }
    if isinstance(value, np.generic):
        return _encode(value.item(), path, array_of)
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    raise CheckpointFormatError(
        f"cannot save {_path_text(path)}: a {type(value).__module__}."
        f"{type(value).__qualname__} ({value!r:.80}); expected tensors, numpy arrays, "
        f"numbers, strings, None and lists, tuples and dicts of them (a state_dict "
        f"holding other objects cannot be restored without unpickling)"
    )


def write(
    state: TrainingState,
    path: str,
    progress: Callable[[int], None] | None = None,
    *,
    checksum: bool = True,
) -> Written:
    """Write `state` to `path` (created or truncated), in the module docstring's layout;
    return what `direct_io.write_at` wrote, with the file's CRC32 (None without
    `checksum`).

    h5py lays the file out in memory (a few kilobytes: the attributes, the JSON and the
    space of the data dataset); `hdf5.write_file` writes it and the data (with O_DIRECT
    where it can), releasing the GIL, so a background save leaves the training thread
    running, and alone touches the file system, so a full disk never fails inside
    HDF5. No fsync (the protocol does it). `progress` is called with the bytes written
    through the page cache so far.

    Raises:
        OSError: the file could not be written (disk full, quota, EIO).
    """
    image = FileImage()
    with create_file(image) as f:
        f.attrs[FORMAT_ATTR] = FORMAT_VERSION
        f.attrs["weights_only"] = state.weights_only
        f.attrs["torch_version"] = str(torch.__version__)
        # A dataset, not an attribute: HDF5 attributes hold at most 64 KiB.
        f.create_dataset("state", data=np.frombuffer(state.state.encode("utf8"), np.uint8))
        start = create_unfilled(f, DATA, (state.data_nbytes,), np.uint8).id.get_offset()
        regions = [(start + offset, buffer) for offset, buffer in _data_regions(state)]
    return write_file(path, image, regions, progress, checksum=checksum)


def _data_regions(state: TrainingState) -> list[tuple[int, Any]]:
    """(offset in the data dataset, bytes) to write for `state`: its block whole, or
    each large array from where it is and each run of small ones between them packed
    into one new buffer (one write, not one per tensor)."""
    if state.block is not None:
        return [(0, state.block)] if state.data_nbytes else []
    regions: list[tuple[int, Any]] = []
    run: list[tuple[int, np.ndarray]] = []

    def pack() -> None:
        start, (last, array) = run[0][0], run[-1]
        nbytes = last + array.nbytes - start
        # page-aligned memory where O_DIRECT may write it from where it is
        memory = anonymous_memory(nbytes, False) if nbytes >= DIRECT_MIN_BYTES else None
        buffer = memoryview(memory if memory is not None else bytearray(nbytes))[:nbytes]
        for offset, small in run:
            buffer[offset - start : offset - start + small.nbytes] = small.data.cast("B")
        regions.append((start, buffer))
        run.clear()

    for offset, array in zip(state.offsets, state.arrays):
        if array.nbytes >= DIRECT_MIN_BYTES:
            if run:
                pack()
            regions.append((offset, array))
        elif array.nbytes:
            run.append((offset, array))
    if run:
        pack()
    return regions


# -- reading ---------------------------------------------------------------------------


def read(contents: memoryview, path: str, in_place: InPlaceRead | None = None) -> tuple[dict, bool]:
    """The file's state ({"objects", "rng"} decoded, tensors on the CPU) and weights_only.

    `in_place` (`plan_in_place`'s, for the file these `contents` were read from) names
    the tensors read into the modules' already: each decodes to the module's tensor
    itself, once the verified file is found to hold it where it was read from.

    Raises:
        CheckpointFormatError: not a candle_ckpt PyTorch file, or malformed (the
            message names what and where), or not holding the tensors of `in_place`
            where they were read from.
    """
    targets = in_place.targets if in_place is not None else {}
    with (
        errors_are_the_files(path, "a readable candle_ckpt PyTorch file"),
        open_model_file(contents, path) as f,
    ):
        encoded, weights_only, stored = _contents(f, len(contents), path)
        source = writable_contents(contents)
        # In place only on private memory starting on a boundary (a restart's read).
        writable = not source.readonly and not _address(source) % _TENSOR_ALIGNMENT
        values = []
        for k, found in enumerate(stored):
            target = targets.get(k)
            if target is None:
                values.append(_value(found, source, writable))
            elif found.offset == target.offset and _fits(found, target.tensor):
                values.append(target.tensor)
            else:
                raise CheckpointFormatError(
                    f"'{path}' changed while it was read: {found.name}, read into the "
                    f"model's memory, is not where the file, as verified, has it. "
                    f"{OVERWRITTEN}"
                )
    state = _decoded(encoded, values, path)
    references = _references(encoded)
    for k, target in targets.items():
        saved = state["objects"].get(target.name)
        if (
            references[k] != 1
            or not isinstance(saved, dict)
            or saved.get(target.key) is not target.tensor
        ):
            raise CheckpointFormatError(
                f"'{path}' changed while it was read: {stored[k].name}, read into the "
                f"model's memory, is not the file's '{target.name}.{target.key}' alone. "
                f"{OVERWRITTEN}"
            )
    return state, weights_only


def _contents(f: h5py.File, size: int, path: str) -> tuple[Any, bool, list[_Stored]]:
    """The open file's 'state' JSON as parsed (without the version 2 table), its
    weights_only attribute and where each tensor is stored, once its format attribute
    is found to be one this candle_ckpt reads and every tensor is found to be stored as
    its description says, inside the file (a file of `size` bytes)."""
    if FORMAT_ATTR not in f.attrs:
        raise CheckpointFormatError(
            f"'{path}' is an HDF5 file without '{FORMAT_ATTR}': not written by "
            f"candle_ckpt's PyTorch adapter (a Keras checkpoint?)"
        )
    version = f.attrs[FORMAT_ATTR]
    if not isinstance(version, (int, np.integer)) or not 1 <= version <= FORMAT_VERSION:
        shown = int(version) if isinstance(version, (int, np.integer)) else repr(version)
        raise CheckpointFormatError(
            f"'{path}': {FORMAT_ATTR} is {shown}; this candle_ckpt reads "
            f"versions 1 to {FORMAT_VERSION} (a newer candle_ckpt wrote it?)"
        )
    text = np.asarray(dataset(f, "state", path)[()], np.uint8).tobytes()
    encoded = load_json(text, path, "dataset 'state'")
    weights_only = bool(f.attrs.get("weights_only", False))
    if version == 1:
        tensors = group(f, "tensors", path)
        stored = [
            _stored_v1(dataset(tensors, str(k), path), size, path) for k in range(len(tensors))
        ]
        return encoded, weights_only, stored
    if not isinstance(encoded, dict) or set(encoded) != _V2_KEYS:
        found = sorted(encoded) if isinstance(encoded, dict) else encoded
        raise CheckpointFormatError(
            f"'{path}': dataset 'state' is {found!r:.80}; expected a dict with keys "
            f"{sorted(_V2_KEYS)}"
        )
    if encoded.pop("byteorder") != sys.byteorder:
        raise CheckpointFormatError(
            f"'{path}' holds its tensors in another byte order than this machine's "
            f"({sys.byteorder}); restart on a machine of the byte order that wrote it"
        )
    return encoded, weights_only, _stored_v2(f, encoded, size, path)


_V2_KEYS = {"objects", "rng", "tensors", "byteorder"}
# How many dimensions a tensor of a version 2 file may have (HDF5's own limit, which
# bounded version 1 files).
_MAX_DIMENSIONS = 32


class _Layout(NamedTuple):
    """What a stored tensor decodes to, from its description (v1: the dataset's
    attributes; v2: its entry of the table), checked against how it is stored."""

    dtype: Any  # torch.dtype of a tensor, np.dtype of an array ("numpy:" prefix)
    shape: tuple[int, ...]
    stored: np.dtype  # the dtype of its bytes: uint8 for a dtype numpy lacks (bfloat16)
    is_array: bool  # a numpy array, not a tensor
    raw: bool  # a tensor's bytes stored as uint8 (a dtype numpy lacks, e.g. bfloat16)


class _Stored(NamedTuple):
    """A tensor of a model file: what it decodes to, and where its bytes are (a
    NamedTuple, not a dataclass: a restart makes thousands)."""

    name: str  # for messages: "dataset '/tensors/3'" (v1), "tensor 3 of '/data'" (v2)
    layout: _Layout
    offset: int  # in the file; 0 when nbytes is 0
    nbytes: int


def _stored_v1(found: h5py.Dataset, size: int, path: str) -> _Stored:
    """Version 1: the dataset `found`, of a file of `size` bytes, once its attributes
    (torch_dtype, shape) are found to be ones `snapshot` writes and to describe the
    dataset itself (dtype, byte order, shape), and it to be stored as one run of bytes
    inside the file. Reads no values."""
    name = f"dataset '{found.name}'"
    dtype_name = found.attrs.get("torch_dtype", "")
    dtype_name = (
        dtype_name.decode("utf8", "replace") if isinstance(dtype_name, bytes) else str(dtype_name)
    )
    attr = np.asarray(found.attrs.get("shape", np.zeros(0, np.int64)))
    if attr.ndim != 1 or attr.dtype.kind not in "iu" or (attr < 0).any():
        raise CheckpointFormatError(
            f"'{path}': {name}: attribute shape is {attr!r:.80}; expected a list of sizes"
        )
    shape = tuple(int(n) for n in attr)
    layout = _layout_of(dtype_name, shape, f"'{path}': {name}: attribute torch_dtype")
    expected = (layout.stored, shape if not layout.raw else (math.prod(shape) * _itemsize(layout),))
    if (found.dtype, found.shape) != expected:
        native = (
            ""
            if layout.raw or layout.is_array
            else f" ({layout.stored}, this machine's byte order)"
        )
        raise CheckpointFormatError(
            f"'{path}': {name} is {found.dtype} {found.shape}; its attributes say "
            f"{dtype_name[:40]!r} of shape {shape}{native}"
        )
    nbytes = found.size * found.dtype.itemsize
    offset = contiguous_offset(found) if nbytes else 0
    if offset is None or offset + nbytes > size:
        raise CheckpointFormatError(
            f"'{path}': {name} ({nbytes} bytes) is not one run of bytes inside the file "
            f"({size} bytes)"
        )
    return _Stored(name, layout, offset, nbytes)


def _stored_v2(f: h5py.File, encoded: dict, size: int, path: str) -> list[_Stored]:
    """Version 2: every entry of the JSON's table (`encoded`'s "tensors", which this
    takes out of it: [dtype, shape, offset, nbytes], the offset within the data
    dataset), once each is found to be one `snapshot` writes: a dtype it writes, a
    shape of sizes, nbytes those of the dtype and shape, inside the data dataset, which
    is one run of uint8 inside the file (a file of `size` bytes), and no two
    overlapping. A refusal names the entry and where the state refers to it."""
    table = encoded.pop("tensors")
    data = dataset(f, DATA, path)
    length = data.size if data.dtype == np.uint8 and data.ndim == 1 else None
    start = contiguous_offset(data) if length else 0
    if length is None or start is None or start + length > size:
        raise CheckpointFormatError(
            f"'{path}': dataset '/{DATA}' is {data.dtype} {data.shape}; expected one run of "
            f"uint8 bytes inside the file ({size} bytes)"
        )
    if not isinstance(table, list):
        raise CheckpointFormatError(
            f"'{path}': the table of tensors is {table!r:.80}; expected a list"
        )

    def named(k: int) -> str:
        return f"'{path}': tensor {k} of '/{DATA}' ({_referred_as(encoded, k)})"

    stored = []
    for k, entry in enumerate(table):
        if not (
            type(entry) is list
            and len(entry) == 4
            and type(entry[0]) is str
            and type(entry[1]) is list
            and len(entry[1]) <= _MAX_DIMENSIONS
            and _sizes(entry[1])
            and _sizes(entry[2:])
        ):
            raise CheckpointFormatError(
                f"{named(k)} is described as {entry!r:.120}; expected [dtype name, "
                f"[sizes], offset, bytes]"
            )
        dtype_name, shape, offset, nbytes = entry
        layout = _cached_layout(dtype_name, tuple(shape)) or _layout_of(
            dtype_name, tuple(shape), f"{named(k)}: its dtype"
        )
        if nbytes != math.prod(shape) * _itemsize(layout) or offset + nbytes > length:
            raise CheckpointFormatError(
                f"{named(k)} is described as {nbytes} bytes at offset {offset}; a "
                f"{dtype_name} of shape {tuple(shape)} is "
                f"{math.prod(shape) * _itemsize(layout)} bytes, and the data dataset "
                f"holds {length}"
            )
        name = f"tensor {k} of '/{DATA}'"
        stored.append(_Stored(name, layout, start + offset if nbytes else 0, nbytes))
    end, previous = 0, 0
    for offset, nbytes, k in sorted((s.offset, s.nbytes, k) for k, s in enumerate(stored)):
        if nbytes and offset < end:
            raise CheckpointFormatError(
                f"{named(k)} overlaps tensor {previous} ({_referred_as(encoded, previous)}): "
                f"their bytes are shared; candle_ckpt writes every tensor apart"
            )
        if nbytes:
            end, previous = offset + nbytes, k
    return stored


def _referred_as(encoded: dict, index: int) -> str:
    """Where the state JSON `encoded` (its "objects" and "rng") refers to stored tensor
    `index`, as the messages name a place in the state (for a refusal only)."""
    pending: list[tuple[Any, _Path]] = [(encoded.get(root), root) for root in ("rng", "objects")]
    while pending:
        value, where = pending.pop()
        if isinstance(value, list):
            pending.extend((item, (where, "item", k)) for k, item in enumerate(value))
        elif isinstance(value, dict) and value:
            tag, body = next(iter(value.items()))
            if tag in ("tensor", "ndarray") and type(body) is int and body == index:
                return _path_text(where)
            if tag == "tuple" and isinstance(body, list):
                pending.extend((item, (where, "item", k)) for k, item in enumerate(body))
            elif tag in ("dict", "odict") and isinstance(body, list):
                pending.extend(
                    (item[1], (where, "item", item[0] if type(item[0]) is str else "..."))
                    for item in body
                    if isinstance(item, list) and len(item) == 2
                )
    return "referred to nowhere"


def _sizes(values: list) -> bool:
    """Whether `values` are all sizes of a file: ints (never bools) from 0 below 2^63."""
    return all(type(value) is int and 0 <= value < 2**63 for value in values)


def _layout_of(name: str, shape: tuple[int, ...], what: str) -> _Layout:
    """The `_Layout` of a tensor described as dtype `name` (a torch dtype name, or
    "numpy:" and a numpy dtype of numbers in this machine's byte order) and `shape`.

    Raises:
        CheckpointFormatError: `name` is none of these; `what` names it.
    """
    layout = _cached_layout(name, shape)
    if layout is None:
        expected = (
            "a numpy dtype of numbers in this machine's byte order"
            if name.startswith(_NUMPY_PREFIX)
            else "a torch dtype name such as 'float32'"
        )
        raise CheckpointFormatError(f"{what} is {name[:40]!r}; expected {expected}")
    return layout


@functools.lru_cache(maxsize=1024)
def _cached_layout(name: str, shape: tuple[int, ...]) -> _Layout | None:
    """`_layout_of`, None for a dtype `snapshot` does not write (the layers of a model
    share their few shapes)."""
    described = _described_dtype(name)
    if described is None:
        return None
    dtype, stored, is_array, raw = described
    return _Layout(dtype, shape, stored, is_array, raw)


@functools.lru_cache(maxsize=64)
def _described_dtype(name: str) -> tuple[Any, np.dtype, bool, bool] | None:
    """(dtype, dtype of its stored bytes, is a numpy array, raw) of the dtype `name`
    describes (`_Layout`), if it is one `snapshot` writes, else None."""
    if name.startswith(_NUMPY_PREFIX):
        try:
            array_dtype = np.dtype(name[len(_NUMPY_PREFIX) :])
        except (TypeError, ValueError):
            return None
        if array_dtype.kind not in _NUMBER_KINDS or not array_dtype.isnative:
            return None
        return array_dtype, array_dtype, True, False
    dtype = getattr(torch, name, None) if name.isidentifier() else None
    try:
        with warnings.catch_warnings():  # quantized dtypes warn of their deprecation
            warnings.simplefilter("ignore")
            if not isinstance(dtype, torch.dtype) or torch.empty(0, dtype=dtype).is_quantized:
                return None
    except (TypeError, RuntimeError):
        return None
    try:
        return dtype, torch.empty(0, dtype=dtype).numpy().dtype, False, False
    except TypeError:  # no numpy dtype: `snapshot` writes the bytes
        return dtype, np.dtype(np.uint8), False, True


def _itemsize(layout: _Layout) -> int:
    return int(layout.dtype.itemsize)


def _address(contents: memoryview) -> int:
    """Where `contents` start in memory (0 when empty)."""
    return int(np.frombuffer(contents, np.uint8, 1).ctypes.data) if contents.nbytes else 0


def _array(found: _Stored, contents: Any) -> np.ndarray:
    """The stored tensor's bytes in `contents` (the file's), as a numpy array of its
    stored dtype: a view."""
    layout = found.layout
    count = found.nbytes // layout.stored.itemsize
    array = np.frombuffer(contents, layout.stored, count, found.offset) if count else None
    if array is None:
        array = np.empty(0, layout.stored)
    return array if layout.raw else array.reshape(layout.shape)


def _value(found: _Stored, contents: Any, writable: bool) -> Any:
    """The stored tensor (or array) `found` of the file's `contents`: a tensor built on
    them in place where they are `writable` (see `hdf5.writable_contents`) and it
    starts on a _TENSOR_ALIGNMENT boundary (every tensor of a version 2 file; the
    large ones of a version 1 file), else on a copy. The modules' parameters are then
    copied from it, and the optimizer keeps it as its state."""
    layout = found.layout
    if writable and found.nbytes and not layout.is_array and not found.offset % _TENSOR_ALIGNMENT:
        count = found.nbytes // _itemsize(layout)
        return torch.frombuffer(
            contents, dtype=layout.dtype, count=count, offset=found.offset
        ).view(layout.shape)
    return _built(_array(found, contents), layout)


def _built(array: np.ndarray, layout: _Layout) -> Any:
    """The tensor (or array) of `layout` on `array`, its stored bytes (`_array`): on a
    copy unless they are writable and on a _TENSOR_ALIGNMENT boundary."""
    if layout.is_array:
        return array.copy()
    if not array.flags.writeable or array.ctypes.data % _TENSOR_ALIGNMENT:
        array = array.copy()
    tensor = torch.from_numpy(array)
    if layout.raw:
        tensor = tensor.view(layout.dtype)
    return tensor.reshape(layout.shape)


def _decoded(encoded: Any, values: list, path: str) -> dict:
    """The 'state' JSON `encoded` decoded, its tensor references replaced by `values`."""
    if not isinstance(encoded, dict) or set(encoded) != {"objects", "rng"}:
        found = sorted(encoded) if isinstance(encoded, dict) else encoded
        raise CheckpointFormatError(
            f"'{path}': dataset 'state' is {found!r:.80}; "
            f"expected a dict with keys ['objects', 'rng']"
        )
    state = {key: _decode(encoded[key], values, path, key) for key in ("objects", "rng")}
    if not all(isinstance(state[key], dict) for key in state):
        raise CheckpointFormatError(
            f"'{path}': 'objects' and 'rng' of dataset 'state' "
            f"are {[type(v).__name__ for v in state.values()]}; "
            f"expected dicts"
        )
    return state


def _decode(value: Any, values: list, path: str, where: _Path) -> Any:
    """The encoded `value` (of the file `path`, at `where` in its state) decoded, its
    tensor references replaced by `values`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(item, values, path, (where, "item", k)) for k, item in enumerate(value)]
    if not isinstance(value, dict) or len(value) not in (1, 2):
        raise CheckpointFormatError(
            f"'{path}': {_path_text(where)} is {value!r:.80}; expected a "
            f"tagged value (see candle_ckpt.pytorch.state)"
        )
    tag, body = next(iter(value.items()))
    if tag in ("tensor", "ndarray"):
        if type(body) is not int or not 0 <= body < len(values):
            raise CheckpointFormatError(
                f"'{path}': {_path_text(where)} refers to tensor {body!r}; the file has "
                f"{len(values)}"
            )
        found = values[body]
        if isinstance(found, torch.Tensor) != (tag == "tensor"):
            raise CheckpointFormatError(
                f"'{path}': {_path_text(where)}: tensor {body} is not a {tag}"
            )
        return found
    if tag == "dtype" and isinstance(getattr(torch, str(body), None), torch.dtype):
        return getattr(torch, body)
    if tag == "tuple" and isinstance(body, list):
        return tuple(_decode(item, values, path, (where, "item", k)) for k, item in enumerate(body))
    if tag in ("dict", "odict") and isinstance(body, list):
        result: dict = {} if tag == "dict" else collections.OrderedDict()
        for item in body:
            if not isinstance(item, list) or len(item) != 2:
                raise CheckpointFormatError(
                    f"'{path}': {_path_text(where)} holds {item!r:.80}; expected [key, value] pairs"
                )
            key = item[0]
            if type(key) is not str:  # a string is a key as it is
                key = _decode(key, values, path, (where, "a key", None))
                if not _is_key(key):
                    raise CheckpointFormatError(
                        f"'{path}': {_path_text(where)} has a key {key!r:.80}; expected a "
                        f"number, a string, None or a tuple of them"
                    )
            result[key] = _decode(item[1], values, path, (where, "item", key))
        if tag == "odict" and value.get("metadata") is not None:
            metadata = _decode(value["metadata"], values, path, (where, "metadata", None))
            if not isinstance(metadata, dict):
                raise CheckpointFormatError(
                    f"'{path}': {_path_text(where)}._metadata is {metadata!r:.80}; expected a dict"
                )
            result._metadata = collections.OrderedDict(metadata)  # type: ignore[attr-defined]
        return result
    raise CheckpointFormatError(
        f"'{path}': {_path_text(where)} is {value!r:.80}; expected a tagged "
        f"value (tensor, ndarray, tuple, dict, odict, dtype)"
    )


def _is_key(key: Any) -> bool:
    """Whether a decoded dict key is one `snapshot` writes: hashable, never a tensor."""
    if isinstance(key, tuple):
        return all(_is_key(item) for item in key)
    return key is None or isinstance(key, (bool, int, float, str, torch.dtype))


def _references(encoded: Any) -> collections.Counter[int]:
    """How many times the 'state' JSON `encoded` refers to each stored tensor (counting
    any "tensor" or "ndarray" key, so never fewer times than `_decode` uses it)."""
    found = []
    pending = [encoded]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if type(item) is int:
                    if key in ("tensor", "ndarray"):
                        found.append(item)
                elif isinstance(item, (dict, list)):
                    pending.append(item)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, (dict, list)):
                    pending.append(item)
    return collections.Counter(found)


def _placeholder(found: _Stored) -> Any:
    """A stored tensor as `read` would decode it, for every check but of its values: a
    tensor of its dtype and shape on the meta device (no memory), or a read-only array
    of its dtype and shape that holds one item."""
    layout = found.layout
    if layout.is_array:
        return np.broadcast_to(np.zeros((), layout.dtype), layout.shape)
    return torch.empty(layout.shape, dtype=layout.dtype, device="meta")


# -- reading into the modules' own memory ----------------------------------------------


@dataclass(frozen=True)
class InPlaceTarget:
    """A module tensor that a restart reads its stored bytes straight into."""

    offset: int  # of the tensor's bytes in the file
    name: str  # the registered module's entry
    key: str  # the tensor's key in the module's state dict
    tensor: torch.Tensor  # the state dict's tensor: the module's memory itself
    buffer: np.ndarray  # that memory as writable bytes


@dataclass(frozen=True)
class InPlaceRead:
    """The tensors a restart reads from `path` straight into the modules' own
    (`plan_in_place`): no new memory to fault in, no copy for load_state_dict."""

    path: str
    targets: dict[int, InPlaceTarget]  # stored tensor's index -> where it is read

    @property
    def regions(self) -> list[tuple[int, np.ndarray]]:
        return [(target.offset, target.buffer) for target in self.targets.values()]


def plan_in_place(objects: Mapping[str, Any], path: str, stream: BinaryIO) -> InPlaceRead:
    """Which stored tensors of the candle_ckpt file open as `stream` a restart can read
    straight into the registered modules' tensors, and where: every one of
    DIRECT_MIN_BYTES or more that the file refers to once, as a module's state-dict
    entry whose tensor is dense CPU memory of its own (`_own_buffer`).

    Reads the file's metadata and the values of its random states, and changes
    nothing. The whole plan is checked first: every tensor `read` will read, against
    its description and where it is stored (`_contents`), and the whole state against
    the objects, as `restore` checks it (`check_restorable`; tensors but the random
    states without their values): a file that `restore` would refuse, or that it
    cannot read, gets no target, so no tensor is written before the file is refused.
    `checksum.read_file` writes the tensors once the file has verified, and `read`
    then decodes those entries to the tensors themselves, so that load_state_dict
    copies nothing onto them. A tensor two entries share (tied weights) is read into
    for the first only; the second is loaded after it, as before.
    """
    plan = InPlaceRead(path, {})
    try:
        with _collector_paused():
            return _plan(objects, path, stream)
    except Exception:  # `restore` says what is wrong with the file
        return plan


def _plan(objects: Mapping[str, Any], path: str, stream: BinaryIO) -> InPlaceRead:
    """`plan_in_place`, raising on a file `restore` would refuse."""
    plan = InPlaceRead(path, {})
    mapped = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
    with open_model_file(mapped, path) as f:
        encoded, weights_only, stored = _contents(f, len(mapped), path)
    # The checks set the random states on scratch generators: read their values
    # (those of a size no state has are refused for it, values or not); read-only
    # bytes, which `_built` copies.
    random = _random_states(objects, encoded)
    values = [
        _built(_array(found, mapped), found.layout)
        if k in random and found.nbytes < DIRECT_MIN_BYTES
        else _placeholder(found)
        for k, found in enumerate(stored)
    ]
    state = _decoded(encoded, values, path)
    index = {id(value): k for k, value in enumerate(values)}
    check_restorable(objects, state, weights_only, path)
    references = _references(encoded)
    taken: set[int] = set()
    for name, module in objects.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for key, tensor in module.state_dict().items():
            k = index.get(id(state["objects"][name][key]))
            if k is None or references[k] != 1 or not _fits(stored[k], tensor):
                continue
            large = stored[k].nbytes >= DIRECT_MIN_BYTES
            buffer = _own_buffer(tensor) if large else None
            if buffer is not None and tensor.data_ptr() not in taken:
                taken.add(tensor.data_ptr())
                plan.targets[k] = InPlaceTarget(stored[k].offset, name, key, tensor, buffer)
    return plan


def _random_states(objects: Mapping[str, Any], encoded: Any) -> set[int]:
    """The stored tensors that the 'state' JSON `encoded` (as the file has it) holds
    random states in: its 'rng', and the entries of registered generators and data
    positions; the only ones whose values the checks read."""
    generators = {
        name
        for name, value in objects.items()
        if is_generator(value) or loader.is_data_position(value)
    }
    entries = [value for name, value in encoded["objects"]["dict"] if name in generators]
    return set(_references([encoded["rng"], *entries]))


def _fits(found: _Stored, tensor: torch.Tensor) -> bool:
    """Whether the stored tensor is one of `tensor`'s dtype and shape, byte for byte."""
    return (
        not found.layout.is_array
        and found.layout.dtype == tensor.dtype
        and found.layout.shape == tuple(tensor.shape)
        and found.nbytes == tensor.numel() * tensor.element_size()
    )


def _own_buffer(tensor: torch.Tensor) -> np.ndarray | None:
    """`tensor`'s memory as writable bytes, where it is dense CPU memory that is the
    whole of its storage: two such tensors then share all their memory or none."""
    nbytes = tensor.numel() * tensor.element_size()
    if (
        torch.nn.parameter.is_lazy(tensor)
        or tensor.device.type != "cpu"
        or tensor.layout != torch.strided
        or tensor.is_quantized
        or tensor.is_conj()
        or tensor.is_neg()
        or not tensor.is_contiguous()
        or tensor.storage_offset() != 0
        or tensor.untyped_storage().nbytes() != nbytes
    ):
        return None
    return writable_bytes(tensor.data_ptr(), nbytes)


# -- restoring -------------------------------------------------------------------------


def apply(objects: Mapping[str, Any], state: dict, path: str, logger: LibraryLogger) -> None:
    """Load `state`, checked by `check_restorable`, into the objects and the global
    random generators.

    Modules first: loading one materialises its lazy parameters, which an optimizer's
    `load_state_dict` needs to cast its state to (their dtype and device). What the
    checks pass loads whole; should an object fail all the same (its own
    `load_state_dict` refusing what torch's would take), the error says which entries
    were loaded already.
    """
    entries = sorted(
        state["objects"].items(), key=lambda item: not isinstance(objects[item[0]], torch.nn.Module)
    )
    loaded: list[str] = []
    for name, saved in entries:
        obj = objects[name]
        with _loading(name, loaded, path):
            if is_generator(obj):
                obj.set_state(saved)
            elif loader.is_stateful_loader(obj):
                loader.restore_loader(obj, saved)
            elif isinstance(obj, torch.nn.Module) and _loads_plainly(obj):
                with torch.no_grad():
                    _copy_into(obj, saved)
            else:
                obj.load_state_dict(saved)
        loaded.append(name)
    rng = state["rng"]
    if not rng:
        return
    with _loading("rng", loaded, path):
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and sets_cuda_states(rng["cuda"]):
            torch.cuda.set_rng_state_all(rng["cuda"])
    if "cuda" in rng and not sets_cuda_states(rng["cuda"]):
        logger.warning(
            "'%s' holds the random states of %d CUDA devices, this process "
            "sees %d: CUDA random streams are not restored",
            path,
            len(rng["cuda"]),
            torch.cuda.device_count() if torch.cuda.is_available() else 0,
        )


def _loads_plainly(module: torch.nn.Module) -> bool:
    """Whether `module.load_state_dict` of a state `check_restorable` passed would do
    nothing but `_copy_into`: no module in it loads or saves its state its own way
    (BatchNorm does, for files of old torch versions) or has state-dict hooks or extra
    state, none of its tensors is lazy or on the meta device, and torch does not swap
    tensors on loading. Where it is not, `load_state_dict` runs."""
    if torch.__future__.get_swap_module_params_on_conversion():
        return False
    plain = torch.nn.Module
    for submodule in module.modules():
        kind = type(submodule)
        if (
            kind._load_from_state_dict is not plain._load_from_state_dict
            or kind._save_to_state_dict is not plain._save_to_state_dict
            or kind.get_extra_state is not plain.get_extra_state
            or kind.set_extra_state is not plain.set_extra_state
            or submodule._load_state_dict_pre_hooks
            or submodule._load_state_dict_post_hooks
            or submodule._state_dict_hooks
            or submodule._state_dict_pre_hooks
        ):
            return False
        for tensor in [*submodule._parameters.values(), *submodule._buffers.values()]:
            if tensor is not None and (torch.nn.parameter.is_lazy(tensor) or tensor.is_meta):
                return False
    return True


def _copy_into(module: torch.nn.Module, saved: Mapping[str, Any], prefix: str = "") -> None:
    """Copy each tensor of `saved` into the parameter or persistent buffer of its key,
    in the order and with the copies `load_state_dict` makes (`_loads_plainly`), but
    without its scan of every key of the state per submodule, and without copying a
    tensor read into the module's own memory (`plan_in_place`) onto itself."""
    tensors = [*module._parameters.items(), *module._buffers.items()]
    for name, tensor in tensors:
        if tensor is None or name in module._non_persistent_buffers_set:
            continue
        value = saved[prefix + name]
        if not (
            value.data_ptr() == tensor.data_ptr()
            and value.dtype == tensor.dtype
            and value.shape == tensor.shape
            and value.stride() == tensor.stride()
        ):
            tensor.copy_(value)
    for name, child in module._modules.items():
        if child is not None:
            _copy_into(child, saved, prefix + name + ".")


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused: encoding or decoding a state of
    thousands of tensors allocates tens of thousands of containers, none of them
    garbage, and the collections they would trigger walk every object of the process
    (the model's included) for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _loading(name: str, loaded: list[str], path: str) -> Iterator[None]:
    """Raise an error of an object's own loading of entry `name` as a
    CheckpointFormatError saying what is loaded already (`loaded`)."""
    try:
        yield
    except Exception as error:
        loaded_before = str(loaded or "nothing")
        raise failed_after_checks(path, f"entry '{name}'", error, loaded_before) from error


def restore(
    objects: Mapping[str, Any],
    path: str,
    contents: memoryview,
    logger: LibraryLogger,
    in_place: InPlaceRead | None = None,
    overwritten: Set[str] = frozenset(),
) -> Restored:
    """Load the verified file `contents` (of `path`) into the registered `objects`.

    Every entry is decoded and checked against its object (`check_restorable`) before
    the first `load_state_dict`, so on any CheckpointFormatError nothing has changed
    (but for what `in_place`, the plan `contents` were read by, read into the modules
    already: `read` says so if the verified file does not hold it). A file that is not
    HDF5 is taken for upstream CANDLE's torch pickle (`restore_upstream`); `overwritten`
    names the modules a file that failed verification was read into, which it must load.
    """
    if bytes(contents[: len(HDF5_MAGIC)]) != HDF5_MAGIC:
        return restore_upstream(objects, path, contents, overwritten)
    with _collector_paused():
        state, weights_only = read(contents, path, in_place)
        wanted = check_restorable(objects, state, weights_only, path)
        apply(objects, state, path, logger)
    return Restored.of(
        wanted,
        rng_restored=bool(state["rng"]),
        exact=not weights_only,
        missing="optimizer, scheduler or RNG state (ckpt_save_weights_only)",
    )


UPSTREAM_KEYS = {"model": "model_state_dict", "optimizer": "optimizer_state_dict"}


def load_upstream(path: str, contents: memoryview) -> dict:
    """Upstream CANDLE's ``model.h5`` torch pickle, read with `torch.load(weights_only=True)`.

    Its unpickler builds tensors and plain containers only: a file asking for any other
    object (a `__reduce__` payload) is refused before anything is built from it.

    Raises:
        CheckpointFormatError: not such a pickle, or not upstream's dict with
            'model_state_dict'.
    """
    try:
        loaded = torch.load(io.BytesIO(contents), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointFormatError(
            f"'{path}' is a pickle that asks for objects other than tensors and plain "
            f"containers (the safe loader refused it: {str(error).splitlines()[0][:300]}); "
            f"it was not loaded, since a full unpickling could run code from the file. "
            f"Do not restart from it"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise CheckpointFormatError(
            f"'{path}' is neither a candle_ckpt PyTorch file (HDF5) nor a readable "
            f"torch.save file: {error}"
        ) from None
    if not isinstance(loaded, dict) or UPSTREAM_KEYS["model"] not in loaded:
        found = sorted(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
        raise CheckpointFormatError(
            f"'{path}' is a torch.save file holding {found}; expected upstream CANDLE's "
            f"dict with 'model_state_dict' (and 'optimizer_state_dict')"
        )
    return loaded


def restore_upstream(
    objects: Mapping[str, Any],
    path: str,
    contents: memoryview,
    overwritten: Set[str] = frozenset(),
) -> Restored:
    """Restore the weights and optimizer of upstream CANDLE's ``model.h5`` torch pickle
    (read by `load_upstream`, which never unpickles anything but tensors), provided it
    loads every module of `overwritten` (see `restore`)."""
    loaded = load_upstream(path, contents)
    plan = [(name, key) for name, key in UPSTREAM_KEYS.items() if name in objects and key in loaded]
    if not plan or plan[0][0] != "model":
        raise CheckpointFormatError(
            f"'{path}' is an upstream CANDLE checkpoint of a model "
            f"and optimizer; set_model registered no 'model'"
        )
    if overwritten - {name for name, _ in plan}:
        raise CheckpointFormatError(
            f"'{path}' does not load every module that a model file which failed "
            f"verification was read into ({sorted(overwritten)}). {OVERWRITTEN}"
        )
    for name, key in plan:
        check_state(name, objects[name], loaded[key], path)
    for name, key in plan:
        objects[name].load_state_dict(loaded[key])
    lacking = [name for name in objects if name not in dict(plan)] + ["RNG"]
    return Restored(
        parts=tuple(name for name, _ in plan),
        exact=False,
        missing=" or ".join(lacking) + " state (upstream CANDLE saves none)",
        source="upstream CANDLE torch pickle, read with torch.load(weights_only=True)",
    )


def saved_module_states(path: str, contents: memoryview) -> dict[str, Any]:
    """{entry name: state dict} of every module a verified model file holds.

    A candle_ckpt file: the entries saved as a module's state dict (an OrderedDict, as
    `Module.state_dict` returns; optimizers, schedulers and generators are not). An
    upstream CANDLE torch pickle: its 'model_state_dict', as entry "model".
    """
    if bytes(contents[: len(HDF5_MAGIC)]) != HDF5_MAGIC:
        return {"model": load_upstream(path, contents)[UPSTREAM_KEYS["model"]]}
    state, _ = read(contents, path)
    return {
        name: saved
        for name, saved in state["objects"].items()
        if isinstance(saved, collections.OrderedDict)
    }


def restore_modules(objects: Mapping[str, Any], path: str, contents: memoryview) -> Restored:
    """Load only the weights of the registered modules from the verified file `contents`
    (a warm start, `ckpt_init_from`): each `torch.nn.Module` from the entry of its name;
    optimizers, schedulers, generators and random states are left as they are.

    Every module is checked against its entry before the first `load_state_dict`.
    """
    modules = {name: value for name, value in objects.items() if isinstance(value, torch.nn.Module)}
    if not modules:
        raise CheckpointFormatError(
            f"set_model registered no torch.nn.Module to load the weights of '{path}' into"
        )
    saved = saved_module_states(path, contents)
    missing = sorted(set(modules) - set(saved))
    if missing:
        raise CheckpointFormatError(
            f"'{path}' holds the weights of modules {sorted(saved)}; set_model registered "
            f"modules {sorted(modules)}, of which {missing} are not in the file. Register "
            f"the model under the name the parent run used"
        )
    for name, module in modules.items():
        check_state(name, module, saved[name], path)
    for name, module in modules.items():
        module.load_state_dict(saved[name])
    return Restored(
        parts=tuple(modules),
        exact=False,
        missing="optimizer, scheduler or RNG state (a warm start loads weights only)",
    )


def write_module_weights(contents: memoryview, source: str, destination: str) -> str:
    """Write the model's state dict from the verified model file `contents` (of `source`)
    with `torch.save` at `destination`, for plain
    `net.load_state_dict(torch.load(destination, weights_only=True))`. Does not fsync.

    The entry registered as "model" is written, else the file's only module.

    Returns:
        The name of the entry written.

    Raises:
        CheckpointFormatError: the file is unreadable, or holds no module or several
            without one named "model".
    """
    modules = saved_module_states(source, contents)
    if "model" in modules:
        name = "model"
    elif len(modules) == 1:
        name = next(iter(modules))
    else:
        raise CheckpointFormatError(
            f"'{source}' holds the state dicts of modules {sorted(modules)}; none is "
            f"registered as 'model', so which one to export is not known"
            if modules
            else f"'{source}' holds no module state dict to export"
        )
    torch.save(modules[name], destination)
    return name
