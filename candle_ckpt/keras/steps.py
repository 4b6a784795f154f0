"""Mid-epoch checkpoints of `model.fit`: what a step checkpoint adds to ``model.h5``, and
how a resumed fit starts its first epoch at the saved batch.

A step checkpoint (`ckpt_save_steps`, `ckpt_signal` or the wall-time margin inside an
epoch) is taken at the end of a batch. The weights, the optimizer and the RNG states
are in the file as at an epoch end; what `fit` holds besides, for the rest of the epoch
to run as if never interrupted, is written beside them in the group
``candle_ckpt_steps`` (docs/FORMAT.md, "Keras: model.h5"):

- the position: epochs completed and batches trained of the running one (which
  ckpt-info.json records as `epoch` and `batch`: a file whose position differs from
  its record is refused), and the batches per epoch the run's data had;
- the values of the model's metric variables (`model.metrics_variables`: the running
  mean of the loss and of each compiled metric over the epoch's batches so far), so
  that the resumed epoch's logs, and the history, are those of an uninterrupted run
  (not under a multi-worker strategy: see `StepState.capture`);
- the state of Python's global `random` generator as the epoch began: Keras shuffles a
  `PyDataset`'s batches (`fit(shuffle=True)`) with `random.shuffle` once per epoch,
  after `on_epoch_begin`, so that the resumed epoch, started from this state, draws
  the same order. (NumPy arrays need nothing: with a global seed Keras' tf.data
  pipeline draws the same permutation in every epoch and every process.)

Epoch-end checkpoints have no such group: `fit` resets the metrics at each epoch start,
and the data starts over.

Resuming needs no change to the user's CANDLE code: `restart()` reads and checks the
group with the rest of the file, before anything is loaded (`read`), and keeps it for
the model (`hold`); `CandleCheckpointCallback` takes it when fit starts (`take`) and
makes the first epoch start at the saved batch (`start_at_batch`). `fit` itself cannot
start an epoch mid-way (its loop counts the steps of every epoch from 0), so the
callback replaces the model's train function for the first `batch` steps of that epoch
by one that does not train: at its first call it restores the metric variables (after
`fit` reset them) and moves fit's data iterator past the trained batches, then it
returns the restored metrics at once; the next call trains batch `batch` with the
original function, which it puts back.

Moving the iterator reads the skipped batches from the input pipeline (tf.data offers
no way to skip elements without producing them) but trains none of them: for NumPy
arrays a slice copy per batch, for a `keras.utils.PyDataset` one `__getitem__` each.
Callbacks other than candle_ckpt's see `on_train_batch_begin`/`end` for the skipped
steps, with the restored metrics as logs.
"""

from __future__ import annotations

import random
import weakref
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from ..core.errors import CheckpointError, CheckpointFormatError, ParameterValueError
from ..core.restore.resume import Checkpoint
from ..hdf5 import read_names
from ..hdf5_check import ListedGroup, errors_are_the_files
from .distributed import multi_worker_strategy, strategy_all_gather, strategy_scope

STEPS_GROUP = "candle_ckpt_steps"
_NAMES = "metric_names"
_UNKNOWN = -1  # batches per epoch a run did not know (a callback driven outside fit)
_RANDOM = "python_random"  # dataset: the Mersenne Twister's 625 words
_RANDOM_VERSION, _RANDOM_WORDS = 3, 625  # random.getstate()'s format (CPython >= 3.2)


@dataclass(frozen=True)
class StepState:
    """What `fit` holds at the end of a batch beyond the model's weights, optimizer and
    RNG states: the position and the metric variables' values (host copies)."""

    epoch: int  # epochs completed
    batch: int  # batches trained of epoch `epoch` + 1 (>= 1)
    batches_per_epoch: int  # of the run's data, or _UNKNOWN
    metric_names: tuple[str, ...]  # the metric variables' paths
    metric_values: tuple[np.ndarray, ...]
    python_random: tuple[Any, ...]  # random.getstate() as the epoch began
    metrics_saved: bool = True

    @classmethod
    def capture(
        cls, model: Any, epoch: int, batch: int, batches_per_epoch: int | None
    ) -> StepState:
        """The state of `model` after `batch` batches of epoch `epoch` + 1 (a copy).

        Under a multi-worker strategy the metric variables are not captured: each
        worker holds its own part of each, and reading one is a collective of every
        worker, while only the writer saves, at batches it alone decides.
        """
        metrics_saved = multi_worker_strategy(model) is None
        variables = model.metrics_variables if metrics_saved else []
        return cls(
            epoch,
            batch,
            _UNKNOWN if batches_per_epoch is None else int(batches_per_epoch),
            tuple(v.path for v in variables),
            tuple(np.array(v.numpy()) for v in variables),
            _epoch_random.get(model) or random.getstate(),
            metrics_saved,
        )

    def write(self, f: h5py.File) -> None:
        """Add group `STEPS_GROUP` to the model file `f` being laid out (`h5.write`)."""
        group = f.create_group(STEPS_GROUP)
        group.attrs["epoch"] = self.epoch
        group.attrs["batch"] = self.batch
        group.attrs["batches_per_epoch"] = self.batches_per_epoch
        group.attrs["metrics_saved"] = self.metrics_saved
        group.attrs[_NAMES] = np.array([n.encode("utf8") for n in self.metric_names], dtype=bytes)
        for k, value in enumerate(self.metric_values):
            group.create_dataset(str(k), data=value)
        version, words, gauss = self.python_random
        group.create_dataset(_RANDOM, data=np.array(words, dtype=np.uint32))
        group.attrs["python_random_version"] = version
        group.attrs["python_random_gauss"] = np.nan if gauss is None else gauss


def read(checkpoint: Checkpoint, f: ListedGroup) -> StepState | None:
    """The step state in `checkpoint`'s verified model file (`f`, its listing:
    `h5.list_for_restore`), None for an epoch-end checkpoint; checked against the
    checkpoint's record before the model is touched.

    Raises:
        CheckpointFormatError: the record says a batch the file does not (or the
            file holds a step state its record does not name), or the group is
            malformed; the message names the file.
    """
    path = checkpoint.model_path
    info_batch = int(checkpoint.info.get("batch", 0))
    with errors_are_the_files(path, "a readable candle_ckpt model file"):
        if STEPS_GROUP not in f:
            if info_batch:
                raise CheckpointFormatError(
                    f"'{path}' has no '{STEPS_GROUP}' group, but its ckpt-info.json "
                    f"records batch {info_batch} of epoch {checkpoint.epoch + 1}: a "
                    f"step checkpoint's model file holds its position and metrics"
                )
            return None
        state = _parse(f.group(STEPS_GROUP, path), checkpoint.model_contents, path)
    found = (state.epoch, state.batch)
    if found != (checkpoint.epoch, info_batch):
        raise CheckpointFormatError(
            f"'{path}': group '{STEPS_GROUP}' is at (epochs completed, batch) {found}, its "
            f"ckpt-info.json at {(checkpoint.epoch, info_batch)}; expected the same"
        )
    return state


def _parse(group: ListedGroup, contents: memoryview, path: str) -> StepState:
    values = {}
    for key in ("epoch", "batch", "batches_per_epoch"):
        value = group.attrs.get(key)
        if not isinstance(value, (int, np.integer)):
            raise CheckpointFormatError(
                f"'{path}': attribute '{key}' of group '{STEPS_GROUP}' is {value!r}; "
                f"expected an integer"
            )
        values[key] = int(value)
    if values["epoch"] < 0 or values["batch"] < 1:
        raise CheckpointFormatError(
            f"'{path}': group '{STEPS_GROUP}' is at epoch {values['epoch']}, batch "
            f"{values['batch']}; expected epochs completed >= 0 and batch >= 1"
        )
    metrics_saved = group.attrs.get("metrics_saved")
    if not isinstance(metrics_saved, (bool, np.bool_)):
        raise CheckpointFormatError(
            f"'{path}': attribute 'metrics_saved' of group '{STEPS_GROUP}' is "
            f"{metrics_saved!r}; expected a boolean"
        )
    names = tuple(read_names(group, _NAMES))
    arrays = tuple(
        np.array(group.dataset(str(k), path).array(contents, path)) for k in range(len(names))
    )
    return StepState(
        values["epoch"],
        values["batch"],
        values["batches_per_epoch"],
        names,
        arrays,
        _parse_random(group, contents, path),
        bool(metrics_saved),
    )


def _parse_random(group: ListedGroup, contents: memoryview, path: str) -> tuple[Any, ...]:
    """random.getstate() from the group, checked by random.setstate on a scratch
    generator (it refuses a state the Mersenne Twister cannot have)."""
    words = group.dataset(_RANDOM, path).array(contents, path)
    version = group.attrs.get("python_random_version")
    gauss = group.attrs.get("python_random_gauss")
    if words.dtype != np.uint32 or words.shape != (_RANDOM_WORDS,) or version != _RANDOM_VERSION:
        raise CheckpointFormatError(
            f"'{path}': '{STEPS_GROUP}/{_RANDOM}' is {words.dtype} of shape {words.shape}, "
            f"version {version!r}; expected uint32 of shape ({_RANDOM_WORDS},), version "
            f"{_RANDOM_VERSION} (Python's random.getstate())"
        )
    if not isinstance(gauss, (float, np.floating)):
        raise CheckpointFormatError(
            f"'{path}': attribute 'python_random_gauss' of '{STEPS_GROUP}' is {gauss!r}; "
            f"expected a float (NaN for none)"
        )
    words_tuple = tuple(int(w) for w in words)
    state = (_RANDOM_VERSION, words_tuple, None if np.isnan(gauss) else float(gauss))
    try:
        random.Random().setstate(state)
    except (ValueError, TypeError, OverflowError) as error:
        raise CheckpointFormatError(
            f"'{path}': '{STEPS_GROUP}/{_RANDOM}' is not a state of Python's random "
            f"generator ({error})"
        ) from None
    return state


# -- from restart to fit -------------------------------------------------------------

# Keyed by the model, as `deferred` keys its pending loads.
_pending: weakref.WeakKeyDictionary[Any, StepState] = weakref.WeakKeyDictionary()
_epoch_random: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] = weakref.WeakKeyDictionary()


def epoch_began(model: Any) -> None:
    """An epoch of `model`'s fit begins: note Python's random state for its step saves
    (called before fit makes the epoch's data iterator, which may shuffle with it)."""
    _epoch_random[model] = random.getstate()


def hold(model: Any, state: StepState | None) -> None:
    """Keep the step state a restart into `model` loaded, for the next `fit` (None: the
    restart was at an epoch end, and forgets any earlier one's)."""
    if state is None:
        _pending.pop(model, None)
    else:
        _pending[model] = state


def take(model: Any) -> StepState | None:
    """The step state `restart()` held for `model`, once."""
    return _pending.pop(model, None)


@dataclass(frozen=True)
class FitStart:
    """Where the first epoch of a fit starts: at batch 0, or after the `batch` batches a
    step checkpoint holds, which the callback then does not count as trained."""

    batch: int = 0

    def skipped(self, step: int) -> bool:
        """Whether fit's `step` of the first epoch is one already trained."""
        return step < self.batch


AT_EPOCH_START = FitStart()


def check_steps_per_execution(model: Any, save_steps: int | str) -> None:
    """Refuse step saves (`ckpt_save_steps`) of a model that trains several batches per
    call (`compile(steps_per_execution=k)`, k > 1): fit reports only every k-th batch's
    end, and a fit resumed inside an epoch could not report the saved batch as the
    first one it trains, which the session checks.

    Raises:
        ParameterValueError: naming both values and the remedy.
    """
    per_call = getattr(model, "steps_per_execution", 1) or 1
    if save_steps != 0 and per_call != 1:
        raise ParameterValueError(
            f"parameter 'ckpt_save_steps' is {save_steps!r} for model '{model.name}' "
            f"compiled with steps_per_execution={per_call}; step checkpoints need "
            f"steps_per_execution=1 (fit then reports every batch): compile it so, or "
            f"set ckpt_save_steps to 0 (saves at epoch ends only)"
        )


def start_fit(model: Any, batches_per_epoch: int | None) -> FitStart:
    """At the start of fit: where its first epoch starts, made so (`start_at_batch`)
    when `restart()` loaded a step checkpoint into `model`.

    Under a multi-worker strategy every worker must start at the same batch: they check
    it with one collective (every worker calls this at the start of fit) and all raise
    CheckpointError otherwise, before training.

    Raises:
        CheckpointError: the workers disagree, or `start_at_batch` refuses.
    """
    state = take(model)
    start = (state.epoch, state.batch) if state is not None else (-1, 0)
    all_gather = strategy_all_gather(model)
    if all_gather is not None:
        everyone = all_gather(start)
        if any(tuple(found) != start for found in everyone):
            raise CheckpointError(
                f"the workers do not start fit at the same place: (epochs completed, "
                f"batch) of the step checkpoint each restored is {everyone} ((-1, 0): "
                f"none, an epoch start); expected the same on every worker, each "
                f"having called restart() before fit"
            )
    if state is None:
        return AT_EPOCH_START
    start_at_batch(model, state, batches_per_epoch)
    random.setstate(state.python_random)
    return FitStart(state.batch)


def start_at_batch(model: Any, state: StepState, batches_per_epoch: int | None) -> None:
    """Make the first epoch of the `fit` starting now begin at batch `state.batch`
    (module docstring).

    Raises:
        CheckpointError: the run's data has another number of batches per epoch;
            nothing was trained.
    """
    batch = state.batch
    if state.batches_per_epoch != _UNKNOWN and batches_per_epoch not in (
        None,
        state.batches_per_epoch,
    ):
        raise CheckpointError(
            f"the checkpoint was saved after batch {batch} of epoch {state.epoch + 1} "
            f"of a run whose data had {state.batches_per_epoch} batches per epoch; this "
            f"fit has {batches_per_epoch}. Resume with the same data, batch_size and "
            f"steps_per_epoch (or restart from an epoch end: candle-ckpt rollback)"
        )
    train_function = model.train_function
    calls = 0
    restored_logs: dict[str, Any] = {}

    def resume_then_train(iterator: Any) -> Any:
        nonlocal calls
        if calls == 0:
            _restore_metrics(model, state, iterator)
            _skip(iterator, state)
            # the logs of every skipped step: computed once, they do not change
            restored_logs.update(model.get_metrics_result())
        calls += 1
        if calls <= batch:
            return dict(restored_logs)
        model.train_function = train_function
        return train_function(iterator)

    model.train_function = resume_then_train


def _restore_metrics(model: Any, state: StepState, iterator: Any) -> None:
    """Assign the saved metric values, after checking them all (fit has reset them)."""
    if not state.metrics_saved:
        return  # restart warned: the epoch's logs average the batches trained from here
    variables = model.metrics_variables
    if len(variables) != len(state.metric_names):
        # Keras builds the compiled metrics in the first training step; they must hold
        # their values before it.
        spec = getattr(iterator, "element_spec", None)
        if spec is not None:
            with strategy_scope(model):
                model._symbolic_build(data_batch=spec)
            variables = model.metrics_variables
    names = tuple(v.path for v in variables)
    if names != state.metric_names:
        raise CheckpointError(
            f"the checkpoint saved after batch {state.batch} of epoch {state.epoch + 1} "
            f"holds metric variables {list(state.metric_names)}, model "
            f"'{model.name}' has {list(names)}; compile it with the same loss and "
            f"metrics as the run that saved it"
        )
    for variable, value in zip(variables, state.metric_values):
        if (tuple(variable.shape), str(variable.dtype)) != (value.shape, value.dtype.name):
            raise CheckpointError(
                f"the checkpoint's metric variable '{variable.path}' is {value.dtype.name} "
                f"of shape {value.shape}, the model's is {variable.dtype} of shape "
                f"{tuple(variable.shape)}"
            )
    for variable, value in zip(variables, state.metric_values):
        variable.assign(value)


def _skip(iterator: Any, state: StepState) -> None:
    """Move fit's data iterator past the `state.batch` batches already trained."""
    for done in range(state.batch):
        try:
            next(iterator)
        except StopIteration:
            raise CheckpointError(
                f"the data ran out after {done} batches, but the checkpoint was saved "
                f"after batch {state.batch} of epoch {state.epoch + 1}; resume with the "
                f"same data and batch_size"
            ) from None
