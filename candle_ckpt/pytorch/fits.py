"""Whether a decoded PyTorch state fits the registered objects: every check a restart
makes before the first value changes.

`load_state_dict`, `Generator.set_state` and the global `set_state`s change their
object as they go, and fail part way on a value they cannot take; an optimizer or a
scheduler takes values it cannot use and fails at the next training step instead. So
a restart decodes the whole file and checks it here against the objects first
(`check_restorable`), and loads only a state that passed: a module's tensors of its
own dtypes and shapes, and `_metadata` only as torch writes it; an optimizer's groups
and per-parameter state as its parameters need them; a scheduler's or any other
object's values of the kinds its own state has; each random state set first on a
scratch generator of its kind. What passes here, `state.apply` loads whole.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..core.errors import CheckpointFormatError
from . import loader as loaders

# Per-parameter optimizer state that torch.optim's optimizers create like the parameter
# (`torch.zeros_like(p)`...): it must have the parameter's shape. 'momentum_buffer' is
# None until SGD's first step with momentum.
_LIKE_THE_PARAMETER = frozenset(
    {
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "momentum_buffer",
        "sum",
        "square_avg",
        "acc_delta",
        "grad_avg",
        "ax",
        "prev",
        "step_size",
        "exp_inf",
        "variance",
    }
)
# Per-parameter state that is one number (a 0-d tensor, or a number in older files).
_ONE_NUMBER = frozenset({"step", "mu", "eta", "mu_product"})
# Optimizers whose per-parameter state always holds a 'step' once it holds anything:
# their `__setstate__` reads it after the state is already in place, so a file without
# it would fail half-loaded.
_STEPPED = tuple(
    getattr(torch.optim, name)
    for name in (
        "Adam",
        "AdamW",
        "Adamax",
        "NAdam",
        "RAdam",
        "Adagrad",
        "Adadelta",
        "RMSprop",
        "Rprop",
        "ASGD",
        "SparseAdam",
    )
    if hasattr(torch.optim, name)
)
# Keys an LR scheduler adds to its optimizer's parameter groups: a group may hold them
# although the optimizer being restored has no such scheduler (yet).
_SCHEDULER_GROUP_KEYS = frozenset(
    {"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"}
)
# numpy's legacy MT19937 state: 624 words and a position in 0..624.
_MT_WORDS = 624


def is_generator(value: Any) -> bool:
    return isinstance(value, torch.Generator)


def check_restorable(
    objects: Mapping[str, Any], state: dict, weights_only: bool, path: str
) -> list[str]:
    """The names of the objects that the decoded `state` loads, once it is found to
    hold exactly their entries, each fitting its object (`check_state`), and random
    states that each take (`check_rng`).

    Raises:
        CheckpointFormatError: it does not; the message names the entry.
    """
    saved = state["objects"]
    wanted = [
        name
        for name, value in objects.items()
        if not weights_only or isinstance(value, torch.nn.Module)
    ]
    if set(saved) != set(wanted):
        raise CheckpointFormatError(
            f"'{path}' holds the state of {shown(sorted(map(str, saved)), 200)}; set_model "
            f"registered {sorted(wanted)}"
            f"{' (modules only: a weights-only file)' if weights_only else ''}"
            f". Register the same objects, under the same names, as the run that saved it"
        )
    shapes = parameter_shapes(objects, saved)
    for name in wanted:
        check_state(name, objects[name], saved[name], path, shapes)
    check_rng(state["rng"], path)
    return wanted


def parameter_shapes(objects: Mapping[str, Any], saved: Mapping[Any, Any]) -> dict[int, tuple]:
    """{id(parameter or buffer): the shape it has once `saved` is loaded} for every
    tensor of the registered modules whose entry `saved` holds: the file's shape, which
    an uninitialised (lazy) parameter takes."""
    shapes: dict[int, tuple] = {}
    for name, module in objects.items():
        entry = saved.get(name)
        if not isinstance(module, torch.nn.Module) or not isinstance(entry, Mapping):
            continue
        for key, tensor in module.state_dict(keep_vars=True).items():
            found = entry.get(key)
            if isinstance(found, torch.Tensor):
                shapes[id(tensor)] = tuple(found.shape)
    return shapes


def check_state(
    name: str, obj: Any, saved: Any, path: str, shapes: Mapping[int, tuple] | None = None
) -> None:
    """Raise CheckpointFormatError unless `saved` fits the registered object `obj`.

    A module: the same keys, shapes and dtypes (`load_state_dict` would copy part of
    them before failing), and `_metadata` as torch writes it; an uninitialised
    parameter of a lazy module takes the file's shape (`load_state_dict` materialises
    it, in place, so an optimizer made before holds the very Parameter), only its dtype
    is checked. An optimizer: `check_optimizer`. A generator: a state it takes, set on a
    scratch generator. Anything else (an LR scheduler, a GradScaler...): the same keys,
    each value of the kind of the object's own (`check_like`).

    `shapes` ({id(parameter): shape}, `parameter_shapes`) gives an optimizer's
    parameters the shapes they will have; without, their current ones.
    """
    where = f"'{path}': entry '{name}'"
    if is_generator(obj):
        check_generator_state(saved, obj.get_state(), obj.device, where)
        return
    if loaders.is_stateful_loader(obj):
        check_loader_state(where, obj, saved)
        return
    if isinstance(obj, loaders.EpochPosition):
        check_epoch_position(where, obj, saved)
        return
    current = obj.state_dict()
    if not isinstance(saved, dict):
        raise CheckpointFormatError(
            f"{where} is a {type(saved).__name__}; expected the "
            f"state dict of a {type(obj).__name__}"
        )
    if isinstance(obj, torch.nn.Module):
        _check_module(where, obj, current, saved)
        return
    if set(saved) != set(current):
        raise CheckpointFormatError(
            f"{where} has keys {shown(sorted(map(repr, saved)), 200)}; the "
            f"{type(obj).__name__} has {sorted(map(repr, current))}"
        )
    if isinstance(obj, torch.optim.Optimizer):
        check_optimizer(where, obj, saved, shapes or {})
        return
    for key, value in current.items():
        check_like(saved[key], value, f"{where}, key '{key}'")


def check_loader_state(where: str, loader: Any, saved: Any) -> None:
    """A StatefulDataLoader's entry (`loader.loader_state`), against the loader, without
    asking the loader for its state (that makes an iterator): a generator state where
    the loader has that generator, None where it has none, and a position inside an
    epoch made with as many workers as the loader has (torchdata asserts it only when
    the resumed epoch's iteration starts). An earlier release's entry, the loader's
    state_dict alone, is taken as it was (not exact: it holds no generator state)."""
    if isinstance(saved, dict) and loaders.TORCHDATA_KEY in saved:
        return
    if not isinstance(saved, dict) or set(saved) != loaders.KEYS:
        found = sorted(map(str, saved)) if isinstance(saved, dict) else describe(saved)
        raise CheckpointFormatError(
            f"{where} holds {shown(found, 200)}; the registered StatefulDataLoader's entry "
            f"has keys {sorted(loaders.KEYS)}"
        )
    for key, generator in zip(
        (loaders.GENERATOR, loaders.SAMPLER_GENERATOR), loaders.generators(loader)
    ):
        if generator is not None:
            check_generator_state(
                saved[key], generator.get_state(), generator.device, f"{where}, '{key}'"
            )
        elif saved[key] is not None:
            raise CheckpointFormatError(
                f"{where}: '{key}' holds a generator state; the registered "
                f"StatefulDataLoader has no such generator. Build it as the run that "
                f"saved it did (shuffle=True, generator=...)"
            )
    position = saved[loaders.ITERATOR]
    if position is None:
        return
    snapshot = position.get("_snapshot") if isinstance(position, dict) else None
    main = snapshot.get("_main_snapshot") if isinstance(snapshot, dict) else None
    workers = main.get("_num_workers") if isinstance(main, dict) else 0
    if not isinstance(position, dict) or (not main and "_num_yielded" not in position):
        raise CheckpointFormatError(
            f"{where}: '{loaders.ITERATOR}' is {shown(position)}; expected a "
            f"StatefulDataLoader state_dict"
        )
    if workers != loader.num_workers:
        raise CheckpointFormatError(
            f"{where}: the epoch was loaded with num_workers={workers}; the registered "
            f"StatefulDataLoader has num_workers={loader.num_workers}. Resume it with "
            f"the number of workers the run that saved it had"
        )
    _check_position(f"{where}, '{loaders.ITERATOR}'", loader, position)


# The counts of a StatefulDataLoader state_dict, in batches or samples: torchdata skips
# that many on loading, one by one.
_POSITION_COUNTS = frozenset(
    {
        "_num_yielded",
        "_sampler_iter_yielded",
        "samples_yielded",
        "yielded",
        "_snapshot_step",
        "_steps_since_snapshot",
    }
)


def _check_position(where: str, loader: Any, position: dict) -> None:
    """The counts and generator states inside a StatefulDataLoader's state_dict: each
    count an int from 0 to the epoch's samples (where the dataset has a length), so a
    file cannot make the resumed epoch skip without end; each sampler generator state
    one the sampler's generator takes (torchdata sets it when the epoch resumes, after
    the restart)."""
    try:
        bound: int | None = max(len(loader), len(loader.sampler))
    except TypeError:  # an IterableDataset: no length
        bound = None
    mine = getattr(loader.sampler, "generator", None)
    mine = mine if isinstance(mine, torch.Generator) else torch.Generator()
    pending = [(where, position)]
    while pending:
        at, value = pending.pop()
        if isinstance(value, dict):
            pending.extend((f"{at}[{shown(key)}]", item) for key, item in value.items())
            for key in _POSITION_COUNTS & value.keys():
                count = value[key]
                if not _is_int(count) or count < 0 or (bound is not None and count > bound):
                    raise CheckpointFormatError(
                        f"{at}[{key!r}] is {shown(count)}; expected a count from 0 to "
                        f"{bound if bound is not None else 'any size'} (the loader's epoch)"
                    )
            if isinstance(value.get("generator"), torch.Tensor):
                check_generator_state(
                    value["generator"], mine.get_state(), mine.device, f"{at}['generator']"
                )


def check_epoch_position(where: str, position: loaders.EpochPosition, saved: Any) -> None:
    """An `EpochPosition`'s entry: its generator's state (`check_generator_state`), and
    between epochs no start and no batch count, inside one a start of that kind and a
    count >= 0."""
    keys = {"generator", "epoch_start", "batches"}
    if not isinstance(saved, dict) or set(saved) != keys:
        found = sorted(map(str, saved)) if isinstance(saved, dict) else describe(saved)
        raise CheckpointFormatError(
            f"{where} holds {shown(found, 200)}; an EpochPosition's has keys {sorted(keys)}"
        )
    generator = position.loader.generator
    assert generator is not None  # EpochPosition.__init__ checks it
    mine = generator.get_state()
    check_generator_state(saved["generator"], mine, generator.device, f"{where}, 'generator'")
    start, done = saved["epoch_start"], saved["batches"]
    if (start is None) != (done is None) or not (done is None or (_is_int(done) and done >= 0)):
        raise CheckpointFormatError(
            f"{where}: epoch_start is {describe(start)} and batches {shown(done)}; expected "
            f"both None (between epochs) or a generator state and a number of batches"
        )
    if start is not None:
        check_generator_state(start, mine, generator.device, f"{where}, 'epoch_start'")


def _check_module(where: str, module: torch.nn.Module, current: dict, saved: dict) -> None:
    missing = [k for k in current if k not in saved]
    extra = [k for k in saved if k not in current]
    if missing or extra:
        raise CheckpointFormatError(
            f"{where} does not match the {type(module).__name__}: keys missing from the "
            f"file {missing[:6]}, unexpected in it {extra[:6]}; was the model built "
            f"the same way (and wrapped, e.g. in DistributedDataParallel, the same)?"
        )
    for key, tensor in current.items():
        found = saved[key]
        if torch.nn.parameter.is_lazy(tensor):
            if not isinstance(found, torch.Tensor) or found.dtype != tensor.dtype:
                raise CheckpointFormatError(
                    f"{where}, '{key}': {describe(found)} in the file, the model's "
                    f"uninitialised (lazy) parameter is "
                    f"{str(tensor.dtype).removeprefix('torch.')}"
                )
            continue
        if not isinstance(found, torch.Tensor) or (found.shape, found.dtype) != (
            tensor.shape,
            tensor.dtype,
        ):
            raise CheckpointFormatError(
                f"{where}, '{key}': {describe(found)} in the file, the model has {describe(tensor)}"
            )
    check_module_metadata(getattr(saved, "_metadata", None), where)


def check_module_metadata(metadata: Any, where: str) -> None:
    """A module state dict's `_metadata`, as `Module.state_dict` writes it: None, or
    {submodule prefix: {"version": int}}. `load_state_dict` hands each prefix's dict
    to the submodule, and reads more than the version from it (its
    'assign_to_params_buffers' replaces the parameters an optimizer holds)."""
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise CheckpointFormatError(
            f"{where}: _metadata is a {type(metadata).__name__}; expected "
            f"{{prefix: {{'version': int}}}}, as torch writes it"
        )
    for prefix, value in metadata.items():
        if (
            not isinstance(prefix, str)
            or not isinstance(value, Mapping)
            or set(value) - {"version"}
            or not _is_int(value.get("version", 0))
        ):
            raise CheckpointFormatError(
                f"{where}: _metadata[{prefix!r}] is {shown(value)}; expected "
                f"{{'version': int}}, as torch writes it"
            )


def check_optimizer(
    where: str, optimizer: torch.optim.Optimizer, saved: dict, shapes: Mapping[int, tuple]
) -> None:
    """An optimizer's saved state dict, against the optimizer: as many groups of as many
    parameters, numbered by distinct ints; each group's settings of the kinds the
    optimizer's own are (`check_like`; a key it lacks only if a scheduler adds it, a
    number); per-parameter state only for those parameters, its tensors that mirror a
    parameter (`_LIKE_THE_PARAMETER`) of that parameter's shape, its counters
    (`_ONE_NUMBER`) one number each."""
    groups, state = saved["param_groups"], saved["state"]
    live = optimizer.param_groups
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointFormatError(f"{where}: param_groups is not a list of dicts")
    counts = [len(g.get("params", ())) if isinstance(g.get("params"), list) else -1 for g in groups]
    mine = [len(g["params"]) for g in live]
    if counts != mine:
        raise CheckpointFormatError(
            f"{where}: parameters per group {counts} in the file, the optimizer has {mine}"
        )
    parameters: dict[int, torch.Tensor] = {}
    for k, (group, own) in enumerate(zip(groups, live)):
        at = f"{where}, param_groups[{k}]"
        for index, parameter in zip(group["params"], own["params"]):
            if not _is_int(index) or index in parameters:
                raise CheckpointFormatError(
                    f"{at}['params'] holds {shown(index)}; expected distinct parameter "
                    f"numbers (ints), as torch writes them"
                )
            parameters[index] = parameter
        for key, value in group.items():
            if key == "params":
                continue
            if key in own:
                check_like(value, own[key], f"{at}['{key}']")
            elif key not in _SCHEDULER_GROUP_KEYS or not _is_number(value):
                raise CheckpointFormatError(
                    f"{at} has {shown(key)} ({shown(value)}), which the "
                    f"{type(optimizer).__name__}'s groups do not; was it built the same way?"
                )
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{where}: state is a {type(state).__name__}; expected a dict")
    for index, values in state.items():
        if not _is_int(index) or index not in parameters:
            raise CheckpointFormatError(
                f"{_state_of(where, index)}: no parameter of that number in param_groups "
                f"(they number {len(parameters)})"
            )
        if not isinstance(values, dict):
            raise CheckpointFormatError(
                f"{_state_of(where, index)} is a {type(values).__name__}; expected a dict"
            )
        parameter = parameters[index]
        shape = shapes.get(id(parameter))
        if shape is None and not torch.nn.parameter.is_lazy(parameter):
            shape = tuple(parameter.shape)
        if values and "step" not in values and isinstance(optimizer, _STEPPED):
            raise CheckpointFormatError(
                f"{_state_of(where, index)} has no 'step'; a {type(optimizer).__name__}'s "
                f"state for a parameter always has one (it holds "
                f"{', '.join(map(shown, values))})"
            )
        for key, value in values.items():
            _check_parameter_state(value, key, shape, where, index)


def _state_of(where: str, index: Any) -> str:
    """How a message names the optimizer state of parameter `index` (formatted only
    for an error: a restart checks thousands)."""
    return f"{where}, state[{shown(index)}]"


def _check_parameter_state(
    value: Any, key: Any, shape: tuple | None, where: str, index: Any
) -> None:
    """Raise CheckpointFormatError unless `value` is what the optimizer state `key` of
    parameter `index` (of `shape`) can hold."""
    if key in _LIKE_THE_PARAMETER:
        if value is None and key == "momentum_buffer":
            return
        if (
            not isinstance(value, torch.Tensor)
            or not (value.is_floating_point() or value.is_complex())
            or (shape is not None and tuple(value.shape) != shape)
        ):
            raise CheckpointFormatError(
                f"{_state_of(where, index)}[{shown(key)}] is {describe(value)}; the "
                f"parameter is of shape {shape} and its '{key}' must be a float tensor of "
                f"that shape"
            )
    elif key in _ONE_NUMBER:
        if not (_is_number(value) or (isinstance(value, torch.Tensor) and value.numel() == 1)):
            raise CheckpointFormatError(
                f"{_state_of(where, index)}[{shown(key)}] is {describe(value)}; expected one number"
            )
    elif not isinstance(key, str):
        raise CheckpointFormatError(
            f"{_state_of(where, index)}[{shown(key)}]: a key {shown(key)}; expected the "
            f"names of state"
        )


def check_like(saved: Any, live: Any, where: str) -> None:
    """Raise CheckpointFormatError unless `saved` is of the kind of the object's own
    value `live`: a number for a number (int or float, never a bool), a bool for a
    bool, a string for a string, a tensor or array of the same dtype and shape, a torch
    dtype for a dtype; a list or tuple, or a dict, of the same length or keys, element
    by element (of any length or keys where `live` is empty). A `live` None (a value
    not set yet) takes anything."""
    if live is None:
        return
    if _is_number(live):
        ok = _is_number(saved)
    elif isinstance(live, torch.Tensor):
        ok = isinstance(saved, torch.Tensor) and (saved.dtype, saved.shape) == (
            live.dtype,
            live.shape,
        )
    elif isinstance(live, np.ndarray):
        ok = isinstance(saved, np.ndarray) and (saved.dtype, saved.shape) == (
            live.dtype,
            live.shape,
        )
    elif isinstance(live, (list, tuple)):
        ok = type(saved) is type(live) and (not live or len(saved) == len(live))
        if ok and live:
            for k, (item, own) in enumerate(zip(saved, live)):
                check_like(item, own, f"{where}[{k}]")
    elif isinstance(live, Mapping):
        ok = isinstance(saved, Mapping) and (not live or set(saved) == set(live))
        if ok and live:
            for key, own in live.items():
                check_like(saved[key], own, f"{where}[{key!r}]")
    else:  # a bool, a string, a torch dtype
        ok = type(saved) is type(live)
    if not ok:
        raise CheckpointFormatError(
            f"{where} is {describe(saved)} ({shown(saved)}); the object's own is {describe(live)}"
        )


def check_generator_state(saved: Any, mine: torch.Tensor, device: Any, where: str) -> None:
    """A generator's state: a tensor like `mine`, which a fresh generator on `device`
    takes (`set_state` refuses an invalid Mersenne Twister state only part way)."""
    if not isinstance(saved, torch.Tensor) or (saved.dtype, saved.shape) != (
        mine.dtype,
        mine.shape,
    ):
        raise CheckpointFormatError(
            f"{where} is {describe(saved)}; expected a generator state like {describe(mine)}"
        )
    try:
        torch.Generator(device=device).set_state(saved)
    except (RuntimeError, TypeError, ValueError) as error:
        raise CheckpointFormatError(
            f"{where} is not a state a generator takes: {str(error).splitlines()[0]}"
        ) from None


def check_rng(rng: Any, path: str) -> None:
    """The global random states of a file ({} for a weights-only one): torch's, numpy's
    and Python's (and CUDA's, where this process would set them), each set on a
    scratch generator of its kind first."""
    if not rng:
        return
    if set(rng) - {"torch", "numpy", "python", "cuda"} or not {"torch", "numpy", "python"} <= set(
        rng
    ):
        raise CheckpointFormatError(
            f"'{path}': random states {sorted(map(str, rng))}; "
            f"expected torch, numpy, python (and cuda)"
        )
    check_generator_state(
        rng["torch"], torch.get_rng_state(), "cpu", f"'{path}': the torch random state"
    )
    _check_numpy_state(rng["numpy"], f"'{path}': the numpy random state")
    _check_python_state(rng["python"], f"'{path}': the Python random state")
    if "cuda" in rng:
        cuda = rng["cuda"]
        if not isinstance(cuda, list) or not all(
            isinstance(s, torch.Tensor) and s.dtype == torch.uint8 and s.dim() == 1 for s in cuda
        ):
            raise CheckpointFormatError(
                f"'{path}': the CUDA random states are not a list of byte tensors"
            )
        if sets_cuda_states(cuda):
            for k, saved in enumerate(cuda):
                mine = torch.cuda.get_rng_state(k)
                check_generator_state(
                    saved, mine, f"cuda:{k}", f"'{path}': the random state of CUDA device {k}"
                )


def sets_cuda_states(cuda: list) -> bool:
    """Whether a restore sets these CUDA random states: as many devices here."""
    return torch.cuda.is_available() and torch.cuda.device_count() == len(cuda)


def _check_numpy_state(saved: Any, where: str) -> None:
    """np.random.get_state()'s tuple: ('MT19937', 624 uint32 words, position 0..624,
    has_gauss 0 or 1, cached_gaussian), which a scratch RandomState must take. numpy
    takes a position past the words, and then reads outside them."""
    problem = _numpy_state_problem(saved)
    if problem is None:
        try:
            np.random.RandomState().set_state(saved)
        except (TypeError, ValueError) as error:
            problem = str(error)
    if problem is not None:
        raise CheckpointFormatError(
            f"{where}: {problem}; expected ('MT19937', {_MT_WORDS} uint32 words, a "
            f"position from 0 to {_MT_WORDS}, 0 or 1, a float), as np.random.get_state "
            f"returns it"
        )


def _numpy_state_problem(saved: Any) -> str | None:
    if not isinstance(saved, tuple) or len(saved) != 5:
        return f"{describe(saved)} ({shown(saved)})"
    name, words, position, has_gauss, gauss = saved
    if not isinstance(name, str) or name != "MT19937":
        return f"the generator is {shown(name)}"
    if not isinstance(words, np.ndarray) or (words.dtype, words.shape) != (
        np.dtype(np.uint32),
        (_MT_WORDS,),
    ):
        return f"the words are {describe(words)}"
    if not _is_int(position) or not 0 <= position <= _MT_WORDS:
        return f"the position is {shown(position)}"
    if not _is_int(has_gauss) or has_gauss not in (0, 1) or not _is_number(gauss):
        return f"the cached gaussian is {shown(has_gauss)}, {shown(gauss)}"
    return None


def _check_python_state(saved: Any, where: str) -> None:
    """random.getstate()'s tuple, which a scratch random.Random must take; its cached
    gauss value None or a float (setstate takes anything there)."""
    try:
        random.Random().setstate(saved)
        if saved[2] is not None and not _is_number(saved[2]):
            raise TypeError(f"gauss_next is {shown(saved[2])}")
    except (TypeError, ValueError, IndexError, OverflowError) as error:
        raise CheckpointFormatError(
            f"{where} is not one Python's random takes ({error}); expected "
            f"random.getstate()'s (3, 625 ints, None or a float)"
        ) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shown(value: Any, limit: int = 60) -> str:
    """`value`'s repr on one line, cut to `limit` characters, for a message."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: Any) -> str:
    """A value's type, and dtype and shape for a tensor or array, for a message."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} of shape {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return f"a {type(value).__name__}"
